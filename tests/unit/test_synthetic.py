"""Synthetic scale data: same schema as the lake, deterministic by seed, bounded chunks."""

from __future__ import annotations

import hashlib
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from common.errors import UserFacingError
from features import lake
from features.synthetic import SyntheticSpec, generate

SPEC = SyntheticSpec(
    users=2_000,
    items=5_000,
    events=30_000,
    days=3,
    start=date(2024, 1, 1),
    seed=7,
    chunk_events=4_000,
)


def _lake_digest(lake_dir: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(lake.events_dir(lake_dir).rglob("*.parquet")):
        digest.update(str(file.relative_to(lake_dir)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    assert generate(SPEC, tmp_path / "a") == 30_000
    generate(SPEC, tmp_path / "b")
    generate(SyntheticSpec(**{**SPEC.__dict__, "seed": 8}), tmp_path / "c")
    assert _lake_digest(tmp_path / "a") == _lake_digest(tmp_path / "b")
    assert _lake_digest(tmp_path / "a") != _lake_digest(tmp_path / "c")


def test_schema_days_chunks_and_popularity_skew(tmp_path: Path) -> None:
    generate(SPEC, tmp_path)
    days = lake.landed_days(tmp_path)
    assert days == [date(2024, 1, 1), date(2024, 1, 2), date(2024, 1, 3)]
    # 10,000 events a day in chunks of at most 4,000 rows: three part files a day.
    assert len(list(lake.partition_dir(tmp_path, days[0]).glob("part-*.parquet"))) == 3
    tables = [lake.read_partition(tmp_path, d) for d in days]
    events = pa.concat_tables(tables)
    assert events.schema.equals(lake.EVENT_SCHEMA)
    assert sorted(events["event_id"].to_pylist()) == list(range(30_000))
    for day, table in zip(days, tables, strict=True):
        ts = table["event_timestamp"].cast(pa.int64()).to_numpy()
        assert ((ts // lake.US_PER_DAY) == (day - lake.EPOCH).days).all()
    items = events["item_id"].to_numpy()
    assert items.min() >= 1 and items.max() <= SPEC.items
    counts = np.sort(np.bincount(items))[::-1]
    top_one_percent = counts[: SPEC.items // 100].sum() / counts.sum()
    assert top_one_percent > 0.1  # Zipf-like head: 1% of items take >10% of events


def test_bad_sizes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UserFacingError, match="must all be positive"):
        generate(SyntheticSpec(**{**SPEC.__dict__, "events": 0}), tmp_path)
    assert not tmp_path.joinpath("raw").exists()
