"""The online store never moves a row back in time, and a corrected day does reach it, on the
sqlite store and on the real Redis (own project name, torn down afterwards).

Feast's stores differ here (sqlite overwrites whatever the time, Redis drops a write
that is not strictly newer); features/feature_store.py applies one rule to both.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from features.config import StoreConfig
from features.feature_store import (
    materialize_window,
    online_sequences,
    open_store,
    register,
)
from tests.integration.test_feast_store import (
    DAY1,
    DAY2,
    require_service,
    sequence_of,
    write_feature_tables,
)


def correct_day(features_dir: Path, day: object) -> None:
    """Re-write the day's sequences with other items, same timestamps (a corrected day)."""
    part = features_dir / "user_behavior_sequences" / f"dt={day}" / "part-00000.parquet"
    table = pq.read_table(part)
    fixed = pa.array([[9000 + u, 9999] for u in table["user_id"].to_pylist()], pa.list_(pa.int64()))
    table = table.set_column(table.schema.get_field_index("item_seq"), "item_seq", fixed)
    table = table.set_column(
        table.schema.get_field_index("short_item_seq"), "short_item_seq", fixed
    )
    pq.write_table(table, part)
    users = features_dir / "user_features" / f"dt={day}" / "part-00000.parquet"
    table = pq.read_table(users)
    index = table.schema.get_field_index("events_total")
    pq.write_table(
        table.set_column(index, "events_total", pc.add(table["events_total"], 100)), users
    )


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_reruns_never_go_back_and_corrections_arrive(tmp_path: Path, backend: str) -> None:
    if backend == "redis":
        require_service("127.0.0.1", 6379)
    features_dir = tmp_path / "features"
    write_feature_tables(features_dir, DAY1, [1, 2, 3])
    write_feature_tables(features_dir, DAY2, [1, 2])
    store = open_store(
        StoreConfig(
            repo_dir=tmp_path / "feast",
            project=f"grank_corr_{uuid.uuid4().hex[:8]}",
            online_store=backend,  # type: ignore[arg-type]
        )
    )
    try:
        register(store, features_dir)
        materialize_window(store, features_dir, DAY1, DAY1)
        materialize_window(store, features_dir, DAY2, DAY2)
        # re-running the older day rewrites user 3 (last seen then) but never users 1, 2
        written = materialize_window(store, features_dir, DAY1, DAY1)
        assert written["user_behavior_sequences"] == 1
        found = online_sequences(store, [1, 2, 3])
        assert [found[u]["item_seq"] for u in (1, 2, 3)] == [  # type: ignore[index]
            sequence_of(1, DAY2),
            sequence_of(2, DAY2),
            sequence_of(3, DAY1),
        ]
        # a corrected day (same event timestamps, other values) reaches the store
        shutil.copytree(features_dir, tmp_path / "original")
        correct_day(features_dir, DAY2)
        materialize_window(store, features_dir, DAY2, DAY2)
        found = online_sequences(store, [1, 2, 3])
        assert [found[u]["item_seq"] for u in (1, 2, 3)] == [  # type: ignore[index]
            [9001, 9999],
            [9002, 9999],
            sequence_of(3, DAY1),
        ]
        profile = store.get_online_features(
            features=["user_features:events_total"], entity_rows=[{"user_id": 1}]
        ).to_dict()
        assert profile["events_total"] == [102]
        # and a corrected older day does not undo the newer one
        correct_day(features_dir, DAY1)
        materialize_window(store, features_dir, DAY1, DAY1)
        found = online_sequences(store, [1, 3])
        assert found[1]["item_seq"] == [9001, 9999]  # type: ignore[index]
        assert found[3]["item_seq"] == [9003, 9999]  # type: ignore[index]
    finally:
        store.teardown()
