"""Atomic file and directory writes: readers see the old artefact or the new one, never half.

Everything we publish (lake partitions, feature tables, checkpoints, snapshots)
goes through here: write into a hidden temporary sibling, fsync, then ``os.replace``.
Hidden names (leading ``.``) are ignored by Spark, pyarrow datasets and our own readers.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
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


# renameat2(2) flag: swap two existing paths in one step (Linux >= 3.15; ext4, xfs, btrfs, tmpfs)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
# Test hooks (environment): crash the process at a named step of a directory swap or of a
# feature day's commit (features/lineage.py), or force the fallback path that filesystems
# without RENAME_EXCHANGE take.
CRASH_AT_ENV = "GRANK_ATOMIC_CRASH_AT"
NO_EXCHANGE_ENV = "GRANK_ATOMIC_NO_EXCHANGE"


def crash_point(step: str) -> None:
    """Die here, without cleanup, when the test hook names ``step`` (crash-window tests)."""
    if os.environ.get(CRASH_AT_ENV) == step:
        os._exit(97)


def exchange_paths(first: Path, second: Path) -> bool:
    """Swap two existing paths atomically (``renameat2(RENAME_EXCHANGE)``); False if unsupported.

    Unsupported means: not Linux/glibc, a kernel without the syscall, or a filesystem
    that refuses the flag (EINVAL). Any other error is raised.
    """
    if os.environ.get(NO_EXCHANGE_ENV) == "1":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    renameat2.restype = ctypes.c_int
    if (
        renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
        == 0
    ):
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(first), None, str(second))


def _aside(final: Path) -> Path:
    """Where the fallback swap parks the previous version of ``final``."""
    return final.parent / f".{final.name}.old"


def recover_swaps(folder: Path) -> list[Path]:
    """Finish the fallback swaps a crash interrupted under ``folder``; return the restored paths.

    The fallback (filesystems without RENAME_EXCHANGE) renames ``final`` to ``.final.old``
    before moving the new version in. If the process died in between, ``final`` is missing:
    the previous version is moved back. A ``.old`` beside a present ``final`` is leftover
    garbage and is deleted. Called before every swap in ``folder`` and by readers that list
    published partitions, so "the next start" restores the path.
    """
    restored: list[Path] = []
    if not folder.is_dir():
        return restored
    for aside in folder.iterdir():
        name = aside.name
        if not (name.startswith(".") and name.endswith(".old")):
            continue
        final = folder / name[1:-4]
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
            continue
        try:
            os.replace(aside, final)
        except OSError:  # restored by another process first, or a read-only reader
            continue
        restored.append(final)
    if restored:
        fsync_dir(folder)
    return restored


def hidden_temp_dir(parent: Path, prefix: str) -> Path:
    """A new hidden ``<prefix>*.tmp`` directory in ``parent`` with the umask's permissions.

    ``mkdtemp`` makes it 0700, for its owner only; a staging folder on the data root must
    be as open as any folder created there, since what lands in it is published (read by
    a serving user) or written by others (Spark executors running as the workers' user,
    who share a group with the driver's).
    """
    staging = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent))
    staging.chmod(_umask_mode(0o777))
    return staging


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Yield a hidden temporary directory beside ``final``; on success it replaces ``final``.

    The published path is never missing: where the kernel and filesystem support it, the
    new and old directories trade places in one ``renameat2(RENAME_EXCHANGE)`` and the old
    one (now under the staging name) is deleted afterwards. Elsewhere the old directory is
    renamed to ``.final.old`` first; a crash before the new one is in place leaves
    ``final`` missing until :func:`recover_swaps` (run before the next swap in the same
    folder and by the lake's and feature tables' listings) restores the previous version.
    On error the staging directory is removed and ``final`` is untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_swaps(final.parent)
    staging = hidden_temp_dir(final.parent, prefix=f".{final.name}.")
    try:
        yield staging
        for file in staging.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        fsync_dir(staging)
        if not final.exists():
            os.replace(staging, final)
        elif exchange_paths(staging, final):
            fsync_dir(final.parent)
            crash_point("exchanged")
        else:
            aside = _aside(final)
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
            crash_point("aside")
            os.replace(staging, final)
            shutil.rmtree(aside, ignore_errors=True)
        fsync_dir(final.parent)
    finally:
        # after an exchange the staging name holds the previous version; on error, the new one
        shutil.rmtree(staging, ignore_errors=True)


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed so multi-GB artefacts do not load into memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
