"""The global temporal split on a hand-made fixture, with every user and target worked out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import date

import numpy as np
import pytest
import torch
from torch import nn

from common.errors import UserFacingError
from training.config import EvalConfig, FitConfig, GRankConfig, LossWeights
from training.data import Timelines
from training.losses import BatchLoss, TrainBatch, grank_batch_loss
from training.model import GRank
from training.temporal import (
    catch_up_trial,
    drop_consecutive_repeats,
    global_temporal_split,
    k_core,
    preprocess,
    quantile_time,
)
from training.train import catch_up, choose_catch_up

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


# T_test = 100 s; T_val = 50 s with val_quantile 0.5 (the median of 10, 20, 30, 40 | 60,
# 70, 80, 90, 95, 97): user 1 has five validation events, user 2 two, user 3 none
SPREAD = {
    1: [(10, 1), (20, 2), (60, 3), (70, 4), (80, 5), (90, 6), (95, 7), (120, 8)],
    2: [(30, 2), (40, 3), (97, 9)],
    3: [(5, 1), (6, 2)],
}


def test_validation_spreads_its_targets_over_the_period_and_weighs_each_user_equally():
    tl = timelines(SPREAD)
    last = global_temporal_split(tl, t_test=100 * S, val_quantile=0.5)
    assert last.t_val == 50 * S
    assert last.validation.cuts.tolist() == [6, 2]  # each user's last event up to T_test
    assert np.allclose(last.validation.weights, [1.0, 1.0])
    spread = global_temporal_split(tl, t_test=100 * S, val_quantile=0.5, val_targets=3)
    # user 1: three of positions 2..6, evenly spaced and ending on the last; user 2: its
    # only one (a validation user's input always holds an event)
    assert spread.validation.users.tolist() == [0, 0, 0, 1]
    assert spread.validation.cuts.tolist() == [2, 4, 6, 2]
    assert spread.validation.relevant_items.tolist() == [3, 5, 7, 9]
    assert np.allclose(spread.validation.weights, [1 / 3, 1 / 3, 1 / 3, 1.0])
    every = global_temporal_split(tl, t_test=100 * S, val_quantile=0.5, val_targets=99)
    assert every.validation.cuts.tolist() == [2, 3, 4, 5, 6, 2]
    # the rest of the split does not depend on the validation targets
    assert every.test_successive.cuts.tolist() == last.test_successive.cuts.tolist()
    assert every.fit_end.tolist() == last.fit_end.tolist() == [2, 2, 2]
    with pytest.raises(UserFacingError, match="val_targets"):
        global_temporal_split(tl, t_test=100 * S, val_quantile=0.5, val_targets=0)


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


# ----------------------------------------------------------- the catch-up to T_test
TINY = GRankConfig(n_item_rows=16, dim=8, n_heads=1, n_layers=1, short_seq_len=4, long_seq_len=4)
SPEC = EvalConfig(short_len=4, long_len=4, k1=12)
CPU = torch.device("cpu")


def recording_loss() -> tuple[set[int], Callable[[np.ndarray], BatchLoss]]:
    """A real GRank loss that also records every item it supervises (labels and targets)."""
    supervised: set[int] = set()
    loss = grank_batch_loss(LossWeights(hard_negatives=0, ranker_in_batch=True), None)

    def make_loss(_counts: np.ndarray) -> BatchLoss:
        def batch_loss(model: nn.Module, batch: TrainBatch) -> torch.Tensor:
            supervised.update(batch.labels[batch.labels > 0].tolist())
            supervised.update(batch.targets.tolist())
            return loss(model, batch)

        return batch_loss

    return supervised, make_loss


def tiny_model() -> GRank:
    torch.manual_seed(0)
    return GRank(TINY)


def weights_of(model: GRank) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in model.state_dict().items()}


def same_weights(model: GRank, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(t, before[name]) for name, t in model.state_dict().items())


# Inside the training period (T_test = 100 s) T_val is 45 s with val_quantile 0.5: the
# median of 10, 15, 20, 30 | 60, 70, 80, 90. The catch-up's period (45 s, 100 s] holds 60,
# 70, 80 and 90, so T_mid = 75 s: the trial catches up on 60 and 70 and is judged on 80
# and 90 (user 1 picks the item user 2 picked at 70 s; user 2 one nobody picked before).
TRIAL = {
    1: [(10, 1), (20, 2), (60, 3), (80, 8), (110, 5)],
    2: [(15, 6), (30, 7), (70, 8), (90, 9)],
}


def test_the_catch_up_trial_splits_the_catch_ups_period_at_its_median():
    tl = timelines(TRIAL)
    split = global_temporal_split(tl, t_test=100 * S, val_quantile=0.5)
    assert split.t_val == 45 * S
    assert split.fit_end.tolist() == [2, 2] and split.train_end.tolist() == [4, 4]
    trial, queries = catch_up_trial(tl, split)
    assert trial.fit_end.tolist() == [2, 2]
    assert trial.train_end.tolist() == [3, 3]  # up to T_mid = 75 s: 60 s and 70 s
    assert trial.validation == split.validation and trial.t_test == split.t_test
    # judged on each later event up to T_test (80 s, 90 s; not 110 s), from all before it
    assert queries.users.tolist() == [0, 1] and queries.cuts.tolist() == [3, 3]
    assert queries.relevant_items.tolist() == [8, 9]
    assert np.allclose(queries.weights, [1.0, 1.0])
    # nothing in the period after T_mid: no queries (the choice falls back, unscored)
    _, none = catch_up_trial(tl, replace(split, train_end=np.array([3, 2])))
    assert len(none) == 0


def test_the_catch_up_is_chosen_on_the_trial_and_leaves_the_fitted_model_as_it_was():
    """The choice trains only on (T_val, T_mid], never on the events it is judged on
    (after T_mid) nor on the test period; every choice starts from the same fitted
    weights, which the model still holds afterwards."""
    tl = timelines(TRIAL)
    split = global_temporal_split(tl, t_test=100 * S, val_quantile=0.5)
    supervised, recording = recording_loss()
    model = tiny_model()
    before = weights_of(model)
    config = FitConfig(stride=1, next_day_windows=False, progress=False, lr=0.05)
    assert choose_catch_up(model, recording, tl, split, SPEC, config, (2,), CPU) == (2, {})
    assert supervised == set()

    chosen, scores = choose_catch_up(model, recording, tl, split, SPEC, config, (3, 0, 1), CPU)
    assert supervised == {3, 8}  # items at 60 s and 70 s, not 9 at 90 s
    assert set(scores) == {"0", "1", "3"}
    assert scores["3"] > scores["0"]  # user 1's item at 80 s was learned from user 2
    best = max(scores.values())
    assert scores[str(chosen)] == best
    assert chosen == min(int(e) for e, v in scores.items() if v == best)
    assert same_weights(model, before)
    # a catch-up that learns nothing ties everywhere: the fewest epochs win the tie
    frozen = replace(config, lr=0.0)
    chosen, scores = choose_catch_up(model, recording, tl, split, SPEC, frozen, (2, 1), CPU)
    assert chosen == 1 and scores["1"] == scores["2"]


def test_the_catch_up_learns_only_from_targets_between_t_val_and_t_test():
    """The model is frozen at T_test: the catch-up after the validated fit supervises
    exactly the events in (T_val, T_test], never one after T_test (a leak into the test
    targets) nor the fit's own events again; with no epochs it leaves the model as is."""
    tl = timelines(FIXTURE)
    split = global_temporal_split(tl, t_test=100 * S, val_quantile=0.9)
    supervised, recording = recording_loss()
    model = tiny_model()
    before = weights_of(model)
    config = FitConfig(stride=1, next_day_windows=False, progress=False)
    catch_up(model, recording, tl, split, SPEC, replace(config, max_epochs=0), CPU)
    assert supervised == set()
    assert same_weights(model, before)

    catch_up(model, recording, tl, split, SPEC, replace(config, max_epochs=2), CPU)
    # the only event in (T_val, T_test] = (50 s, 100 s]: user 1's item 3 at 60 s
    assert supervised == {3}
    assert not torch.equal(model.item_vectors(), before["item_embedding.weight"])
