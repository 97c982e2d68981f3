"""Serving ranks exactly as evaluation measures: same seen filter, same inputs, same order.

A model that reads every feature group is published as a snapshot; one user with a history
longer than the online long sequence asks /recommend's pipeline (the Recommender) for the
whole catalogue, and evaluation ranks the same user on the same day with the training
readers. Both must return the same items in the same order, and both must filter exactly
the items of the long sequence (an item seen only before it stays recommendable).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import torch

from features.lake import US_PER_DAY
from serving.bundle import load_snapshot, refresh_embeddings
from serving.recommender import Recommender, RecRequest
from serving.sequences import StaticUserSource, UserHistory
from serving.snapshots import publish_snapshot
from training.checkpoint import save_checkpoint
from training.data import Queries, Timelines, day_number
from training.evaluate import EvalConfig, EvalInputs, rankings
from training.features import FeatureHistory
from training.inputs import (
    BehaviorRule,
    InputSpec,
    event_codes,
    hash_category,
    scale_numeric,
    standardize_items,
)
from training.model import GRank, GRankConfig

N_ITEMS, SHORT, LONG = 60, 4, 8
DAY = date(2000, 12, 31)
SPEC = InputSpec(
    behaviors=(BehaviorRule("liked", ("rating",), min_value=4.0),),
    user_numeric=("events_7d",),
    user_categorical=("gender",),
    item_numeric=("pop_7d",),
)


# the weights as validation chose them travel with the model; a model whose Ranker reads
# no item feature still reads its popularity prior's column
@pytest.mark.parametrize(
    ("ranker_weight", "prior_weight", "spec"),
    [
        (1.0, 0.0, SPEC),
        (0.5, 0.0, SPEC),
        (0.5, 1.0, replace(SPEC, item_numeric=(), popularity_prior="pop_7d")),
        (1.0, 0.0, replace(SPEC, time_gaps=True)),
    ],
)
def test_serving_and_evaluation_rank_the_same_items_in_the_same_order(
    tmp_path: Path, ranker_weight: float, prior_weight: float, spec: InputSpec
) -> None:
    torch.manual_seed(0)
    config = GRankConfig(
        n_item_rows=N_ITEMS + 1,
        dim=16,
        n_layers=1,
        n_heads=2,
        short_seq_len=SHORT,
        long_seq_len=LONG,
        dropout=0.0,
        inputs=spec,
        ranker_residual=True,
        ranker_weight=ranker_weight,
        prior_weight=prior_weight,
    )
    model = GRank(config).eval()
    checkpoint = tmp_path / "checkpoint"
    save_checkpoint(model, checkpoint, {})
    catalogue = list(range(1, N_ITEMS + 1))
    refresh_embeddings(checkpoint, tmp_path / "emb", catalogue, catalogue, progress=False)
    version = publish_snapshot(tmp_path / "snapshots", tmp_path / "emb", DAY, {}, keep=2)
    pop_7d = {i: (i * 7) % 13 for i in catalogue}
    # 12 events: items 1..12; only the last LONG=8 (5..12) are online, so 1..4 stay
    # recommendable on both sides
    items = list(range(1, 13))
    values = [5.0, 1.0] * 6
    # on the day before DAY, gaps of a second to hours apart
    gaps_s = [0, 2, 40, 700, 3000, 90, 5, 20000, 1, 600, 10, 30000]
    times = ((day_number(DAY) - 1) * US_PER_DAY + np.cumsum(gaps_s) * 1_000_000).tolist()
    history = UserHistory(
        short=tuple(items[-SHORT:]),
        long=tuple(items[-LONG:]),
        event_types=("rating",) * LONG,
        values=tuple(values[-LONG:]),
        times=tuple(times[-LONG:]),
        features={"events_7d": 3, "gender": "F"},
    )
    source = StaticUserSource({7: history}, {"pop_7d": pop_7d})
    snapshot = load_snapshot(tmp_path / "snapshots" / version, items=source)
    (served,) = Recommender(lambda: snapshot, source, N_ITEMS, True).recommend_batch(
        [RecRequest(7, N_ITEMS)]
    )

    # evaluation: the same user, a prediction on DAY with the same features as of DAY-1
    timelines = Timelines(
        user_ids=np.array([7]),
        offsets=np.array([0, len(items)]),
        items=np.array(items),
        times=np.array(times),
        first_target=np.zeros(1, dtype=np.int64),
        first_day=DAY,
        last_day=DAY,
        kinds=np.zeros(len(items), dtype=np.int16),
        values=np.array(values, dtype=np.float32),
        kind_names=("rating",),
    )
    queries = Queries(
        np.array([0]),
        np.array([len(items)]),
        np.array([0, 0]),
        np.zeros(0, np.int64),
        np.array([day_number(DAY)]),
    )
    item_table = np.zeros((2, N_ITEMS + 1, 1), np.float32)
    item_table[1, 1:, 0] = scale_numeric(np.array([pop_7d[i] for i in catalogue], float))
    item_table[1] = standardize_items(item_table[1])
    features = FeatureHistory(
        spec=spec,
        first_day=day_number(DAY) - 1,
        user_ids=np.array([7]),
        user_numeric=np.array(
            [[[0.0], [0.0]], [[0.0], scale_numeric(np.array([3.0]))]], np.float32
        ),
        user_categorical=np.array([[[0], [0]], [[0], [hash_category("gender", "F", 1024)]]]),
        item_table=torch.as_tensor(item_table),
    )
    codes = event_codes(spec, np.array(["rating"] * 12, object), np.array(values), np.array(times))
    servable = np.ones(N_ITEMS + 1, dtype=bool)
    ranked = rankings(
        model,
        timelines,
        queries,
        EvalConfig(SHORT, LONG, k1=N_ITEMS, seen_len=LONG),
        torch.device("cpu"),
        EvalInputs(features, codes, servable),
    )["rank"][0]
    evaluated = [int(i) for i in ranked if int(i) != 0]
    assert served.items == evaluated[: len(served.items)]
    assert len(served.items) == N_ITEMS - LONG  # exactly the long sequence was filtered
    assert {1, 2, 3, 4} <= set(served.items)  # seen before the long sequence: recommendable
