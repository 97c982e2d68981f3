"""Checkpoints: ``model.safetensors`` + ``manifest.json`` (config, checksums), written atomically.

No pickle anywhere: safetensors holds only tensors, and the manifest holds the model
config as JSON, so loading a checkpoint never executes code. The manifest is written
last inside a staging directory that replaces the target in one rename, and every
file it lists carries a sha256 that :func:`load_checkpoint` verifies before use.
Serving imports this module: keep it free of training, Spark, Feast and pandas imports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from common.atomic import sha256_file, staging_dir
from common.errors import UserFacingError
from training.model import GRank, GRankConfig

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


def save_checkpoint(model: GRank, directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``model`` and ``manifest`` (plus config and checksums) to ``directory`` atomically.

    Returns the manifest as written. Keys ``config``, ``files`` and ``format_version``
    are owned by this function and override any given ones.
    """
    with staging_dir(directory) as staging:
        save_file(model.cpu_state(), str(staging / WEIGHTS_FILE))
        written = {
            **manifest,
            "format_version": FORMAT_VERSION,
            "config": model.config.to_dict(),
            "files": {WEIGHTS_FILE: sha256_file(staging / WEIGHTS_FILE)},
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(written, indent=2, sort_keys=True))
    return written


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of a checkpoint, refusing a missing or unreadable one with a clear line."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise UserFacingError(f"no checkpoint manifest at {path}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserFacingError(f"unreadable checkpoint manifest {path}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise UserFacingError(f"{path} is not a format-{FORMAT_VERSION} checkpoint manifest")
    return manifest


def load_checkpoint(directory: Path, device: str = "cpu") -> tuple[GRank, dict[str, Any]]:
    """Load a checkpoint after verifying every file's sha256; refuse a mismatch naming the file."""
    manifest = read_manifest(directory)
    for name, expected in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise UserFacingError(f"checkpoint file missing: {path}")
        if sha256_file(path) != expected:
            raise UserFacingError(f"checksum mismatch for {path}: refusing a corrupt checkpoint")
    if WEIGHTS_FILE not in manifest.get("files", {}):
        raise UserFacingError(f"{directory / MANIFEST_FILE} lists no {WEIGHTS_FILE}")
    model = GRank(GRankConfig.from_dict(manifest["config"]))
    try:
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    except RuntimeError as exc:
        raise UserFacingError(
            f"{directory / WEIGHTS_FILE} does not match its config: {exc}"
        ) from exc
    model.to(torch.device(device))
    model.eval()
    return model, manifest
