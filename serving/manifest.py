"""A snapshot's manifest: the sha256 of every other file, written last; what verification checks.

``manifest.json`` seals a folder: its metadata, the snapshot format, the version it
names, and the checksum of each file beside it. It is written after every other file,
so a folder with a valid manifest is complete. Verification refuses a folder whose files
are missing, extra, symlinked or changed in a single byte; nothing unverified is ever
made current or served. What the files hold is serving/bundle.py's business.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_text, fsync_dir, sha256_file
from common.errors import UserFacingError

MANIFEST = "manifest.json"
SNAPSHOT_FORMAT = 2  # 1 stored the item table twice (matrix + a full checkpoint)


class SnapshotError(UserFacingError):
    """A snapshot is missing, malformed or does not match its manifest."""


def folder_files(folder: Path) -> dict[str, Path]:
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


def hash_files(files: Mapping[str, Path]) -> dict[str, str]:
    """sha256 of each file, hashed in parallel threads (hashlib releases the GIL).

    Hashing is most of the time between "published" and "serving" for large matrices,
    and a 1M x 64 snapshot's matrix alone is ~256 MB.
    """
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        digests = pool.map(sha256_file, files.values())
        return dict(zip(files, digests, strict=True))


def write_manifest(
    folder: Path, version: str, checksums: Mapping[str, str], fields: Mapping[str, Any]
) -> None:
    """Seal ``folder`` as ``version``: ``fields``, the format and the checksums, made durable."""
    manifest = {
        **fields,
        "format": SNAPSHOT_FORMAT,
        "version": version,
        "files": dict(checksums),
    }
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    fsync_dir(folder)


def read_manifest(folder: Path) -> Any:
    """The parsed manifest of ``folder``, unverified; OSError or ValueError when unreadable."""
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


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
        manifest = read_manifest(folder)
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
    present = folder_files(folder)
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
