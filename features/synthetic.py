"""Synthetic events with the lake's schema, for scale benchmarks only (never instead of real data).

Shape of the data, chosen to stress the same code paths as real logs:
- item popularity is Zipf-like (a few items take most events, a long tail takes the rest);
- user activity is Zipf-like too (heavy users and one-visit users);
- events come in sessions: a user picks a topic (a contiguous block of item ids) and
  draws several items from it, mixed with globally popular items, a few seconds apart.

Deterministic by seed: every day draws from ``numpy.random.default_rng([seed, day_index])``,
so day D is the same whether generated alone or in a range. Memory is bounded by
``chunk_events`` rows: a day larger than that is written as several part files.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.atomic import staging_dir
from common.errors import UserFacingError
from features.lake import (
    EPOCH,
    EVENT_SCHEMA,
    ITEM_SCHEMA,
    PARQUET_OPTIONS,
    US_PER_DAY,
    USER_SCHEMA,
    day_start_us,
    land_dimensions,
    partition_dir,
    write_marker,
)


@dataclass(frozen=True)
class SyntheticSpec:
    """Size and shape of a synthetic lake."""

    users: int
    items: int
    events: int
    days: int
    start: date
    seed: int = 0
    zipf_items: float = 1.1
    zipf_users: float = 1.05
    mean_session_len: float = 8.0
    topic_size: int = 200
    chunk_events: int = 2_000_000

    def validate(self) -> None:
        if min(self.users, self.items, self.events, self.days) <= 0:
            raise UserFacingError("synthetic users, items, events and days must all be positive")
        if self.chunk_events < 1000:
            raise UserFacingError("chunk_events must be at least 1000")


def _zipf_cdf(n: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def _day_chunk(
    spec: SyntheticSpec,
    rng: np.random.Generator,
    n: int,
    day: date,
    first_event_id: int,
    item_cdf: np.ndarray,
    user_cdf: np.ndarray,
    item_perm: np.ndarray,
    user_perm: np.ndarray,
) -> pa.Table:
    """``n`` events of ``day``: sessions of topic-local and popular items, sorted by time."""
    sessions = max(1, round(n / spec.mean_session_len))
    session_of = np.sort(rng.integers(0, sessions, size=n))
    session_user = user_perm[np.searchsorted(user_cdf, rng.random(sessions))]
    session_start = rng.integers(0, US_PER_DAY - 3_600_000_000, size=sessions)
    session_topic = rng.integers(0, max(1, spec.items // spec.topic_size), size=sessions)
    popular = item_perm[np.searchsorted(item_cdf, rng.random(n))]
    local = session_topic[session_of] * spec.topic_size + rng.integers(0, spec.topic_size, size=n)
    from_topic = rng.random(n) < 0.6
    items = np.where(from_topic, np.minimum(local, spec.items - 1), popular) + 1
    offset = np.cumsum(rng.integers(1_000_000, 60_000_000, size=n))
    first_of_session = np.searchsorted(session_of, session_of)
    within = offset - offset[first_of_session] + rng.integers(0, 1000, size=n)
    ts = day_start_us(day) + np.minimum(session_start[session_of] + within, US_PER_DAY - 1)
    order = np.argsort(ts, kind="stable")
    ingestion = day_start_us(day + timedelta(days=1))
    return pa.table(
        {
            "event_id": pa.array(first_event_id + np.arange(n), pa.int64()),
            "user_id": pa.array(session_user[session_of][order] + 1, pa.int64()),
            "item_id": pa.array(items[order], pa.int64()),
            "event_type": pa.array(np.where(rng.random(n) < 0.8, "click", "rating"), pa.string()),
            "value": pa.array(rng.integers(1, 6, size=n).astype(np.float32), pa.float32()),
            "event_timestamp": pa.array(ts[order], pa.timestamp("us", tz="UTC")),
            "ingestion_time": pa.array(np.full(n, ingestion), pa.timestamp("us", tz="UTC")),
        },
        schema=EVENT_SCHEMA,
    )


def generate(spec: SyntheticSpec, lake_dir: Path) -> int:
    """Write ``spec.days`` partitions and the dimension tables; returns the events written."""
    spec.validate()
    base = np.random.default_rng(spec.seed)
    item_perm = base.permutation(spec.items)
    user_perm = base.permutation(spec.users)
    item_cdf = _zipf_cdf(spec.items, spec.zipf_items)
    user_cdf = _zipf_cdf(spec.users, spec.zipf_users)
    per_day = np.full(spec.days, spec.events // spec.days)
    per_day[: spec.events % spec.days] += 1
    written = 0
    for offset_days, day_events in enumerate(per_day):
        day = spec.start + timedelta(days=offset_days)
        rng = np.random.default_rng([spec.seed, (day - EPOCH).days])
        with staging_dir(partition_dir(lake_dir, day)) as staging:
            remaining, part = int(day_events), 0
            while remaining > 0:
                n = min(remaining, spec.chunk_events)
                chunk = _day_chunk(
                    spec, rng, n, day, written, item_cdf, user_cdf, item_perm, user_perm
                )
                pq.write_table(chunk, staging / f"part-{part:05d}.parquet", **PARQUET_OPTIONS)
                written, remaining, part = written + n, remaining - n, part + 1
            write_marker(staging, day)
    dim_rng = np.random.default_rng([spec.seed, 0, 0])  # 3 words: never a day seed
    items = pa.table(
        {
            "item_id": pa.array(np.arange(1, spec.items + 1), pa.int64()),
            "title": pa.array([f"item-{i}" for i in range(1, spec.items + 1)]),
            "year": pa.array(dim_rng.integers(1950, 2025, size=spec.items).astype(np.int32)),
            "genres": pa.array(
                np.array(["Drama", "Comedy", "Action|Thriller", "Animation"])[
                    dim_rng.integers(0, 4, size=spec.items)
                ]
            ),
        },
        schema=ITEM_SCHEMA,
    )
    users = pa.table(
        {
            "user_id": pa.array(np.arange(1, spec.users + 1), pa.int64()),
            "age": pa.array(dim_rng.integers(18, 70, size=spec.users).astype(np.int32)),
            "gender": pa.array(np.where(dim_rng.random(spec.users) < 0.5, "F", "M")),
            "occupation": pa.array(dim_rng.integers(0, 21, size=spec.users).astype(str)),
            "zip": pa.array(dim_rng.integers(10000, 99999, size=spec.users).astype(str)),
        },
        schema=USER_SCHEMA,
    )
    land_dimensions(lake_dir, items, users)
    return written
