"""Serving snapshots: publish, verify, list, roll back and prune, all crash-safe.

Layout under ``snapshots_dir``::

    000007-2000-12-31/            one version: <sequence>-<logical date>
        item_embeddings.npy       float32 [table rows, dim]: the model's item table,
                                  row i = item i (row 0 = padding, all zeros)
        item_ids.npy              int64: the servable catalogue (what MIPS may return)
        popular_items.npy         int64, most popular first (fallback for unknown users)
        network.safetensors       every other weight of the model that made the table
        network.json              that model's config (vectors and weights are one unit)
        source.json               which checkpoint that was, and its evaluation metrics
        manifest.json             written last: metadata + sha256 of every other file
    CURRENT                       the name of the serving version (replaced atomically)

A version is linked (or copied) into a hidden staging folder, given its manifest, renamed
into place, and only then named by ``CURRENT`` (``os.replace``). A killed publisher
therefore leaves at most a hidden folder that every reader ignores, and ``CURRENT``
always names a complete, verified version. Versions named from the outside (CLI,
``CURRENT`` contents) must match :data:`VERSION_PATTERN`, so they cannot escape the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_write_text, fsync_dir, sha256_file
from common.errors import UserFacingError

MANIFEST = "manifest.json"
CURRENT = "CURRENT"
EMBEDDINGS_FILE = "item_embeddings.npy"
ITEM_IDS_FILE = "item_ids.npy"
POPULAR_FILE = "popular_items.npy"
NETWORK_FILE = "network.safetensors"
NETWORK_CONFIG_FILE = "network.json"
SOURCE_FILE = "source.json"
SNAPSHOT_FORMAT = 2  # 1 stored the item table twice (matrix + a full checkpoint)
VERSION_PATTERN = re.compile(r"^(\d{6})-(\d{4}-\d{2}-\d{2})$")
STALE_STAGING_S = 3600.0


class SnapshotError(UserFacingError):
    """A snapshot is missing, malformed or does not match its manifest."""


@dataclass(frozen=True)
class SnapshotInfo:
    """One published version as listed by :func:`list_snapshots`."""

    version: str
    path: Path
    manifest: dict[str, Any]
    is_current: bool


def check_version_name(version: str) -> str:
    """Refuse any name that is not ``NNNNNN-YYYY-MM-DD`` (no separators, no ``..``)."""
    if not VERSION_PATTERN.fullmatch(version):
        raise SnapshotError(
            f"invalid snapshot version {version!r}: expected NNNNNN-YYYY-MM-DD"
            " (e.g. 000003-2000-12-31)"
        )
    return version


def version_dir(snapshots_dir: Path, version: str) -> Path:
    """The folder of ``version``, proven to lie directly inside ``snapshots_dir``."""
    check_version_name(version)
    root = snapshots_dir.resolve()
    path = (root / version).resolve()
    if path.parent != root:
        raise SnapshotError(f"snapshot version {version!r} escapes {snapshots_dir}")
    return path


def version_sequence(version: str) -> int:
    """The publish sequence number a version starts with (its order)."""
    match = VERSION_PATTERN.fullmatch(version)
    if match is None:
        raise SnapshotError(f"invalid snapshot version {version!r}")
    return int(match.group(1))


def read_current(snapshots_dir: Path) -> str | None:
    """The version ``CURRENT`` names, or None before the first publish."""
    try:
        text = (snapshots_dir / CURRENT).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return check_version_name(text)


def _published_versions(snapshots_dir: Path) -> list[str]:
    """Version folders (hidden staging folders and other names ignored), oldest first."""
    if not snapshots_dir.is_dir():
        return []
    names = [
        entry.name
        for entry in snapshots_dir.iterdir()
        if entry.is_dir() and VERSION_PATTERN.fullmatch(entry.name)
    ]
    return sorted(names, key=version_sequence)


def _snapshot_files(folder: Path) -> dict[str, Path]:
    """Every regular file under ``folder`` except the manifest, keyed by POSIX relative path."""
    files: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise SnapshotError(f"snapshot {folder.name} contains a symlink: {path.name}")
        if path.is_file():
            relative = path.relative_to(folder).as_posix()
            if relative != MANIFEST:
                files[relative] = path
    return files


def verify_snapshot(folder: Path) -> dict[str, Any]:
    """Return the manifest of ``folder`` if every file is present, expected and intact.

    Checks: the manifest parses, names this folder's version, lists exactly the files
    present (nothing missing, nothing extra) and every sha256 matches. A flipped byte or
    a truncated file is refused, never made current and never served.
    """
    manifest, present = _expected_files(folder)
    _check_digests(folder, manifest, hash_files(present))
    return manifest


def read_verified(folder: Path) -> tuple[dict[str, Any], dict[str, bytes | mmap.mmap]]:
    """Like :func:`verify_snapshot`, but also return every file's bytes as verified.

    Files are mapped read-only rather than copied: hashing a mapping reads the page cache
    in place, and the server then uses those very pages as the item matrix, so a swap
    costs one pass over the matrix (a copy into fresh memory would double it at 1M
    items). This relies on snapshot files never being rewritten in place, which nothing
    here does: versions are new files, pruning renames then unlinks (an unlinked file
    stays readable through the mapping).
    """
    manifest, present = _expected_files(folder)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        results = dict(zip(present, pool.map(_map_and_hash, present.values()), strict=True))
    _check_digests(folder, manifest, {rel: digest for rel, (_, digest) in results.items()})
    return manifest, {rel: data for rel, (data, _) in results.items()}


def _expected_files(folder: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """The parsed manifest and the files present, refusing missing or unexpected files."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SnapshotError(f"snapshot {folder.name} has no {MANIFEST}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"snapshot {folder.name}: {MANIFEST} is not valid JSON") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise SnapshotError(f"snapshot {folder.name}: {MANIFEST} lacks a 'files' table")
    if manifest.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotError(
            f"snapshot {folder.name} has format {manifest.get('format')!r}, this version reads"
            f" format {SNAPSHOT_FORMAT}: refresh and publish it again"
        )
    if manifest.get("version") != folder.name:
        raise SnapshotError(
            f"snapshot {folder.name}: manifest names version {manifest.get('version')!r}"
        )
    present = _snapshot_files(folder)
    missing = sorted(set(manifest["files"]) - set(present))
    extra = sorted(set(present) - set(manifest["files"]))
    if missing or extra:
        raise SnapshotError(f"snapshot {folder.name}: missing files {missing}, unexpected {extra}")
    return manifest, present


def _check_digests(folder: Path, manifest: dict[str, Any], actual: Mapping[str, str]) -> None:
    for relative, digest in manifest["files"].items():
        if actual[relative] != digest:
            raise SnapshotError(f"snapshot {folder.name}: checksum mismatch in {relative}")


def _map_and_hash(path: Path) -> tuple[bytes | mmap.mmap, str]:
    """A read-only private mapping of a file (empty files as ``b""``) and its sha256."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return b"", hashlib.sha256().hexdigest()
        mapped = mmap.mmap(handle.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    return mapped, hashlib.sha256(mapped).hexdigest()  # hashlib releases the GIL


def hash_files(files: Mapping[str, Path]) -> dict[str, str]:
    """sha256 of each file, hashed in parallel threads (hashlib releases the GIL).

    Hashing is most of the time between "published" and "serving" for large matrices,
    and a 1M x 64 snapshot's matrix alone is ~256 MB.
    """
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        digests = pool.map(sha256_file, files.values())
        return dict(zip(files, digests, strict=True))


def link_or_copy(source: str | Path, target: str | Path) -> None:
    """Hard-link ``source`` to ``target`` (same file system), else copy and fsync.

    Refresh outputs and checkpoints are immutable (written once through a staging folder
    and only ever replaced as a whole), so a link shares bytes safely and makes publishing
    independent of the matrix size.
    """
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
        with open(target, "rb") as handle:
            os.fsync(handle.fileno())


def publish_snapshot(
    snapshots_dir: Path,
    source_dir: Path,
    logical_date: date,
    metadata: Mapping[str, Any],
    keep: int,
) -> str:
    """Link ``source_dir`` into a new version, point ``CURRENT`` at it, prune old ones.

    ``source_dir`` holds the snapshot files (embedding refresh output); ``metadata`` goes
    into the manifest next to the checksums, which are computed from the staged files on
    disk. The manifest is written last, then the folder is renamed into place, and only
    then does ``CURRENT`` move. Returns the new version.
    """
    if keep < 1:
        raise SnapshotError(f"retention must keep at least 1 snapshot, got {keep}")
    files = _snapshot_files(source_dir)
    if not {ITEM_IDS_FILE, POPULAR_FILE, SOURCE_FILE} <= set(files):
        raise SnapshotError(
            f"{source_dir} holds no refreshed embeddings; run `grank embeddings refresh`"
        )
    model_files = {EMBEDDINGS_FILE, NETWORK_FILE, NETWORK_CONFIG_FILE}
    if model_files & set(files) and not model_files <= set(files):
        raise SnapshotError(
            f"{source_dir} holds part of a model: {sorted(model_files & set(files))}"
        )
    metadata = {**metadata, **_content_metadata(source_dir)}
    snapshots_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".publish.", suffix=".tmp", dir=snapshots_dir))
    try:
        for relative, path in files.items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(path, target)
        version = _move_into_place(snapshots_dir, staging, logical_date, metadata)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    atomic_write_text(snapshots_dir / CURRENT, version + "\n")
    prune_snapshots(snapshots_dir, keep)
    return version


def _content_metadata(source_dir: Path) -> dict[str, Any]:
    """Shape, dtype and checkpoint id, read from the files themselves (never trusted input).

    A popularity-only snapshot (no model has passed the gate yet) has no matrix: its
    ``checkpoint_id`` is None and serving answers every user from ``popular_items``.
    """
    item_ids = np.load(source_dir / ITEM_IDS_FILE, mmap_mode="r")
    if not (source_dir / EMBEDDINGS_FILE).is_file():
        return {
            "item_count": int(item_ids.shape[0]),
            "table_rows": None,
            "dim": None,
            "dtype": None,
            "checkpoint_id": None,
            "metrics": {},
        }
    matrix = np.load(source_dir / EMBEDDINGS_FILE, mmap_mode="r")
    try:
        source = json.loads((source_dir / SOURCE_FILE).read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{source_dir} holds no readable {SOURCE_FILE}") from exc
    return {
        "item_count": int(item_ids.shape[0]),
        "table_rows": int(matrix.shape[0]),
        "dim": int(matrix.shape[1]),
        "dtype": str(matrix.dtype),
        "checkpoint_id": source.get("checkpoint_id"),
        "metrics": source.get("metrics", {}),
    }


def _move_into_place(
    snapshots_dir: Path, staging: Path, logical_date: date, metadata: Mapping[str, Any]
) -> str:
    """Write the manifest for the next free sequence number and rename staging onto it.

    ``os.rename`` onto an existing version folder fails, so two concurrent publishers
    cannot claim the same number: the loser rewrites its manifest and takes the next.
    """
    checksums = hash_files(_snapshot_files(staging))
    while True:
        existing = _published_versions(snapshots_dir)
        sequence = version_sequence(existing[-1]) + 1 if existing else 1
        version = f"{sequence:06d}-{logical_date.isoformat()}"
        manifest = {
            **metadata,
            "format": SNAPSHOT_FORMAT,
            "version": version,
            "logical_date": logical_date.isoformat(),
            "created_at": datetime.now(UTC).isoformat(),
            "files": checksums,
        }
        atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
        fsync_dir(staging)
        try:
            os.rename(staging, snapshots_dir / version)
        except OSError:
            if (snapshots_dir / version).exists():
                continue
            raise
        fsync_dir(snapshots_dir)
        return version


def list_snapshots(snapshots_dir: Path) -> list[SnapshotInfo]:
    """Published versions, oldest first, with their manifests (unreadable ones as empty)."""
    current = read_current(snapshots_dir)
    infos = []
    for version in _published_versions(snapshots_dir):
        path = snapshots_dir / version
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            manifest = {}
        infos.append(SnapshotInfo(version, path, manifest, version == current))
    return infos


def rollback_target(snapshots_dir: Path, to: str | None = None) -> str:
    """The version a rollback goes to: ``to``, or the newest one older than ``CURRENT``.

    The target is verified; a broken one is refused (then nothing moves).
    """
    current = read_current(snapshots_dir)
    if to is not None:
        target = to
        if not version_dir(snapshots_dir, target).is_dir():
            raise SnapshotError(f"no snapshot {target} in {snapshots_dir}")
    else:
        if current is None:
            raise SnapshotError(f"nothing to roll back: {snapshots_dir} has no CURRENT")
        older = [
            v
            for v in _published_versions(snapshots_dir)
            if version_sequence(v) < version_sequence(current)
        ]
        if not older:
            raise SnapshotError(f"no snapshot older than {current} to roll back to")
        target = older[-1]
    verify_snapshot(version_dir(snapshots_dir, target))
    return target


def point_current(snapshots_dir: Path, version: str) -> str:
    """Point ``CURRENT`` at ``version`` after verifying it (a broken one is refused)."""
    verify_snapshot(version_dir(snapshots_dir, version))
    atomic_write_text(snapshots_dir / CURRENT, version + "\n")
    return version


def read_manifest_of(snapshots_dir: Path, version: str) -> dict[str, Any]:
    """The manifest of a published ``version`` (unverified: for its metadata only)."""
    try:
        manifest = json.loads((version_dir(snapshots_dir, version) / MANIFEST).read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"snapshot {version}: its manifest is unreadable") from exc
    if not isinstance(manifest, dict):
        raise SnapshotError(f"snapshot {version}: its manifest is not a JSON object")
    return manifest


def current_manifest(snapshots_dir: Path) -> dict[str, Any] | None:
    """The manifest of the version ``CURRENT`` names (None before the first publish)."""
    version = read_current(snapshots_dir)
    return None if version is None else read_manifest_of(snapshots_dir, version)


def prune_snapshots(snapshots_dir: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` versions (never the current one) and stale staging.

    A version is renamed to a hidden name before deletion, so no reader ever lists a
    half-deleted folder. Staging folders are removed only once older than an hour (a
    publisher may still be writing a fresh one).
    """
    current = read_current(snapshots_dir)
    versions = _published_versions(snapshots_dir)
    doomed = [v for v in versions[: max(len(versions) - keep, 0)] if v != current]
    for version in doomed:
        aside = snapshots_dir / f".{version}.deleting"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(snapshots_dir / version, aside)
        shutil.rmtree(aside, ignore_errors=True)
    now = time.time()
    for entry in snapshots_dir.iterdir():
        if entry.name.startswith(".") and entry.is_dir():
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat().st_mtime > STALE_STAGING_S:
                    shutil.rmtree(entry, ignore_errors=True)
    return doomed
