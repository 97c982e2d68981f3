"""Crash windows of ``common.atomic.staging_dir``: a process killed between the steps of a
directory swap never leaves the published path missing (atomic exchange), or, on the
fallback for filesystems without RENAME_EXCHANGE, the next start restores the previous
version."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

from common.atomic import CRASH_AT_ENV, NO_EXCHANGE_ENV, exchange_paths, recover_swaps, staging_dir
from features.lake import landed_days
from grank.config import REPO_ROOT

SWAP = """
import sys
from pathlib import Path
from common.atomic import staging_dir
with staging_dir(Path(sys.argv[1])) as staging:
    (staging / "content.txt").write_text("new")
"""


def publish_old(final: Path) -> None:
    with staging_dir(final) as staging:
        (staging / "content.txt").write_text("old")


def swap_in_subprocess(final: Path, **env: str) -> int:
    """Run one swap of ``final`` to "new" in a child process (which the hook may kill)."""
    return subprocess.run(
        [sys.executable, "-c", SWAP, str(final)],
        env={**os.environ, **env},
        cwd=REPO_ROOT,
        check=False,
    ).returncode


def test_exchange_swaps_two_directories(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "from_a").touch()
    assert exchange_paths(tmp_path / "a", tmp_path / "b")
    assert os.listdir(tmp_path / "b") == ["from_a"] and os.listdir(tmp_path / "a") == []


def test_kill_after_the_exchange_leaves_the_new_version_published(tmp_path: Path) -> None:
    final = tmp_path / "lake" / "raw" / "events" / "dt=2024-01-01"
    publish_old(final)
    assert swap_in_subprocess(final, **{CRASH_AT_ENV: "exchanged"}) == 97
    assert (final / "content.txt").read_text() == "new"
    assert swap_in_subprocess(final) == 0
    assert (final / "content.txt").read_text() == "new"


def test_swap_without_a_crash_replaces_and_cleans_up(tmp_path: Path) -> None:
    final = tmp_path / "dt=2024-01-01"
    publish_old(final)
    assert swap_in_subprocess(final) == 0
    assert (final / "content.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dt=2024-01-01"]


@pytest.mark.parametrize("restart", ["swap", "listing"])
def test_fallback_kill_between_steps_is_restored_on_the_next_start(
    tmp_path: Path, restart: str
) -> None:
    lake_dir = tmp_path / "lake"
    final = lake_dir / "raw" / "events" / "dt=2024-01-01"
    publish_old(final)
    killed = swap_in_subprocess(final, **{CRASH_AT_ENV: "aside", NO_EXCHANGE_ENV: "1"})
    assert killed == 97
    # the fallback's window: the old version was parked, the new one not yet in place
    assert not final.exists()
    if restart == "swap":
        assert recover_swaps(final.parent) == [final]
        assert (final / "content.txt").read_text() == "old"
        assert swap_in_subprocess(final, **{NO_EXCHANGE_ENV: "1"}) == 0
        assert (final / "content.txt").read_text() == "new"
    else:
        # a reader's listing restores the previous version: the day is still landed
        assert landed_days(lake_dir) == [date(2024, 1, 1)]
        assert (final / "content.txt").read_text() == "old"
    assert not any(p.name.endswith(".old") for p in final.parent.iterdir())


def test_failed_write_leaves_the_published_version(tmp_path: Path) -> None:
    final = tmp_path / "dt=2024-01-01"
    publish_old(final)
    with pytest.raises(RuntimeError), staging_dir(final) as staging:
        (staging / "content.txt").write_text("half")
        raise RuntimeError("writer failed")
    assert (final / "content.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dt=2024-01-01"]
