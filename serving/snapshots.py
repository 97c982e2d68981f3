"""Serving snapshots: publish, list, roll back and prune versions, all crash-safe.

Layout under ``snapshots_dir``::

    000007-2000-12-31/            one version: <sequence>-<logical date>
        ...                       the files of one bundle (serving/bundle.py)
        manifest.json             written last: metadata + sha256 of every other file
                                  (serving/manifest.py, which also verifies it)
    CURRENT                       the name of the serving version (replaced atomically)

A version is linked (or copied) into a hidden staging folder, given its manifest, renamed
into place, and only then named by ``CURRENT`` (``os.replace``). A killed publisher
therefore leaves at most a hidden folder that every reader ignores, and ``CURRENT``
always names a complete, verified version. Versions named from the outside (CLI,
``CURRENT`` contents) must match :data:`VERSION_PATTERN`, so they cannot escape the folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_text, fsync_dir
from serving.manifest import (
    SnapshotError,
    folder_files,
    hash_files,
    read_manifest,
    verify_snapshot,
    write_manifest,
)

CURRENT = "CURRENT"
VERSION_PATTERN = re.compile(r"^(\d{6})-(\d{4}-\d{2}-\d{2})$")
STALE_STAGING_S = 3600.0


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
    bundle_dir: Path,
    logical_date: date,
    metadata: Mapping[str, Any],
    keep: int,
) -> str:
    """Link ``bundle_dir`` into a new version, point ``CURRENT`` at it, prune old ones.

    ``bundle_dir`` holds one bundle (the embedding refresh's output); ``metadata`` goes
    into the manifest with what the bundle's files say of themselves, next to the
    checksums, which are computed from the staged files on disk. The manifest is written
    last, then the folder is renamed into place, and only then does ``CURRENT`` move.
    Returns the new version.
    """
    # here, not at the top: the bundle's reader and writer bring torch, and listing,
    # verifying or rolling back versions (an incident's commands) need none of it
    from serving.bundle import describe_bundle

    if keep < 1:
        raise SnapshotError(f"retention must keep at least 1 snapshot, got {keep}")
    files = folder_files(bundle_dir)
    metadata = {**metadata, **describe_bundle(bundle_dir, set(files))}
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


def _move_into_place(
    snapshots_dir: Path, staging: Path, logical_date: date, metadata: Mapping[str, Any]
) -> str:
    """Write the manifest for the next free sequence number and rename staging onto it.

    ``os.rename`` onto an existing version folder fails, so two concurrent publishers
    cannot claim the same number: the loser rewrites its manifest and takes the next.
    """
    checksums = hash_files(folder_files(staging))
    while True:
        existing = _published_versions(snapshots_dir)
        sequence = version_sequence(existing[-1]) + 1 if existing else 1
        version = f"{sequence:06d}-{logical_date.isoformat()}"
        dated = {
            **metadata,
            "logical_date": logical_date.isoformat(),
            "created_at": datetime.now(UTC).isoformat(),
        }
        write_manifest(staging, version, checksums, dated)
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
            manifest = read_manifest(path)
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
        manifest = read_manifest(version_dir(snapshots_dir, version))
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
