"""The global temporal split (GTS): train up to a moment, test on what happened after it.

This is the protocol that matches serving: a model is frozen at T_test and then predicts
each later event from everything the user did before it. Leave-one-out, by contrast,
lets a user's test event precede other users' training events. The definitions follow
"Time to Split" (Gusak et al., RecSys 2025, arXiv 2507.16289), reimplemented here
explicitly (their split code depends on pandas 1.5 semantics of ``groupby().nth()``):

- T_test is a quantile of all event times (0.9 on ML-1M: 2000-12-29 23:28:08 UTC after
  their preprocessing); training uses events at or before T_test, of users with at least
  two of them;
- test users are those with an event after T_test; targets are each test user's last
  event ("last") or every event after T_test in turn ("successive", averaged per user);
  a test user without history before T_test uses their first later event as input;
- validation repeats the split inside the training period: T_val is the same quantile
  of the training events' times; the model trains on events up to T_val and is validated
  on each validation user's last event up to T_test (the "last" target), or on up to
  ``val_targets`` of their events between T_val and T_test, evenly spaced and ending on
  the last, averaged per user (the "successive" target, sampled): one target per user
  is as noisy as the Last test, too noisy to choose among options a few percent apart.

Positions are per timeline: "cut" k means the events before position k are the input.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from common.errors import UserFacingError
from training.data import Queries, Timelines, single_target_queries


@dataclass(frozen=True)
class TemporalSplit:
    """Training ends per user and the validation/test queries of one global split."""

    t_test: int  # unix µs: events at or before it are training data
    t_val: int
    fit_end: np.ndarray  # per user: events up to T_val (0 for users with fewer than two)
    train_end: np.ndarray  # per user: events up to T_test (0 for users with fewer than two)
    validation: Queries
    test_last: Queries
    test_successive: Queries


def quantile_time(times: np.ndarray, quantile: float) -> int:
    """The ``quantile`` of ``times`` with pandas' default (linear) interpolation, as an int."""
    return int(np.floor(np.quantile(times, quantile)))


def drop_consecutive_repeats(timelines: Timelines) -> Timelines:
    """Remove an event that repeats the user's previous item (a re-click, not a choice)."""
    items = timelines.items
    same_user = np.zeros(len(items), dtype=bool)
    same_user[1:] = np.ones(len(items) - 1, dtype=bool)
    same_user[timelines.offsets[:-1]] = False
    repeat = np.zeros(len(items), dtype=bool)
    repeat[1:] = items[1:] == items[:-1]
    return _keep(timelines, ~(repeat & same_user))


def k_core(timelines: Timelines, k: int) -> Timelines:
    """Iteratively drop users and items with fewer than ``k`` events until none is left."""
    while True:
        counts = np.bincount(timelines.items)
        lengths = np.diff(timelines.offsets)
        user_of = np.repeat(np.arange(timelines.n_users), lengths)
        keep = (counts[timelines.items] >= k) & (lengths[user_of] >= k)
        if keep.all():
            return timelines
        timelines = _keep(timelines, keep)


def _keep(timelines: Timelines, keep: np.ndarray) -> Timelines:
    """The timelines restricted to positions ``keep``; users left with none disappear."""
    lengths = np.diff(timelines.offsets)
    user_of = np.repeat(np.arange(timelines.n_users), lengths)
    kept_per_user = np.bincount(user_of[keep], minlength=timelines.n_users)
    present = kept_per_user > 0
    before_first = np.array(
        [
            keep[s : s + f].sum()
            for s, f in zip(timelines.offsets[:-1], timelines.first_target, strict=True)
        ],
        dtype=np.int64,
    )
    return replace(
        timelines,
        user_ids=timelines.user_ids[present],
        offsets=np.r_[0, np.cumsum(kept_per_user[present])].astype(np.int64),
        items=timelines.items[keep],
        times=timelines.times[keep],
        first_target=before_first[present],
        kinds=None if timelines.kinds is None else timelines.kinds[keep],
        values=None if timelines.values is None else timelines.values[keep],
    )


def preprocess(timelines: Timelines, k: int = 5) -> Timelines:
    """The paper's preprocessing: consecutive repeats dropped, then iterative k-core."""
    return k_core(drop_consecutive_repeats(timelines), k)


def _ends_at(timelines: Timelines, moment: int) -> np.ndarray:
    """Per user: how many events happen at or before ``moment``."""
    ends = np.zeros(timelines.n_users, dtype=np.int64)
    for u in range(timelines.n_users):
        times = timelines.times[timelines.offsets[u] : timelines.offsets[u + 1]]
        ends[u] = np.searchsorted(times, moment, side="right")
    return ends


def global_temporal_split(
    timelines: Timelines, t_test: int, val_quantile: float = 0.9, val_targets: int = 1
) -> TemporalSplit:
    """Split ``timelines`` at ``t_test`` (unix µs, inclusive) with validation at T_val,
    on up to ``val_targets`` events per validation user (1: their last)."""
    if val_targets < 1:
        raise UserFacingError(f"val_targets must be at least 1, got {val_targets}")
    lengths = np.diff(timelines.offsets)
    test_ends = _ends_at(timelines, t_test)
    train_end = np.where(test_ends >= 2, test_ends, 0)
    train_times = np.concatenate(
        [timelines.times[s : s + e] for s, e in zip(timelines.offsets[:-1], train_end, strict=True)]
    )
    t_val = quantile_time(train_times, val_quantile)
    val_ends = _ends_at(timelines, t_val)
    fit_end = np.where(val_ends >= 2, val_ends, 0)
    # validation: users with a training-period event after T_val; targets = the last of
    # them, or up to val_targets of them ending on the last
    val_users = np.flatnonzero((test_ends > val_ends) & (test_ends >= 2))
    validation = spread_queries(
        timelines, val_users, np.maximum(val_ends, 1)[val_users], test_ends[val_users], val_targets
    )
    # test: every event after T_test; a user without history before it uses the first
    test_starts = np.maximum(test_ends, 1)
    last_users = np.flatnonzero(lengths > test_starts)
    return TemporalSplit(
        t_test=t_test,
        t_val=t_val,
        fit_end=fit_end,
        train_end=train_end,
        validation=validation,
        test_last=single_target_queries(timelines, last_users, lengths[last_users] - 1),
        test_successive=successive_queries(timelines, test_starts, lengths),
    )


def successive_queries(timelines: Timelines, starts: np.ndarray, stops: np.ndarray) -> Queries:
    """Each user's positions ``starts[u] <= p < stops[u]`` as targets in turn, each
    predicted from every event before it; weighted 1/n per user with n of them, so the
    mean over queries is the per-user mean ("successive")."""
    users = np.flatnonzero(stops > starts)
    every = int((stops - starts)[users].max(initial=1))
    return spread_queries(timelines, users, starts[users], stops[users], every)


def spread_queries(
    timelines: Timelines, users: np.ndarray, starts: np.ndarray, stops: np.ndarray, limit: int
) -> Queries:
    """Up to ``limit`` of user ``users[i]``'s positions ``starts[i] <= p < stops[i]`` as
    targets, evenly spaced and always ending on the last, each predicted from every event
    before it; weighted 1/n per user with n of them, so the mean over queries is the
    per-user mean. Every user must have at least one position."""
    cuts = [
        stop - 1 - np.unique(np.round(np.linspace(0, stop - start - 1, min(limit, stop - start))))
        for start, stop in zip(starts, stops, strict=True)
    ]
    counts = np.array([len(c) for c in cuts], dtype=np.int64)
    return single_target_queries(
        timelines,
        np.repeat(users, counts).astype(np.int64),
        np.concatenate([np.sort(c) for c in cuts]).astype(np.int64)
        if cuts
        else np.zeros(0, dtype=np.int64),
        np.repeat(1.0 / counts, counts),
    )


def catch_up_trial(timelines: Timelines, split: TemporalSplit) -> tuple[TemporalSplit, Queries]:
    """The split repeated inside the catch-up's period (T_val, T_test], to choose how long
    to catch up without the test targets: a catch-up up to T_mid (the median time of the
    period's training events), judged on every later event up to T_test in turn.

    Returns the split whose ``train_end`` stops at T_mid (what :func:`catch_up` trains
    on) and those queries (empty when no training event falls after T_mid).
    """
    ends = split.train_end  # 0 for users outside training: they take no part
    period = np.concatenate(
        [
            timelines.times[s + a : s + b]
            for s, a, b in zip(timelines.offsets[:-1], split.fit_end, ends, strict=True)
        ]
    )
    if len(period) == 0:
        return split, successive_queries(timelines, ends, ends)
    mid_ends = np.minimum(_ends_at(timelines, quantile_time(period, 0.5)), ends)
    trial = replace(split, train_end=np.maximum(mid_ends, split.fit_end))
    return trial, successive_queries(timelines, np.maximum(trial.train_end, 1), ends)
