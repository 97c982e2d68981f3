"""/recommend reading user histories from a real Feast online store (sqlite, file registry)."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np

from features.config import StoreConfig
from features.feature_store import materialize_window, open_store, register
from serving.sequences import FeastUserSource, UserHistory
from tests.integration.test_feast_store import DAY1, sequence_of, times_of, write_feature_tables
from tests.integration.test_serving_app import running_server
from tests.integration.test_snapshots import N_ITEMS, make_refresh, publish


def test_recommend_reads_histories_from_the_feast_online_store(tmp_path: Path) -> None:
    features_dir = tmp_path / "features"
    write_feature_tables(features_dir, DAY1, [1, 2, 3])
    store = open_store(StoreConfig(repo_dir=tmp_path / "feast"))
    register(store, features_dir)
    materialize_window(store, features_dir, DAY1, DAY1)

    source = FeastUserSource(tmp_path / "feast")
    histories = source.get([2, 999])
    expected = tuple(sequence_of(2, DAY1))
    assert histories == {
        2: UserHistory(
            short=expected,
            long=expected,
            event_types=("rating",) * len(expected),
            values=(4.0,) * len(expected),
            times=tuple(times_of(2, DAY1)),
        ),
        999: None,
    }
    # a model trained with features also reads the profile and item features online
    profile = source.get([2], ["events_7d", "gender"])[2]
    assert profile is not None and profile.features == {"events_7d": 1, "gender": "F"}
    assert source.item_features(np.array([1, 2, 99]), ["pop_7d", "age_days"]) == {
        "pop_7d": [7, 3, None],
        "age_days": [0, 0, None],
    }

    publish(tmp_path, make_refresh(tmp_path, seed=1))
    with running_server(tmp_path, source) as url:
        known = httpx.post(f"{url}/recommend", json={"user_id": 2, "k": 5}).json()
        assert known["fallback"] is False and len(known["items"]) == 5
        assert 2 not in [item["item_id"] for item in known["items"]]  # seen item filtered
        unknown = httpx.post(f"{url}/recommend", json={"user_id": 999, "k": 2}).json()
        assert unknown["fallback"] is True
        assert [item["item_id"] for item in unknown["items"]] == [N_ITEMS, N_ITEMS - 1]
