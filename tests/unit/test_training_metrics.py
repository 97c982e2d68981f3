"""Metric functions, in-batch candidates and splits against hand-computed cases."""

from __future__ import annotations

import math
from datetime import date

import numpy as np
import pytest
import torch

from common.errors import UserFacingError
from features.lake import US_PER_DAY
from training.data import (
    Timelines,
    day_number,
    from_day_start,
    leave_last_out,
    make_windows,
    next_day,
    single_target_queries,
)
from training.losses import (
    LossWeights,
    generator_hard_negatives,
    in_batch_candidates,
    softmax_first,
)
from training.metrics import ranking_metrics, user_bootstrap_interval


def test_recall_and_ndcg_single_relevant():
    ranked = np.array([[5, 3, 9, 1], [2, 4, 6, 8], [7, 1, 2, 3]])
    offsets = np.array([0, 1, 2, 3])
    relevant = np.array([3, 8, 11])  # rank 2, rank 4, absent
    out = ranking_metrics(ranked, offsets, relevant, (1, 2, 4, 10), (2, 4))
    assert out["recall@1"] == 0.0
    assert out["recall@2"] == pytest.approx(1 / 3)
    assert out["recall@4"] == pytest.approx(2 / 3)
    assert "recall@10" not in out  # deeper than the lists
    assert out["ndcg@2"] == pytest.approx((1 / math.log2(3)) / 3)
    assert out["ndcg@4"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / 3)


def test_intervals_resample_users_not_queries():
    # two users, 50 queries each, one always hit and one never: the mean is 0.5, but two
    # users are all the evidence there is, so the interval spans both of them
    values = np.r_[np.ones(50), np.zeros(50)]
    users = np.r_[np.zeros(50, dtype=int), np.ones(50, dtype=int)]
    assert user_bootstrap_interval(values, users) == (0.0, 1.0)
    low, high = user_bootstrap_interval(values, np.arange(100))  # 100 users, one each
    assert 0.35 < low < 0.5 < high < 0.65
    # per-user weights (1/n each) give every user one vote, whatever their query count
    weighted = ranking_metrics(
        np.array([[1], [1], [1], [2]]),
        np.arange(5),
        np.array([1, 1, 1, 1]),
        (1,),
        (),
        np.array([1 / 3, 1 / 3, 1 / 3, 1.0]),
        np.array([7, 7, 7, 9]),
    )
    assert weighted["recall@1"] == pytest.approx(0.5)
    assert (weighted["recall@1.low"], weighted["recall@1.high"]) == (0.0, 1.0)
    assert user_bootstrap_interval(np.full(10, 0.25), np.arange(10)) == (0.25, 0.25)


def test_recall_and_ndcg_several_relevant():
    ranked = np.array([[1, 2, 3, 4]])
    out = ranking_metrics(ranked, np.array([0, 3]), np.array([2, 4, 9]), (2, 4), (2, 4))
    assert out["recall@2"] == pytest.approx(1 / 3)
    assert out["recall@4"] == pytest.approx(2 / 3)
    ideal2 = 1 + 1 / math.log2(3)
    assert out["ndcg@2"] == pytest.approx((1 / math.log2(3)) / ideal2)
    ideal4 = ideal2 + 1 / math.log2(4)
    assert out["ndcg@4"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / ideal4)


def test_in_batch_candidates_mask_duplicates_of_the_positive():
    targets = torch.tensor([7, 8, 7, 9])
    candidates, collides = in_batch_candidates(targets, 3)
    assert candidates.tolist() == [[7, 8, 7], [8, 7, 9], [7, 9, 7], [9, 7, 8]]
    assert collides.tolist() == [
        [False, False, True],
        [False, False, False],
        [False, False, True],
        [False, False, False],
    ]
    logits = torch.tensor([[2.0, 1.0, 50.0]])
    loss = softmax_first(logits, torch.tensor([[False, False, True]]))
    assert float(loss) == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + math.exp(1))))


def test_hard_negatives_come_from_the_generator_top_and_never_the_target():
    # item i scores i for user 0 and -i for user 1 (rows 1..9; row 0 is padding)
    table = torch.arange(10, dtype=torch.float32)[:, None]
    users = torch.tensor([[1.0], [-1.0]])
    targets = torch.tensor([[9], [5]])
    torch.manual_seed(0)
    drawn, reaches_ranker = generator_hard_negatives(
        users, table, targets, LossWeights(hard_negatives=200, hard_pool=3)
    )
    assert drawn.shape == (2, 200)
    # user 0: the top 3 are 9, 8, 7, so its target 9 is drawn against 8 and 7;
    # user 1: 1, 2, 3 (never 5 or padding)
    assert set(drawn[0].tolist()) == {8, 7}
    assert set(drawn[1].tolist()) == {1, 2, 3}
    # user 0's target is its best item; user 1's ranks 5th, outside the top 3
    assert reaches_ranker.tolist() == [[True], [False]]


def timelines(seqs: list[list[int]], days: list[list[int]], first_target: list[int]) -> Timelines:
    return Timelines(
        user_ids=np.arange(1, len(seqs) + 1),
        offsets=np.r_[0, np.cumsum([len(s) for s in seqs])],
        items=np.concatenate([np.array(s) for s in seqs]),
        times=np.concatenate([np.array(d) for d in days]) * US_PER_DAY,
        first_target=np.array(first_target),
        first_day=date(2000, 1, 1),
        last_day=date(2000, 1, 3),
    )


def test_splits_handle_users_with_one_or_two_events():
    d = day_number(date(2000, 1, 1))
    tl = timelines([[1, 2, 3, 4], [5], [6, 7]], [[d] * 4, [d], [d, d]], [0, 0, 0])
    train_end, val, test = leave_last_out(tl)
    assert train_end.tolist() == [2, 1, 1]
    assert val.users.tolist() == [0] and val.relevant_items.tolist() == [3]
    assert test.users.tolist() == [0, 2] and test.relevant_items.tolist() == [4, 7]
    windows = make_windows(
        tl, train_end, short_len=3, long_len=4, stride=3, rng=np.random.default_rng(0)
    )
    # every training target is supervised; the one-event user trains from an empty history
    assert sorted(windows.targets.tolist()) == [2, 5, 6]
    assert windows.short[windows.targets.tolist().index(5)].tolist() == [0, 0, 0]
    assert windows.labels[windows.targets.tolist().index(2)].tolist() == [0, 0, 2]


def test_next_day_split_and_pre_window_history_is_not_a_target():
    d = day_number(date(2000, 1, 2))
    # user 0: 2 history items from before the window, one event on day d-1, two on day d
    tl = timelines([[1, 2, 3, 4, 5], [6, 7]], [[-1, -1, d - 1, d, d], [d, d]], [2, 0])
    train_end, val, test = next_day(tl, date(2000, 1, 2))
    assert train_end.tolist() == [3, 0]
    assert len(val) == 0  # one in-window training event is kept for training, not validation
    assert test.users.tolist() == [0]  # user 1 has no history before the test day
    assert test.relevant_items.tolist() == [4, 5]
    windows = make_windows(tl, train_end, 4, 4, 4, np.random.default_rng(0))
    assert windows.labels.tolist() == [[0, 0, 0, 3]]  # items 1, 2 are history, not targets
    with pytest.raises(UserFacingError, match="no events with a prior history"):
        next_day(tl, date(2000, 1, 5))
    with pytest.raises(UserFacingError, match="no training events"):
        make_windows(tl, np.array([2, 0]), 4, 4, 4, np.random.default_rng(0))


def test_next_day_windows_serve_from_the_day_before():
    d = day_number(date(2000, 1, 1))
    # user 0: items 1, 2 on day d (2 is a training target), 3, 4 on d+1, 5, 6 on d+2
    tl = timelines([[1, 2, 3, 4, 5, 6]], [[d, d, d + 1, d + 1, d + 2, d + 2]], [1])
    plain = make_windows(tl, np.array([6]), 4, 4, 4, np.random.default_rng(0))
    windows = make_windows(tl, np.array([6]), 4, 4, 4, np.random.default_rng(0), next_day=True)
    extra = slice(len(plain), None)
    # the regular windows first, unchanged
    assert windows.targets[: len(plain)].tolist() == plain.targets.tolist()
    # one window per day with a history before it: day d has none; the input ends with
    # the day before, the target is one of the day's events, only the query token learns
    assert windows.short[extra].tolist() == [[0, 0, 1, 2], [1, 2, 3, 4]]
    assert windows.days[extra].tolist() == [d + 1, d + 2]
    assert windows.labels[extra].tolist() == [[0] * 4, [0] * 4]
    drawn = {
        tuple(make_windows(tl, np.array([6]), 4, 4, 4, rng, next_day=True).targets[extra])
        for rng in (np.random.default_rng(seed) for seed in range(20))
    }
    assert {t[0] for t in drawn} == {3, 4} and {t[1] for t in drawn} == {5, 6}
    # U learns from the next-day windows only; the history tokens from the regular ones
    assert windows.query_labels is not None and plain.query_labels is None
    assert windows.query_labels[: len(plain)].tolist() == [[0]] * len(plain)
    assert windows.query_labels[extra].tolist() == [[t] for t in windows.targets[extra]]
    # with several targets, U learns the day's distinct items (the target among them first)
    every = make_windows(tl, np.array([6]), 4, 4, 4, np.random.default_rng(0), None, True, 3)
    assert every.query_labels is not None
    assert every.query_labels[: len(plain)].tolist() == [[0, 0, 0]] * len(plain)
    assert [sorted(row[row > 0].tolist()) for row in every.query_labels[extra]] == [[3, 4], [5, 6]]
    assert every.query_labels[extra][:, 0].tolist() == every.targets[extra].tolist()
    # an event before the training window (first_target) is never a next-day target
    after_history = timelines([[1, 2, 3, 4]], [[d, d, d + 1, d + 1]], [3])
    for seed in range(10):
        rng = np.random.default_rng(seed)
        only = make_windows(after_history, np.array([4]), 4, 4, 4, rng, next_day=True)
        assert only.targets.tolist() == [4, 4] and only.short[1].tolist() == [0, 0, 1, 2]


def test_validation_from_the_day_start_sees_what_serving_sees():
    d = day_number(date(2000, 1, 1))
    tl = timelines(
        [[1, 2, 3, 4], [5, 6], [7, 8, 9]],
        [[d, d, d + 1, d + 1], [d, d], [d, d + 2, d + 3]],
        [0] * 3,
    )
    # targets: user 0's item 4 (day d+1), user 1's item 6 (day d, no earlier day), user 2's 9
    queries = single_target_queries(tl, np.array([0, 1, 2]), np.array([3, 1, 2]))
    served = from_day_start(tl, queries)
    assert served.users.tolist() == [0, 2]  # user 1 has nothing before the day: dropped
    assert served.cuts.tolist() == [2, 2]  # user 0 loses item 3, rated on the target's day
    assert served.relevant_items.tolist() == [4, 9]
    assert served.days.tolist() == [d + 1, d + 3]
    # per-user weights: user 0 loses its day-d target (nothing before), keeping its weight
    weighted = single_target_queries(
        tl, np.array([0, 0, 2, 2]), np.array([1, 3, 1, 2]), np.array([0.5, 0.5, 0.5, 0.5])
    )
    served = from_day_start(tl, weighted)
    assert served.users.tolist() == [0, 2, 2] and served.cuts.tolist() == [2, 1, 2]
    assert np.allclose(served.weights, [1.0, 0.5, 0.5])
