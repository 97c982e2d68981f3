"""The global temporal split on a hand-made fixture, with every user and target worked out."""

from __future__ import annotations

from dataclasses import replace
from datetime import date

import numpy as np

from training.data import Timelines
from training.temporal import (
    drop_consecutive_repeats,
    global_temporal_split,
    k_core,
    preprocess,
    quantile_time,
)

S = 1_000_000  # one second in µs


def timelines(rows: dict[int, list[tuple[int, int]]]) -> Timelines:
    """user -> [(second, item), ...] (already in time order)."""
    users = sorted(rows)
    items = [item for u in users for _, item in rows[u]]
    times = [second * S for u in users for second, _ in rows[u]]
    return Timelines(
        user_ids=np.array(users),
        offsets=np.r_[0, np.cumsum([len(rows[u]) for u in users])],
        items=np.array(items),
        times=np.array(times),
        first_target=np.zeros(len(users), dtype=np.int64),
        first_day=date(1970, 1, 1),
        last_day=date(1970, 1, 1),
    )


# T_test = 100 s, and inside the training period T_val = 50 s (given explicitly below)
FIXTURE = {
    # trains up to T_val (10, 20), validates on 60 (its last event <= T_test), tests on 110
    # (last) and 110 alone (successive)
    1: [(10, 1), (20, 2), (60, 3), (110, 4)],
    # one event up to T_test: not a training user; test input is its history before T_test,
    # targets 105 and 120 (successive), 120 (last)
    2: [(30, 5), (105, 6), (120, 7)],
    # nothing up to T_test: its first later event (101) becomes the input, targets 102, 103
    3: [(101, 1), (102, 2), (103, 3)],
    # only one event, after T_test: nothing to predict from
    4: [(150, 4)],
    # trains, no event after T_test: not a test user; last train-period event at 40 < T_val
    5: [(1, 1), (2, 2), (40, 3)],
}


def test_the_split_follows_the_protocol_on_a_hand_made_fixture():
    tl = timelines(FIXTURE)
    split = global_temporal_split(tl, t_test=100 * S, val_quantile=0.9)
    # T_val is the 0.9 quantile of the training-period events (users 1 and 5: 10, 20, 60,
    # 1, 2, 40), linear interpolation: 40 + 0.5 * (60 - 40) = 50 s
    assert split.t_val == 50 * S
    assert split.train_end.tolist() == [3, 0, 0, 0, 3]
    assert split.fit_end.tolist() == [2, 0, 0, 0, 3]
    # validation: user 1 (an event in (T_val, T_test]), target its last one (item 3)
    assert split.validation.users.tolist() == [0]
    assert split.validation.cuts.tolist() == [2]
    assert split.validation.relevant_items.tolist() == [3]
    # last: users 1, 2, 3 (user 4 has no input), each predicting their final event
    last = split.test_last
    assert last.users.tolist() == [0, 1, 2]
    assert last.cuts.tolist() == [3, 2, 2]
    assert last.relevant_items.tolist() == [4, 7, 3]
    # successive: every event after T_test with an input before it, weighted per user
    succ = split.test_successive
    assert list(zip(succ.users.tolist(), succ.cuts.tolist(), strict=True)) == [
        (0, 3),
        (1, 1),
        (1, 2),
        (2, 1),
        (2, 2),
    ]
    assert succ.relevant_items.tolist() == [4, 6, 7, 2, 3]
    assert np.allclose(succ.weights, [1.0, 0.5, 0.5, 0.5, 0.5])
    # the prediction day is each target's own day
    assert succ.days.tolist() == [0] * 5


def test_quantile_matches_pandas_linear_interpolation():
    times = np.array([1, 2, 40, 10, 20, 60]) * S
    assert quantile_time(times, 0.9) == 50 * S
    assert quantile_time(np.array([5]), 0.9) == 5


def test_preprocessing_drops_repeats_and_applies_k_core_iteratively():
    # user 1 repeats item 1 back to back (dropped); after that, item 9 has 1 event: with
    # k=2 it goes, which leaves user 3 with one event: it goes too, and then item 8 (seen
    # only by user 3) had already 1 event
    rows = {
        1: [(1, 1), (2, 1), (3, 2), (4, 1)],
        2: [(1, 1), (2, 2)],
        3: [(1, 9), (2, 8)],
    }
    tl = drop_consecutive_repeats(timelines(rows))
    assert tl.items.tolist() == [1, 2, 1, 1, 2, 9, 8]
    core = k_core(tl, 2)
    assert core.user_ids.tolist() == [1, 2]
    assert core.items.tolist() == [1, 2, 1, 1, 2]
    assert preprocess(timelines(rows), 2).items.tolist() == core.items.tolist()


def test_the_catch_up_learns_only_from_targets_between_t_val_and_t_test():
    """The model is frozen at T_test: the catch-up after the validated fit supervises
    exactly the events in (T_val, T_test], never one after T_test (a leak into the test
    targets) nor the fit's own events again; with no epochs it leaves the model as is."""
    import torch

    from training.config import EvalConfig, FitConfig, GRankConfig, LossWeights
    from training.losses import grank_batch_loss
    from training.model import GRank
    from training.train import catch_up

    tl = timelines(FIXTURE)
    split = global_temporal_split(tl, t_test=100 * S, val_quantile=0.9)
    supervised: set[int] = set()
    loss = grank_batch_loss(LossWeights(hard_negatives=0, ranker_in_batch=True), None)

    def recording(_counts: np.ndarray):
        def batch_loss(model, batch):
            supervised.update(batch.labels[batch.labels > 0].tolist())
            supervised.update(batch.targets.tolist())
            return loss(model, batch)

        return batch_loss

    torch.manual_seed(0)
    model = GRank(
        GRankConfig(n_item_rows=16, dim=8, n_heads=1, n_layers=1, short_seq_len=4, long_seq_len=4)
    )
    before = {name: t.clone() for name, t in model.state_dict().items()}
    spec = EvalConfig(short_len=4, long_len=4, k1=12)
    config = FitConfig(stride=1, next_day_windows=False, progress=False)
    device = torch.device("cpu")
    catch_up(model, recording, tl, split, spec, replace(config, max_epochs=0), device)
    assert supervised == set()
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())

    catch_up(model, recording, tl, split, spec, replace(config, max_epochs=2), device)
    # the only event in (T_val, T_test] = (50 s, 100 s]: user 1's item 3 at 60 s
    assert supervised == {3}
    assert not torch.equal(model.item_vectors(), before["item_embedding.weight"])
