"""Atomic file and directory writes: readers see the old artefact or the new one, never half.

Everything we publish (lake partitions, feature tables, checkpoints, snapshots)
goes through here: write into a hidden temporary sibling, fsync, then ``os.replace``.
Hidden names (leading ``.``) are ignored by Spark, pyarrow datasets and our own readers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _read_umask() -> int:
    """The process umask, read once at import (``os.umask`` can only be read by setting it)."""
    current = os.umask(0o022)
    os.umask(current)
    return current


_UMASK = _read_umask()


def _umask_mode(base: int) -> int:
    """``base`` as the umask would leave it: temp files start private (0600/0700), but
    published artefacts must be readable like any other file (e.g. by a serving user)."""
    return base & ~_UMASK


def fsync_dir(path: Path) -> None:
    """Persist a directory entry (a rename is durable only once its parent is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one.

    ``private`` keeps the file readable by its owner only (0600), from the first byte on:
    for files that hold credentials.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600 if private else _umask_mode(0o666))
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, *, private: bool = False) -> None:
    """Text flavour of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"), private=private)


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Yield a hidden temporary directory beside ``final``; on success it replaces ``final``.

    The swap of a non-empty directory cannot be one syscall, so the old directory is
    first renamed aside and deleted only after the new one is in place: a crash in
    between leaves a hidden ``.old`` directory and either the old or the new content
    under ``final``, never a mix. On error the staging directory is removed and
    ``final`` is untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    staging.chmod(_umask_mode(0o777))
    try:
        yield staging
        for file in staging.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        if final.exists():
            aside = final.parent / f".{final.name}.old"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
            os.replace(staging, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(staging, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed so multi-GB artefacts do not load into memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
