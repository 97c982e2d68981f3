"""The raw event lake: schema, idempotent landing, tie-break order, bad dates and roots."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from common.errors import UserFacingError
from features import lake
from features.datasets import load_events
from grank.config import Settings
from tests.conftest import land_dataset, make_settings


def _partition_digest(settings: Settings, day: date) -> str:
    folder = lake.partition_dir(settings.lake_dir, day)
    digest = hashlib.sha256()
    for file in sorted(folder.rglob("*")):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def test_full_ml100k_lake_has_every_event(ml100k_settings: Settings) -> None:
    days = lake.landed_days(ml100k_settings.lake_dir)
    assert len(days) == 213
    total = sum(lake.read_partition(ml100k_settings.lake_dir, d).num_rows for d in days)
    assert total == 100_000
    table = lake.read_partition(ml100k_settings.lake_dir, days[0])
    assert table.schema.equals(lake.EVENT_SCHEMA)
    ts = table["event_timestamp"].cast(pa.int64()).to_numpy()
    assert ((ts // lake.US_PER_DAY) == (days[0] - lake.EPOCH).days).all()
    ingestion = table["ingestion_time"].cast(pa.int64()).to_numpy()
    assert (ingestion == lake.day_start_us(days[0]) + lake.US_PER_DAY).all()


def test_landing_twice_writes_identical_bytes(tmp_path: Path, datasets_dir: Path) -> None:
    settings = make_settings(tmp_path)
    day = date(1998, 3, 1)
    land_dataset(settings, datasets_dir, day, day)
    first = _partition_digest(settings, day)
    land_dataset(settings, datasets_dir, day, day)
    assert _partition_digest(settings, day) == first
    files = sorted(f.name for f in lake.partition_dir(settings.lake_dir, day).iterdir())
    assert files == [lake.MARKER_FILE, "part-00000.parquet"]  # the marker, written last
    assert not [p for p in lake.events_dir(settings.lake_dir).iterdir() if p.name.startswith(".")]


def test_equal_timestamps_are_ordered_by_event_id(datasets_dir: Path) -> None:
    events = lake.to_lake_events(load_events("ml-1m", datasets_dir))
    ts = events["event_timestamp"].cast(pa.int64()).to_numpy()
    ids = events["event_id"].to_numpy()
    users = events["user_id"].to_numpy()
    assert (np.diff(ts) >= 0).all()
    same_second = np.diff(ts) == 0
    assert same_second.sum() > 100_000  # ML-1M is full of same-second ratings
    assert (np.diff(ids)[same_second] > 0).all()
    # The documented example: user 1's same-second ratings keep their source row order.
    mine = np.flatnonzero(users == 1)
    pairs = [(ts[i], ids[i]) for i in mine]
    assert pairs == sorted(pairs)


def test_single_day_errors_name_the_problem(tmp_path: Path, datasets_dir: Path) -> None:
    settings = make_settings(tmp_path)
    events = lake.to_lake_events(load_events("ml-100k", datasets_dir))
    outside = r"outside the dataset's days 1997-09-20\.\.1998-04-22"
    with pytest.raises(UserFacingError, match=outside):
        lake.land_days(
            settings.lake_dir, events, date(1990, 1, 1), date(1990, 1, 1), require_events=True
        )
    with pytest.raises(UserFacingError, match="no events on 1997-12-11"):
        lake.land_days(
            settings.lake_dir, events, date(1997, 12, 11), date(1997, 12, 11), require_events=True
        )
    assert lake.landed_days(settings.lake_dir) == []


def test_range_skips_empty_days(tmp_path: Path, datasets_dir: Path) -> None:
    settings = make_settings(tmp_path)
    report = land_dataset(settings, datasets_dir, date(1997, 12, 10), date(1997, 12, 12))
    assert report.empty_days == [date(1997, 12, 11)]
    assert lake.landed_days(settings.lake_dir) == [date(1997, 12, 10), date(1997, 12, 12)]


def test_a_lake_refuses_a_second_dataset(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    lake.claim_lake(settings.lake_dir, "ml-100k")
    with pytest.raises(UserFacingError, match="already holds 'ml-100k'"):
        lake.claim_lake(settings.lake_dir, "ml-1m")


def test_non_directory_data_root_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserFacingError, match="not writable"):
        lake.claim_lake(blocker / "lake", "ml-100k")


def _grank(
    settings: Settings, *args: str, user: int | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GRANK_DATA_ROOT": str(settings.data_root), "GRANK_DATASET": "ml-100k"}
    cmd = [sys.executable, "-m", "grank", *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)


def test_cli_bad_dates_get_one_error_line(tmp_path: Path, datasets_dir: Path) -> None:
    settings = make_settings(tmp_path)
    (tmp_path / "datasets").symlink_to(datasets_dir)
    result = _grank(settings, "data", "land", "--date", "1999-01-01")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: date range 1999-01-01..1999-01-01 is outside the input's days"
        " 1997-09-20..1998-04-22"
    ]
    result = _grank(settings, "data", "land", "--date", "1998-13-01")
    assert result.returncode == 2
    assert "'1998-13-01' is not a date in YYYY-MM-DD form" in result.stderr
    result = _grank(settings, "data", "land", "--date", "1998-03-01")
    assert result.returncode == 0, result.stderr
    assert "landed 192 events in 1 partitions" in result.stdout


def _unprivileged_python_runs() -> bool:
    """Root ignores file modes, so this test drops to ``nobody``, who must reach our venv."""
    if os.geteuid() != 0 or not Path("/usr/bin/setpriv").exists():
        return False
    probe = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        sys.executable,
        "-c",
        "import grank.cli",
    ]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(
    not _unprivileged_python_runs(),
    reason="needs root and a checkout the unprivileged user can read",
)
def test_cli_unwritable_data_root_is_refused(datasets_dir: Path) -> None:
    # pytest's tmp folders are private to root, so the unprivileged user gets its own.
    base = Path(tempfile.mkdtemp(prefix="grank-ro-"))
    try:
        root = base / "readonly"
        shutil.copytree(datasets_dir / "ml-100k", root / "datasets" / "ml-100k")
        base.chmod(0o755)
        for folder in (root, root / "datasets", root / "datasets" / "ml-100k"):
            folder.chmod(0o555)
        result = _grank(make_settings(root), "data", "land", "--date", "1998-03-01", user=65534)
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip().splitlines() == [f"error: data root is not writable: {root}"]
        assert sorted(p.name for p in root.iterdir()) == ["datasets"]
    finally:
        for folder in base.rglob("*"):
            if folder.is_dir():
                folder.chmod(0o755)
        shutil.rmtree(base)
