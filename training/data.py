"""Reading ``training_examples`` (Contract 2) into per-user timelines, splits and batches.

Every row of ``training_examples`` carries its own ≤200-item history, so the table is
~200x larger than the events it describes. Training does not need those copies: within
a contiguous window of days, a user's history at any event is the history of their first
event in the window followed by their targets. :func:`read_timelines` therefore reads one
partition at a time and keeps, per user, one history plus the targets, which makes
ML-1M fit in a few MB instead of GBs.

Splits (docs/model.md):
- leave-last-out: per user, the last event is test, the one before validation, the rest train;
- next-day: targets of days before the held-out day train, the held-out day tests, and
  each user's last training event validates (early stopping never sees the test day).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.errors import UserFacingError
from features.feature_tables import TRAINING_EXAMPLES, FeatureTables
from features.lake import EPOCH, US_PER_DAY, LakeLayout

TABLE = TRAINING_EXAMPLES
COLUMNS = [
    "event_id",
    "user_id",
    "target_item_id",
    "event_timestamp",
    "history_item_seq",
    "history_ts_seq",
]
# written by newer feature builds: what each event was (behaviour types come from these)
BEHAVIOR_COLUMNS = [
    "target_value",
    "target_event_type",
    "history_value_seq",
    "history_event_type_seq",
]


@dataclass(frozen=True)
class Timelines:
    """Per-user event sequences (oldest → newest) in CSR form.

    ``items[offsets[u]:offsets[u+1]]`` is user ``u``'s sequence; positions before
    ``first_target[u]`` are history from before the window (not targets of it).
    ``times`` are unix microseconds; ``kinds`` index ``kind_names`` (the event type) and
    ``values`` hold the event's value (NaN when unknown), per position.
    """

    user_ids: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    times: np.ndarray
    first_target: np.ndarray
    first_day: date
    last_day: date
    kinds: np.ndarray | None = None
    values: np.ndarray | None = None
    kind_names: tuple[str, ...] = ()

    @cached_property
    def days(self) -> np.ndarray:
        """UTC day number of every position."""
        return self.times // US_PER_DAY

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def max_item_id(self) -> int:
        return int(self.items.max()) if len(self.items) else 0

    def sequence(self, user: int) -> np.ndarray:
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def event_types(self) -> np.ndarray:
        """The event type of every position as strings ("" where unknown)."""
        names = np.array([*self.kind_names, ""], dtype=object)
        if self.kinds is None:
            return np.full(len(self.items), "", dtype=object)
        return names[self.kinds]

    def event_values(self) -> np.ndarray:
        return self.values if self.values is not None else np.full(len(self.items), np.nan)


@dataclass(frozen=True)
class Queries:
    """Evaluation queries: history ``sequence(user)[:cut]``, relevant items in CSR form.

    ``days[q]`` is the UTC day number the prediction is made on (features are read as of
    the end of the day before); ``weights[q]`` weigh the metric's mean (uniform when None;
    1/n per query of a user with n queries gives the per-user mean).
    """

    users: np.ndarray
    cuts: np.ndarray
    relevant_offsets: np.ndarray
    relevant_items: np.ndarray
    days: np.ndarray
    weights: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.users)

    def select(self, rows: np.ndarray) -> Queries:
        """The queries at ``rows`` (with their relevant items)."""
        starts, stops = self.relevant_offsets[rows], self.relevant_offsets[rows + 1]
        items = [self.relevant_items[a:b] for a, b in zip(starts, stops, strict=True)]
        return Queries(
            users=self.users[rows],
            cuts=self.cuts[rows],
            relevant_offsets=np.r_[0, np.cumsum(stops - starts)].astype(np.int64),
            relevant_items=(np.concatenate(items) if items else np.zeros(0)).astype(np.int64),
            days=self.days[rows],
            weights=None if self.weights is None else self.weights[rows],
        )


def partition_days(features_dir: Path) -> list[date]:
    """Days with a complete ``training_examples`` partition, oldest first."""
    return FeatureTables(features_dir).days(TABLE)


def day_number(day: date) -> int:
    return (day - EPOCH).days


@dataclass
class _Pieces:
    """What :func:`read_timelines` collects partition by partition before assembling."""

    targets: list[pa.Table] = field(default_factory=list)
    history_users: list[np.ndarray] = field(default_factory=list)
    history: list[pa.Table] = field(default_factory=list)
    seen_users: set[int] = field(default_factory=set)


def read_timelines(
    features_dir: Path, first: date | None, last: date, landed: frozenset[date] | None = None
) -> Timelines:
    """Timelines from the partitions in ``[first, last]`` (``first=None``: from the oldest).

    Refuses an empty window and a gap inside it (a missing day would silently splice
    two histories together). ``landed`` (the raw lake's days) tells the gaps that are
    real days without events (ML-100K has two) from days whose features are missing.
    """
    tables = FeatureTables(features_dir)
    available = [d for d in tables.days(TABLE) if (first is None or d >= first)]
    days = [d for d in available if d <= last]
    if not days:
        span = f"{first or 'the start'}..{last}"
        raise UserFacingError(
            f"no {TABLE} partitions for {span} under {tables.table_dir(TABLE)}: "
            "run `grank features build` first"
        )
    span_days = {days[0] + timedelta(n) for n in range((days[-1] - days[0]).days + 1)}
    missing = sorted(d for d in span_days - set(days) if landed is None or d in landed)
    if missing:
        raise UserFacingError(f"{TABLE} has gaps in {days[0]}..{days[-1]}: missing {missing[:3]}")
    pieces = _Pieces()
    for day in days:
        _read_partition(tables.partition(TABLE, day), pieces)
    if not pieces.targets:
        raise UserFacingError(f"{TABLE} partitions for {days[0]}..{days[-1]} hold no rows")
    return _assemble(pieces, days[0], days[-1])


def _read_partition(folder: Path, pieces: _Pieces) -> None:
    """Add one day's targets, and the history of users not seen in earlier days."""
    present = set(pq.read_schema(next(folder.glob("*.parquet"))).names)
    table = pq.read_table(folder, columns=COLUMNS + [c for c in BEHAVIOR_COLUMNS if c in present])
    if table.num_rows == 0:
        return
    ts = pc.cast(table["event_timestamp"], pa.int64()).to_numpy()
    order = np.lexsort((table["event_id"].to_numpy(), ts))
    table = table.take(pa.array(order))
    users = table["user_id"].to_numpy()
    _, first_rows = np.unique(users, return_index=True)
    new_rows = np.array(
        [r for r in np.sort(first_rows) if int(users[r]) not in pieces.seen_users], dtype=np.int64
    )
    if len(new_rows):
        pieces.seen_users.update(int(u) for u in users[new_rows])
        pieces.history_users.append(users[new_rows])
        pieces.history.append(
            pa.table(
                {
                    "item": table["history_item_seq"].take(pa.array(new_rows)).combine_chunks(),
                    "ts": table["history_ts_seq"].take(pa.array(new_rows)).combine_chunks(),
                    "value": _optional_list(table, "history_value_seq", new_rows, pa.float32()),
                    "kind": _optional_list(table, "history_event_type_seq", new_rows, pa.string()),
                }
            )
        )
    pieces.targets.append(
        pa.table(
            {
                "user_id": table["user_id"],
                "item": table["target_item_id"],
                "ts": pc.cast(table["event_timestamp"], pa.int64()),
                "event_id": table["event_id"],
                "value": _optional(table, "target_value", pa.float32()),
                "kind": _optional(table, "target_event_type", pa.string()),
            }
        )
    )


def _optional(table: pa.Table, column: str, kind: pa.DataType) -> pa.ChunkedArray:
    """``column`` cast to ``kind``, or nulls where an older build did not write it."""
    if column in table.column_names:
        return pc.cast(table[column], kind)
    return pa.chunked_array([pa.nulls(table.num_rows, kind)])


def _optional_list(table: pa.Table, column: str, rows: np.ndarray, kind: pa.DataType) -> pa.Array:
    """List ``column`` at ``rows``; where absent, lists of nulls as long as the item lists."""
    if column in table.column_names:
        return pc.cast(table[column].take(pa.array(rows)).combine_chunks(), pa.list_(kind))
    lengths = pc.list_value_length(table["history_item_seq"].take(pa.array(rows))).to_numpy(
        zero_copy_only=False
    )
    offsets = np.r_[0, np.cumsum(np.nan_to_num(lengths.astype(float)))].astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.nulls(int(offsets[-1]), kind))


def _assemble(pieces: _Pieces, first_day: date, last_day: date) -> Timelines:
    """Glue each user's pre-window history to their in-window targets (CSR, user-sorted)."""
    targets = pa.concat_tables(pieces.targets)
    user = targets["user_id"].to_numpy()
    ts = targets["ts"].to_numpy()
    order = np.lexsort((targets["event_id"].to_numpy(), ts, user))
    user_ids, target_counts = np.unique(user[order], return_counts=True)
    history = pa.concat_tables(pieces.history)
    hist_users = np.concatenate(pieces.history_users)
    hist_lengths = pc.list_value_length(history["item"]).to_numpy(zero_copy_only=False)
    hist_lengths = np.nan_to_num(hist_lengths.astype(float)).astype(np.int64)
    hist_starts = np.r_[0, np.cumsum(hist_lengths)]
    slot = {int(u): i for i, u in enumerate(hist_users)}
    columns = {}
    for name in ("item", "ts", "value", "kind"):
        flat = pc.list_flatten(history[name])
        columns[name] = (flat, pa.chunked_array(targets[name].chunks).combine_chunks())
    kind_names, kind_codes = _encode_kinds(columns["kind"])
    arrays = {
        "item": [np.asarray(a.to_numpy(zero_copy_only=False), np.int64) for a in columns["item"]],
        "ts": [np.asarray(a.to_numpy(zero_copy_only=False), np.int64) for a in columns["ts"]],
        "value": [
            pc.fill_null(pc.cast(a, pa.float32()), float("nan")).to_numpy(zero_copy_only=False)
            for a in columns["value"]
        ],
        "kind": kind_codes,
    }
    for name in arrays:  # targets in (user, time, event_id) order
        arrays[name][1] = arrays[name][1][order]
    pieces_by_name: dict[str, list[np.ndarray]] = {name: [] for name in arrays}
    first_target = np.zeros(len(user_ids), dtype=np.int64)
    target_starts = np.r_[0, np.cumsum(target_counts)]
    for u, uid in enumerate(user_ids):
        h = slot[int(uid)]
        hist = slice(hist_starts[h], hist_starts[h + 1])
        span = slice(target_starts[u], target_starts[u + 1])
        for name, (hist_values, target_values) in arrays.items():
            pieces_by_name[name] += [hist_values[hist], target_values[span]]
        first_target[u] = hist_starts[h + 1] - hist_starts[h]
    lengths = target_counts + first_target
    return Timelines(
        user_ids=user_ids,
        offsets=np.r_[0, np.cumsum(lengths)].astype(np.int64),
        items=np.concatenate(pieces_by_name["item"]).astype(np.int64),
        times=np.concatenate(pieces_by_name["ts"]).astype(np.int64),
        first_target=first_target,
        first_day=first_day,
        last_day=last_day,
        kinds=np.concatenate(pieces_by_name["kind"]).astype(np.int16),
        values=np.concatenate(pieces_by_name["value"]).astype(np.float32),
        kind_names=kind_names,
    )


def _encode_kinds(parts: tuple[pa.Array, pa.Array]) -> tuple[tuple[str, ...], list[np.ndarray]]:
    """Event types as small codes into a sorted name list (the last code = unknown)."""
    names = sorted({str(v) for part in parts for v in pc.unique(part).to_pylist() if v is not None})
    lookup = pa.array(names, pa.string())
    codes = []
    for part in parts:
        index = pc.index_in(part, value_set=lookup)
        codes.append(pc.fill_null(index, len(names)).to_numpy(zero_copy_only=False))
    return tuple(names), codes


# ------------------------------------------------------------------------ splits
def leave_last_out(timelines: Timelines) -> tuple[np.ndarray, Queries, Queries]:
    """(train_end per user, validation queries, test queries), per user by event order.

    Users need 3 events to give one of each; with 2 the last is test and the first trains,
    with 1 it only trains (its target is learnt from an empty history).
    """
    lengths = np.diff(timelines.offsets)
    train_end = np.where(lengths >= 3, lengths - 2, np.where(lengths == 2, 1, lengths))
    users = np.arange(timelines.n_users)
    val_users = users[lengths >= 3]
    test_users = users[lengths >= 2]
    return (
        train_end,
        single_target_queries(timelines, val_users, lengths[val_users] - 2),
        single_target_queries(timelines, test_users, lengths[test_users] - 1),
    )


def events_before(timelines: Timelines, day: date) -> np.ndarray:
    """Per user: how many of their events lie before ``day`` starts (a ``train_end``)."""
    first = day_number(day)
    starts = timelines.offsets[:-1]
    return np.array(
        [
            int(np.searchsorted(timelines.days[starts[u] : timelines.offsets[u + 1]], first))
            for u in range(timelines.n_users)
        ],
        dtype=np.int64,
    )


def next_day(timelines: Timelines, test_day: date) -> tuple[np.ndarray, Queries, Queries]:
    """(train_end per user, validation, test) for training before ``test_day``, testing on it.

    The test query of a user is their history up to the end of the day before, with all
    items of ``test_day`` as relevant (what a daily-refreshed model serves); validation is
    each user's last training event.
    """
    day = day_number(test_day)
    starts = timelines.offsets[:-1]
    train_end = np.zeros(timelines.n_users, dtype=np.int64)
    test_users, test_cuts, rel_offsets, rel_items = [], [], [0], []
    for u in range(timelines.n_users):
        days = timelines.days[starts[u] : timelines.offsets[u + 1]]
        before = int(np.searchsorted(days, day, side="left"))
        on_day = int(np.searchsorted(days, day, side="right"))
        train_end[u] = before
        if on_day > before and before > 0:
            test_users.append(u)
            test_cuts.append(before)
            items = np.unique(timelines.sequence(u)[before:on_day])
            rel_items.append(items)
            rel_offsets.append(rel_offsets[-1] + len(items))
    if not test_users:
        raise UserFacingError(f"no events with a prior history on the test day {test_day}")
    # validation: the last training event of users with at least two in the window
    val_users = np.flatnonzero(train_end - timelines.first_target >= 2)
    train_end_fit = train_end.copy()
    train_end_fit[val_users] -= 1
    test = Queries(
        users=np.array(test_users, dtype=np.int64),
        cuts=np.array(test_cuts, dtype=np.int64),
        relevant_offsets=np.array(rel_offsets, dtype=np.int64),
        relevant_items=np.concatenate(rel_items).astype(np.int64),
        days=np.full(len(test_users), day, dtype=np.int64),
    )
    return (
        train_end_fit,
        single_target_queries(timelines, val_users, train_end_fit[val_users]),
        test,
    )


def single_target_queries(
    timelines: Timelines, users: np.ndarray, cuts: np.ndarray, weights: np.ndarray | None = None
) -> Queries:
    """One query per (user, cut): predict the event at ``cut`` from the events before it."""
    positions = timelines.offsets[users] + cuts
    return Queries(
        users=users.astype(np.int64),
        cuts=cuts.astype(np.int64),
        relevant_offsets=np.arange(len(users) + 1, dtype=np.int64),
        relevant_items=timelines.items[positions].astype(np.int64),
        days=timelines.days[positions].astype(np.int64),
        weights=weights,
    )


def from_day_start(timelines: Timelines, queries: Queries) -> Queries:
    """The same queries with each history cut back to the start of its prediction day.

    Serving reads the sequence as of the day before all day long; a model whose query
    token learns only that situation (``make_windows(next_day=True)``) is validated in it.
    Queries without an event before their day are dropped; a user who keeps some of
    their weighted queries keeps their whole weight (a per-user mean stays one).
    """
    cuts = np.array(
        [
            np.searchsorted(
                timelines.days[timelines.offsets[u] : timelines.offsets[u] + cut], day, "left"
            )
            for u, cut, day in zip(queries.users, queries.cuts, queries.days, strict=True)
        ],
        dtype=np.int64,
    )
    kept = queries.select(np.flatnonzero(cuts > 0))
    weights = kept.weights
    if weights is not None and len(kept):
        before = np.bincount(queries.users, weights=queries.weights)
        after = np.bincount(kept.users, weights=weights, minlength=len(before))
        weights = weights * (before / np.where(after > 0, after, 1.0))[kept.users]
    return replace(kept, cuts=cuts[cuts > 0], weights=weights)


# ----------------------------------------------------------------------- batches
@dataclass(frozen=True)
class Windows:
    """Training examples: each row ends at one target with its short/long history.

    ``labels[:, t]`` is the next item after short slot ``t`` (the last slot's label is
    the target), 0 where not a training target of this window (padding or an event
    outside the training window), so next-token prediction supervises each training
    event once per epoch when windows are cut every ``short_len`` events.
    """

    short: np.ndarray
    long: np.ndarray
    labels: np.ndarray
    targets: np.ndarray
    users: np.ndarray  # timeline row of each window's user
    days: np.ndarray  # UTC day number of each window's target
    long_codes: np.ndarray | None = None  # behaviour bitmasks aligned with ``long``
    # [N, M]: what the query token U learns to predict (0: nothing); None: every window's
    # target, as one more next-token slot
    query_labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.targets)


def _left_padded(seq: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros(length, dtype=np.int64)
    if length and len(seq):
        tail = seq[-length:]
        out[length - len(tail) :] = tail
    return out


def make_windows(
    timelines: Timelines,
    train_end: np.ndarray,
    short_len: int,
    long_len: int,
    stride: int,
    rng: np.random.Generator,
    codes: np.ndarray | None = None,
    next_day: bool = False,
    next_day_targets: int = 1,
) -> Windows:
    """Cut training windows ending at every ``stride``-th training target (random phase).

    The random phase (drawn from ``rng``, so deterministic by seed) moves the window
    boundaries each epoch, a cheap augmentation; ``stride=1`` yields one example per event.
    ``codes`` (behaviour bitmasks per timeline position) add ``long_codes`` to the windows.

    ``next_day`` adds, per user and day with training targets and an earlier history, one
    window in the serving situation: its input ends with the day before (what the online
    sequence holds all day), its targets are up to ``next_day_targets`` distinct items of
    that day (drawn from ``rng``; the first is the window's target). The query token U
    then learns from these windows only (``query_labels``), the history tokens from the
    others: U is what serving reads, always at a day's start, and the day's items are
    what it is judged on. One U per user and day scores them all: more targets cost
    next to nothing and tell U about the day rather than one event of it.
    """
    short_rows, long_rows, label_rows, targets, code_rows = [], [], [], [], []
    users, positions, query_labels = [], [], []
    no_labels = np.zeros(next_day_targets, dtype=np.int64)
    for u in range(timelines.n_users):
        seq = timelines.sequence(u)
        lo, hi = int(timelines.first_target[u]), int(train_end[u])
        if hi <= lo:
            continue
        phase = int(rng.integers(stride)) if stride > 1 else 0
        # the newest target always ends a window, so a phase never leaves events unsupervised
        ends = {hi - 1, *range(hi - 1 - phase, lo - 1, -stride)}
        for end in sorted(ends):
            supervised = seq[: end + 1].copy()
            supervised[:lo] = 0
            short_rows.append(_left_padded(seq[:end], short_len))
            long_rows.append(_left_padded(seq[:end], long_len))
            label_rows.append(_left_padded(supervised[1 : end + 1], short_len))
            targets.append(seq[end])
            query_labels.append(no_labels)  # U serves from the day before: it learns below
            users.append(u)
            positions.append(timelines.offsets[u] + end)
            if codes is not None:
                start = timelines.offsets[u]
                code_rows.append(_left_padded(codes[start : start + end], long_len))
        if not next_day:
            continue
        days = timelines.days[timelines.offsets[u] : timelines.offsets[u + 1]]
        for day in np.unique(days[lo:hi]):
            cut = int(np.searchsorted(days, day, side="left"))  # the day's first event
            if cut == 0:  # no history before the day: nothing to serve from
                continue
            stop = min(int(np.searchsorted(days, day, side="right")), hi)
            day_first = max(cut, lo)
            picked = rng.permutation(stop - day_first)[: next_day_targets * 2] + day_first
            _, first_seen = np.unique(seq[picked], return_index=True)  # distinct items
            picked = picked[np.sort(first_seen)][:next_day_targets]
            end = int(picked[0])
            labels = no_labels.copy()
            labels[: len(picked)] = seq[picked]
            short_rows.append(_left_padded(seq[:cut], short_len))
            long_rows.append(_left_padded(seq[:cut], long_len))
            label_rows.append(np.zeros(short_len, dtype=np.int64))
            targets.append(seq[end])
            query_labels.append(labels)
            users.append(u)
            positions.append(timelines.offsets[u] + end)
            if codes is not None:
                start = timelines.offsets[u]
                code_rows.append(_left_padded(codes[start : start + cut], long_len))
    if not targets:
        raise UserFacingError("the training window holds no training events")
    return Windows(
        short=np.stack(short_rows),
        long=np.stack(long_rows),
        labels=np.stack(label_rows),
        targets=np.array(targets, dtype=np.int64),
        users=np.array(users, dtype=np.int64),
        days=timelines.days[np.array(positions, dtype=np.int64)],
        long_codes=np.stack(code_rows) if codes is not None else None,
        query_labels=np.stack(query_labels) if next_day else None,
    )


def query_histories(
    timelines: Timelines,
    queries: Queries,
    short_len: int,
    long_len: int,
    codes: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Left-padded short and long histories of every query (and the long one's codes)."""
    short = np.zeros((len(queries), short_len), dtype=np.int64)
    long = np.zeros((len(queries), long_len), dtype=np.int64)
    long_codes = None if codes is None else np.zeros((len(queries), long_len), dtype=np.int64)
    for i, (u, cut) in enumerate(zip(queries.users, queries.cuts, strict=True)):
        start = int(timelines.offsets[int(u)])
        history = timelines.items[start : start + int(cut)]
        short[i] = _left_padded(history, short_len)
        long[i] = _left_padded(history, long_len)
        if long_codes is not None and codes is not None:
            long_codes[i] = _left_padded(codes[start : start + int(cut)], long_len)
    return short, long, long_codes


def item_counts(timelines: Timelines, train_end: np.ndarray, n_rows: int) -> np.ndarray:
    """Training-target counts per item id (popularity baseline and the logQ correction)."""
    counts = np.zeros(n_rows, dtype=np.int64)
    for u in range(timelines.n_users):
        seq = timelines.sequence(u)[int(timelines.first_target[u]) : int(train_end[u])]
        np.add.at(counts, seq[seq < n_rows], 1)
    return counts


def catalogue_max_id(lake_dir: Path) -> int:
    """Largest item id of the lake's item dimension (0 without one), to size the item table.

    Serving refreshes vectors for the whole catalogue, so every catalogue item gets a
    row even before anyone interacted with it (it keeps its small initial vector).
    """
    path = LakeLayout(lake_dir).items_file
    if not path.is_file():
        return 0
    ids = pq.read_table(path, columns=["item_id"])["item_id"]
    return int(pc.max(ids).as_py() or 0)
