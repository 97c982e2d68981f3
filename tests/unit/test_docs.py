"""The docs state the current truth: what they name exists, and they read as a manual.

Plain text checks of README.md and docs/*.md against the tree (no Spark, no servers):
docs/architecture.md names only paths and modules that exist and lists every folder of
the data root; every doc names only files, ``grank`` commands, options and ``GRANK_``
settings that exist; no doc mentions a development session or an issue number.
"""

from __future__ import annotations

import ast
import dataclasses
import fnmatch
import re
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import NamedTuple

import click
import pytest
from pydantic import BaseModel

from grank.cli import cli
from grank.config import REPO_ROOT, Settings

ARCHITECTURE = "docs/architecture.md"
DOCS = ["README.md", *sorted(f"docs/{p.name}" for p in (REPO_ROOT / "docs").glob("*.md"))]
PACKAGES = ("common", "features", "training", "serving", "grank", "dags")
THIS_FILE = Path(__file__).resolve().relative_to(REPO_ROOT.resolve()).as_posix()

# Statements that the documents' owners are fixing on other branches, per check. Strict
# xfail: once a fix is merged, the check passes and fails the run until its entry goes.
KNOWN_STALE: dict[str, dict[str, str]] = {"files": {}, "diary": {}}

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
PLACEHOLDER = re.compile(r"[<>{}=]|YYYY")
DOTTED_MODULE = re.compile(rf"^(?:{'|'.join(PACKAGES)})(?:\.\w+)+$")
# a Python file or a document, maybe with a name in it: "features/lake.py:EVENT_SCHEMA",
# "tests/e2e/test_dag_e2e.py::test_backfill_equals_the_days_run_one_by_one"
FILE_REFERENCE = re.compile(r"^(?P<path>[\w./*-]+\.(?:py|md))(?:::?(?P<name>\w+))?$")
PROSE_FILE = re.compile(r"(?<![\w/.-])([\w*-]+(?:/[\w.*-]+)*\.(?:py|md)(?:::\w+)?)(?![\w/])")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
SETTING = re.compile(r"\bGRANK_[A-Z0-9_]*[A-Z0-9]\b(?:__)?")
COMMAND_STOP = {"/", "#", "|", "&&", ";", "→", "\\"}
# "session 5", "Session 5", "this session", "session-5": development history. A Spark
# session is a runtime object and may be named.
SESSION = re.compile(r"(?<!spark )\bsessions?\b", re.IGNORECASE)
# "issue 5", "(issue 3)", "issue #6": the project's tracker. An upstream project's issue
# cited as "owner/repo issue N" is a reference a reader can follow.
ISSUE_NUMBER = re.compile(r"\bissues?\s*#?\d+", re.IGNORECASE)
UPSTREAM_REPO = re.compile(r"[\w.-]+/[\w.-]+\s+$")


class Code(NamedTuple):
    """One inline code span or one line of a fenced block, split into words."""

    line: int
    words: list[str]
    data_root: bool  # in the first column of "Data root layout": relative to the data root


@cache
def _repo_files() -> tuple[str, ...]:
    """Every file of the checkout that git tracks or would track (ignored ones excluded)."""
    listing = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return tuple(sorted(set(listing.splitlines())))


@cache
def _top_level_names() -> frozenset[str]:
    return frozenset(path.split("/")[0] for path in _repo_files())


@cache
def _text(path: str) -> str:
    return (REPO_ROOT / path).read_text(errors="replace")


def _exists(pattern: str) -> bool:
    """A repository file, or folder (trailing ``/`` or not), matching ``pattern`` (globs)."""
    folder_only = pattern.endswith("/")
    pattern = pattern.rstrip("/")
    for path in _repo_files():
        parts = path.split("/")
        folders = ["/".join(parts[:end]) for end in range(1, len(parts))]
        for candidate in folders if folder_only else [path, *folders]:
            if fnmatch.fnmatchcase(candidate, pattern):
                return True
    return False


def _defines(module: str, name: str) -> bool:
    """Whether the Python file ``module`` defines ``name`` at its top level."""
    defined: set[str] = set()
    for node in ast.parse(_text(module)).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defined.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined.update(t.id for t in targets if isinstance(t, ast.Name))
    return name in defined


def _module_file(dotted: str) -> tuple[str, list[str]] | None:
    """The longest prefix of ``a.b.c`` that is a module of ours, as a file, and the rest."""
    parts = dotted.split(".")
    for end in range(len(parts), 1, -1):
        stem = "/".join(parts[:end])
        for path in (f"{stem}.py", f"{stem}/__init__.py"):
            if path in _repo_files():
                return path, parts[end:]
    return None


def _code(text: str) -> Iterator[Code]:
    """Inline code spans and lines of fenced blocks: where a doc names files and commands."""
    fenced = False
    section = ""
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
        elif fenced:
            yield Code(number, line.split(), data_root=False)
        else:
            if line.startswith("#"):
                section = line.lstrip("#").strip()
            first_cell = line.split("|")[1] if line.startswith("|") else ""
            for match in INLINE_CODE.finditer(line):
                span = match.group(1)
                data_root = section == "Data root layout" and span in first_cell
                # "features/lake.py: EVENT_SCHEMA" names a definition in a file
                span = re.sub(r"^(\S+\.py): (\w+)$", r"\1:\2", span)
                yield Code(number, span.split(), data_root)


def _clean(word: str) -> str:
    return word.strip("()[],;'\"").rstrip(".:")


def _stale_name(token: str) -> str | None:
    """Why ``token`` names nothing in the repository, or None (fine, or no repo path)."""
    if "://" in token or token.startswith(("$", "-", "/", "~", ".venv")):
        return None
    if DOTTED_MODULE.match(token):
        found = _module_file(token)
        if found is None:
            return "no such module"
        module, rest = found
        return f"{module} defines no {rest[0]}" if rest and not _defines(module, rest[0]) else None
    reference = FILE_REFERENCE.match(token)
    if reference:  # a Python file or a document: of ours, or of another project
        path, name = reference["path"], reference["name"]
        if "/" not in path:
            if any(p.rsplit("/", 1)[-1] == path for p in _repo_files()):
                return None
            return "no file of that name"
        if path.split("/")[0] not in _top_level_names():
            return None  # e.g. feast/utils.py, in the Feast package
        if not _exists(path):
            return "no such file"
        if name and path.endswith(".py") and "*" not in path and not _defines(path, name):
            return f"{path} defines no {name}"
        return None
    parts = token.split("/")
    if len(parts) == 1 or parts[0] not in _top_level_names():
        return None  # a word, or a path relative to the data root, a package, an image...
    literal = []
    for part in parts:
        if PLACEHOLDER.search(part):
            break  # features/<table>/dt=D/: a pattern; its literal head must exist
        literal.append(part)
    path = "/".join(literal) + ("/" if len(literal) < len(parts) else "")
    return None if _exists(path) else "no such file or folder"


def _stale_names(doc: str, only_files: bool) -> list[str]:
    """Names in ``doc`` that the tree lacks: with ``only_files``, the Python files and
    documents it names anywhere and its relative links; otherwise also every path-like
    word of its code."""
    text = _text(doc)
    found = {
        (code.line, token)
        for code in _code(text)
        if not code.data_root
        for token in map(_clean, code.words)
        if token and (not only_files or FILE_REFERENCE.match(token))
    }
    stale = []
    for number, line in enumerate(text.splitlines(), start=1):
        found.update((number, token) for token in PROSE_FILE.findall(line))
        for target in MARKDOWN_LINK.findall(line):
            target = target.split("#")[0]
            if target and "://" not in target and not target.startswith("mailto:"):
                linked = (REPO_ROOT / doc).parent.joinpath(target).resolve()
                if not _exists(linked.relative_to(REPO_ROOT.resolve()).as_posix()):
                    stale.append(f"{doc}:{number}: link ({target}): no such file")
    for number, token in sorted(found):
        why = _stale_name(token)
        if why:
            stale.append(f"{doc}:{number}: `{token}`: {why}")
    return stale


def _stale_command(words: list[str]) -> str | None:
    """Why ``grank <words>`` is no command line of the CLI (subcommands, options)."""
    command: click.Command = cli
    name = "grank"
    for raw in words:
        if raw in COMMAND_STOP:
            break
        word = raw.strip("[](),;").split("=")[0]
        if word.startswith("-"):
            options = {"-h", "--help"}
            for param in command.params:
                options.update(param.opts, param.secondary_opts)
            for option in word.replace("\\|", "|").split("|"):
                if option.startswith("-") and option not in options:
                    return f"{name} has no option {option}"
        elif isinstance(command, click.Group):
            if not re.fullmatch(r"[a-z][a-z-]*", word):
                return None
            if word not in command.commands:
                return f"{name} has no subcommand {word}"
            command = command.commands[word]
            name += f" {word}"
    return None


def _stale_setting(name: str) -> str | None:
    """Why ``GRANK_...`` is no setting: ``GRANK_<SECTION>__<FIELD>`` and ``GRANK_<FIELD>``
    are ``Settings`` fields; any other ``GRANK_`` variable is read by a script or the DAG."""
    section, _, field = name.removeprefix("GRANK_").lower().partition("__")
    fields = Settings.model_fields
    if section in fields and "__" in name:
        model = fields[section].annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return f"{section} is not a section"
        # a nested section (a layer's dataclass, e.g. train.gate) takes another "__"
        head, _, rest = field.partition("__")
        if field and head not in model.model_fields:
            return f"{section} has no field {field}"
        if rest:
            inner = model.model_fields[head].annotation
            known = (
                {f.name for f in dataclasses.fields(inner)}
                if dataclasses.is_dataclass(inner)
                else set()
            )
            if rest not in known:
                return f"{section}.{head} has no field {rest}"
        return None
    if section in fields and not field:
        return None
    readers = [
        path
        for path in _repo_files()
        if not path.endswith(".md")
        and path != THIS_FILE
        and (REPO_ROOT / path).is_file()
        and name in _text(path)
    ]
    return None if readers else "no setting, and nothing reads it"


def _stale_commands_and_settings(doc: str) -> list[str]:
    stale = []
    for code in _code(_text(doc)):
        for start, word in enumerate(code.words):
            after_option = start > 0 and code.words[start - 1].startswith("-")
            if (word == "grank" or word.endswith("/grank")) and not after_option:
                why = _stale_command(code.words[start + 1 :])
                if why:
                    stale.append(f"{doc}:{code.line}: {why}")
    for number, line in enumerate(_text(doc).splitlines(), start=1):
        for name in SETTING.findall(line):
            why = _stale_setting(name)
            if why:
                stale.append(f"{doc}:{number}: {name}: {why}")
    return stale


def _diary_mentions(line: str) -> list[str]:
    """Development sessions and issue numbers of this project named in ``line``."""
    sessions = [m.group(0) for m in SESSION.finditer(line)]
    issues = [
        m.group(0)
        for m in ISSUE_NUMBER.finditer(line)
        if not UPSTREAM_REPO.search(line[: m.start()])
    ]
    return sessions + issues


def _docs(check: str) -> list[object]:
    known = KNOWN_STALE[check]
    return [
        pytest.param(doc, marks=pytest.mark.xfail(strict=True, reason=known[doc]))
        if doc in known
        else doc
        for doc in DOCS
    ]


def test_architecture_names_only_paths_and_modules_that_exist() -> None:
    assert _stale_names(ARCHITECTURE, only_files=False) == []


def test_architecture_lists_every_folder_of_the_data_root() -> None:
    """Every ``data_root / "name"`` the code joins has its row in "Data root layout"."""
    written = {
        folder
        for path in _repo_files()
        if path.endswith(".py") and path.split("/")[0] in PACKAGES
        for folder in re.findall(r"data_root\s*/\s*[\"']([\w.-]+)[\"']", _text(path))
    }
    assert written, "the code names the data root's folders"
    listed = {
        _clean(word).split("/")[0]
        for code in _code(_text(ARCHITECTURE))
        if code.data_root
        for word in code.words
    }
    assert sorted(written - listed) == []


@pytest.mark.parametrize("doc", _docs("files"))
def test_docs_name_only_files_that_exist(doc: str) -> None:
    assert _stale_names(doc, only_files=True) == []


@pytest.mark.parametrize("doc", DOCS)
def test_docs_name_only_commands_and_settings_that_exist(doc: str) -> None:
    assert _stale_commands_and_settings(doc) == []


@pytest.mark.parametrize("doc", _docs("diary"))
def test_docs_mention_no_development_session_or_issue_number(doc: str) -> None:
    mentions = [
        f"{doc}:{number}: {mention!r} in {line.strip()[:80]!r}"
        for number, line in enumerate(_text(doc).splitlines(), start=1)
        for mention in _diary_mentions(line)
    ]
    assert mentions == []


def test_the_checks_flag_what_they_are_for_and_spare_the_rest() -> None:
    assert _stale_name("features/quality_gates.py") == "no such file"
    assert _stale_name("features/nothing*.py") == "no such file"
    assert _stale_name("features/jobs*.py") is None  # a glob that resolves
    assert _stale_name("serving/nothing/") == "no such file or folder"
    assert _stale_name("docs/pitfalls.md") == "no such file"
    assert _stale_name("pitfalls.md") == "no file of that name"
    assert _stale_name("features/lake.py:NO_SCHEMA") == "features/lake.py defines no NO_SCHEMA"
    assert _stale_name("features/lake.py:EVENT_SCHEMA") is None
    assert _stale_name("training.modle") == "no such module"
    assert _stale_name("training.model") is None
    assert _stale_name("common.atomic.no_helper") == "common/atomic.py defines no no_helper"
    assert _stale_name("features/<table>/dt=D/") is None  # a data-root pattern
    assert _stale_name("snapshots/CURRENT") is None  # under the data root
    assert _stale_name("feast/utils.py") is None  # another project's file
    assert _stale_command(["features", "publish"]) == "grank features has no subcommand publish"
    assert _stale_command(["train", "--day", "D"]) == "grank train has no option --day"
    assert _stale_command(["features", "validate", "--stage", "raw\\|features"]) is None
    assert _stale_command(["features", "build", "[--rebuild]", "#", "--note"]) is None
    assert _stale_setting("GRANK_TRAIN__MAX_HOURS") == "train has no field max_hours"
    assert _stale_setting("GRANK_NOWHERE") == "no setting, and nothing reads it"
    assert _stale_setting("GRANK_SPARK__MASTER") is None
    assert _stale_setting("GRANK_TRAIN__GATE__MIN_QUERIES") is None
    assert _stale_setting("GRANK_TRAIN__GATE__MAX_QUERIES") == "train.gate has no field max_queries"
    assert _stale_setting("GRANK_QUALITY__") is None  # GRANK_QUALITY__*: the section
    assert _stale_setting("GRANK_DATA_ROOT") is None
    assert _stale_setting("GRANK_BIN") is None  # read by the DAG and scripts/airflow.sh
    assert _diary_mentions("measured in session 5") == ["session"]
    assert _diary_mentions("### Session 6 (2026-11-28)") == ["Session"]
    assert _diary_mentions("the previous session's numbers") == ["session"]
    assert _diary_mentions("## Spark feature ETL (issue 3)") == ["issue 3"]
    assert _diary_mentions("see issue #12") == ["issue #12"]
    assert _diary_mentions("starting a Spark session alone costs 5-6 s") == []
    assert _diary_mentions("in that state (feast-dev/feast issue 6780)") == []
