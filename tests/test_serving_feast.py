"""/recommend reading user histories from a real Feast online store (sqlite, file registry)."""

from __future__ import annotations

from pathlib import Path

import httpx

from features.feature_store import StoreConfig, materialize_window, open_store, register
from serving.sequences import FeastSequenceSource, UserSequences
from tests.test_feast_store import DAY1, sequence_of, write_feature_tables
from tests.test_serving_app import running_server
from tests.test_snapshots import N_ITEMS, make_refresh, publish


def test_recommend_reads_histories_from_the_feast_online_store(tmp_path: Path) -> None:
    features_dir = tmp_path / "features"
    write_feature_tables(features_dir, DAY1, [1, 2, 3])
    store = open_store(StoreConfig(repo_dir=tmp_path / "feast"))
    register(store, features_dir)
    materialize_window(store, features_dir, DAY1, DAY1)

    source = FeastSequenceSource(tmp_path / "feast")
    histories = source.get([2, 999])
    expected = tuple(sequence_of(2, DAY1))
    assert histories == {2: UserSequences(short=expected, long=expected), 999: None}

    publish(tmp_path, make_refresh(tmp_path, seed=1))
    with running_server(tmp_path, source) as url:
        known = httpx.post(f"{url}/recommend", json={"user_id": 2, "k": 5}).json()
        assert known["fallback"] is False and len(known["items"]) == 5
        assert 2 not in [item["item_id"] for item in known["items"]]  # seen item filtered
        unknown = httpx.post(f"{url}/recommend", json={"user_id": 999, "k": 2}).json()
        assert unknown["fallback"] is True
        assert [item["item_id"] for item in unknown["items"]] == [N_ITEMS, N_ITEMS - 1]
