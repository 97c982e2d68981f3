"""The layering of docs/architecture.md, checked on the imports of every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from grank.config import REPO_ROOT

OURS = {"common", "features", "training", "serving", "grank", "dags"}
# package -> which of our top-level packages (or exact modules) it may import
ALLOWED: dict[str, set[str]] = {
    "common": {"common"},  # a leaf: its modules use each other, nothing else of ours
    "features": {"common", "features"},
    "training": {"common", "features", "training"},
    "serving": {"common", "serving", "training.model", "training.inputs", "training.checkpoint"},
    "grank": OURS - {"dags"},
    "dags": set(),
}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name.split(".")[0] in OURS}


def _allowed(package: str, module: str) -> bool:
    return any(module == rule or module.startswith(rule + ".") for rule in ALLOWED[package])


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_only_import_what_their_layer_may(package: str) -> None:
    folder = REPO_ROOT / package
    assert folder.is_dir(), f"{package}/ is part of the layout"
    violations = [
        f"{path.relative_to(REPO_ROOT)} imports {module}"
        for path in sorted(folder.rglob("*.py"))
        for module in sorted(_imports(path))
        if not _allowed(package, module)
    ]
    assert violations == []


def test_layers_never_read_the_settings() -> None:
    for package in ("common", "features", "training", "serving"):
        for path in (REPO_ROOT / package).rglob("*.py"):
            assert "grank.config" not in path.read_text(), path
