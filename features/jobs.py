"""The daily Spark feature job: raw events of day D + the state of the previous day → tables of D.

One code path serves both modes, which is what makes "incremental == rebuild" true by
construction rather than by care:

- incremental: the batch is raw ``dt=D`` and the previous state is ``_state/*/dt=P``
  (P = the last built day, with no landed raw day between P and D);
- rebuild (``--rebuild`` or no previous state): the batch is every landed raw day up to
  the end of D and the previous state is empty. Training examples then come out for
  every day of the batch in that same job.

Late and corrected raw days cascade: each build commits a lineage record last
(features/lineage.py); a build of any day that finds a raw day different from what built
days consumed first rebuilds every built day from that raw day on, in order, continuing
from the state before it (states of the last ``keep_state_days`` days are kept for this;
an older correction restarts from a full rebuild, and says so). Exact re-deliveries (same
user, item, event type and timestamp under another event id) are dropped: the lowest
event id of each such group is kept (:func:`features.transforms.drop_redeliveries`).

State kept per day (``features/_state/``, docs/features.md): per user the last
``long_seq_len`` events plus running totals, per item running totals, and daily
per-user / per-item counts for the popularity windows. A day's cost therefore grows
with the day's events and the number of known users/items, never with the history.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.errors import UserFacingError
from features import feature_tables as ft
from features import lineage
from features.config import BuildConfig
from features.lake import (
    US_PER_DAY,
    LakeLayout,
    data_files,
    day_start_us,
    landed_days,
    partition_dir,
    partition_fingerprint,
)
from features.transforms import (
    EVENT_STRUCT_DDL,
    advance_item_state,
    advance_user_state,
    behavior_sequences,
    daily_counts,
    drop_redeliveries,
    item_feature_rows,
    item_features,
    item_history,
    training_examples,
    user_feature_rows,
    user_features,
    user_history,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

RAW_EVENTS_DDL = (
    "event_id BIGINT, user_id BIGINT, item_id BIGINT, event_type STRING, value FLOAT,"
    " event_timestamp TIMESTAMP, ingestion_time TIMESTAMP"
)
USER_STATE_DDL = (
    f"user_id BIGINT, seq ARRAY<{EVENT_STRUCT_DDL}>, events_total BIGINT, value_sum DOUBLE,"
    " value_count BIGINT, first_seen_ts TIMESTAMP"
)
ITEM_STATE_DDL = "item_id BIGINT, pop_total BIGINT, first_seen_ts TIMESTAMP"
# Dimension attributes (name, Spark type) in feature-table order; the dataset config
# declares them (features/dataset_config.py), these are MovieLens'.
ITEM_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("title", "STRING"),
    ("year", "INT"),
    ("genres", "STRING"),
)
USER_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("age", "INT"),
    ("gender", "STRING"),
    ("occupation", "STRING"),
)
RAW_COLUMNS = {
    "event_id": pa.int64(),
    "user_id": pa.int64(),
    "item_id": pa.int64(),
    "event_type": pa.string(),
    "value": pa.float32(),
    "event_timestamp": pa.timestamp("us", tz="UTC"),
    "ingestion_time": pa.timestamp("us", tz="UTC"),
}


@dataclass(frozen=True)
class BuildSpec:
    """Where the job reads and writes, the shapes of its tables and the dataset's attributes.

    ``config`` holds the knobs a deployment sets (features/config.py); the CLI hands
    them over from the settings in one piece.
    """

    lake_dir: Path
    features_dir: Path
    quarantine_dir: Path
    config: BuildConfig = field(default_factory=BuildConfig)
    item_attributes: tuple[tuple[str, str], ...] = ITEM_ATTRIBUTES
    user_attributes: tuple[tuple[str, str], ...] = USER_ATTRIBUTES


def dimension_ddl(key: str, attributes: tuple[tuple[str, str], ...]) -> str:
    """Spark DDL of a dimension table: the id, then the attribute columns."""
    return ", ".join([f"{key} BIGINT", *(f"`{name}` {kind}" for name, kind in attributes)])


@dataclass
class BuildResult:
    """What one build did, for the CLI line and the benchmark."""

    day: date
    mode: str
    events: int
    example_days: list[date] = field(default_factory=list)
    reason: str = ""  # why this day was built this way, when it is not the plain daily case
    cascade: bool = False  # rebuilt because a late or corrected raw day changed its inputs


@dataclass(frozen=True)
class BuildPlan:
    """The days one build command builds, in order, and why."""

    days: list[date]
    restart: bool = False  # the first day rebuilds from all raw days: no state before it
    note: str = ""


def quarantined_raw_dir(quarantine_dir: Path, day: date) -> Path:
    """Where the raw gate moves a failed raw partition (same relative path as in the lake)."""
    return LakeLayout(quarantine_dir).events_partition(day)


def quarantined_raw_days(quarantine_dir: Path) -> list[date]:
    """Raw days the gate moved to quarantine (their events are missing from the lake)."""
    return ft.partition_days(LakeLayout(quarantine_dir).events_dir)


def check_raw_partition(lake_dir: Path, quarantine_dir: Path, day: date) -> int:
    """Refuse, with one clear line, a raw day that cannot be built; return its event count.

    Cheap pyarrow checks (schema, readability, ids without nulls, times inside the day)
    so a bad day fails before Spark starts; the GX gate reports the details.
    """
    folder = partition_dir(lake_dir, day)
    if not folder.exists():
        if quarantined_raw_dir(quarantine_dir, day).exists():
            raise UserFacingError(f"raw events of {day} are quarantined; fix and re-land them")
        raise UserFacingError(f"no raw events for {day}: expected {folder}")
    files = data_files(folder)
    rows = 0
    for file in files:
        try:
            table = pq.read_table(
                file, columns=["user_id", "item_id", "event_id", "event_timestamp", "value"]
            )
            schema = pq.read_schema(file)
        except (pa.ArrowException, OSError) as exc:
            raise UserFacingError(f"raw file {file} of {day} is unreadable: {exc}") from exc
        for name, kind in RAW_COLUMNS.items():
            if name not in schema.names:
                raise UserFacingError(f"raw events of {day} lack column {name!r} ({file})")
            if schema.field(name).type != kind:
                raise UserFacingError(
                    f"raw column {name!r} of {day} is {schema.field(name).type}, expected {kind}"
                )
        for name in ("user_id", "item_id", "event_id", "event_timestamp"):
            if table[name].null_count:
                raise UserFacingError(f"raw events of {day} have null {name} ({file})")
        if not pc.all(pc.fill_null(pc.is_finite(table["value"]), True)).as_py():
            raise UserFacingError(f"raw events of {day} have NaN or infinite values ({file})")
        if table.num_rows:
            lo, hi = pc.min_max(table["event_timestamp"].cast(pa.int64())).values()
            start = day_start_us(day)
            if lo.as_py() < start or hi.as_py() >= start + US_PER_DAY:
                raise UserFacingError(f"raw events of {day} contain times outside that day")
        rows += table.num_rows
    if rows == 0:
        raise UserFacingError(f"raw partition of {day} holds no events")
    return rows


def previous_state_day(spec: BuildSpec, day: date) -> date | None:
    """The built day whose state day D continues from, or None when there is none (bootstrap).

    Only committed days count (a lineage record; a build that failed half-way has none).
    Days without a landed raw partition are simply days without events, so the state of
    the last built day P serves D as long as no landed or quarantined day lies strictly
    between them (a quarantined day's events would otherwise be skipped for good).
    """
    committed = set(lineage.built_days(spec.features_dir))
    built = [
        d
        for d in ft.partition_days(ft.state_dir(spec.features_dir, ft.USER_STATE))
        if d < day and d in committed
    ]
    if not built:
        return None
    last = built[-1]
    held = [d for d in quarantined_raw_days(spec.quarantine_dir) if last < d < day]
    if held:
        raise UserFacingError(
            f"raw events of {held[0]} are quarantined and not in the features yet; fix and"
            f" re-land them, or --rebuild {day} to build without them"
        )
    skipped = [d for d in landed_days(spec.lake_dir) if last < d < day]
    if skipped:
        raise UserFacingError(
            f"features of {skipped[0]} are not built (last built day: {last}); build the days"
            f" in order (--from {skipped[0]} --to {day}) or use --rebuild"
        )
    return last


def plan_build(spec: BuildSpec, day: date) -> BuildPlan:
    """``day`` alone, or the cascade a late/corrected raw day requires (plus ``day``).

    The cascade rebuilds, in order, every built day from the earliest changed raw day on
    and every landed day among them that was never built; it continues from the state of
    the last built day before that raw day, or restarts from a full rebuild when that
    state is no longer kept.
    """
    built = lineage.built_days(spec.features_dir)
    if not built:
        return BuildPlan([day])
    current = lineage.current_raw(spec.lake_dir, max(built[-1], day))
    stale = lineage.first_stale_day(
        spec.features_dir, current, set(quarantined_raw_days(spec.quarantine_dir))
    )
    if stale is None:
        return BuildPlan([day])
    start, end = stale.raw_day, built[-1]
    days = sorted(
        {day, *(d for d in built if d >= start), *(d for d in current if start <= d <= end)}
    )
    note = (
        f"raw events of {stale.raw_day} are {stale.reason} since {stale.built_day} was built:"
        f" cascading {days[0]}..{days[-1]} ({len(days)} day(s))"
    )
    before = [d for d in built if d < days[0]]
    states = set(ft.partition_days(ft.state_dir(spec.features_dir, ft.USER_STATE)))
    if before and before[-1] not in states:
        note += (
            f"; the state of {before[-1]} is no longer kept (keep_state_days), so the cascade"
            f" restarts from a full rebuild of {days[0]}"
        )
        return BuildPlan(days, restart=True, note=note)
    return BuildPlan(days, note=note)


def build(
    spark: SparkSession,
    spec: BuildSpec,
    day: date,
    rebuild: bool = False,
    on_built: Callable[[BuildResult], None] | None = None,
) -> list[BuildResult]:
    """Build ``day``, first cascading through the days a late or corrected raw day affects.

    ``on_built`` hears of each day as soon as it is committed (the CLI's one line per day).
    A commit that a killed build left half-applied is finished first, before planning.
    """
    lineage.recover_commits(spec.features_dir)
    check_raw_partition(spec.lake_dir, spec.quarantine_dir, day)
    plan = plan_build(spec, day)
    results = []
    for index, target in enumerate(plan.days):
        from_scratch = index == 0 and (rebuild or plan.restart)
        result = build_one(spark, spec, target, rebuild=from_scratch)
        result.cascade = bool(plan.note)
        if plan.note and index == 0:
            result.reason = plan.note
        results.append(result)
        if on_built is not None:
            on_built(result)
    return results


def build_day(
    spark: SparkSession, spec: BuildSpec, day: date, rebuild: bool = False
) -> BuildResult:
    """Build ``day`` (cascading if needed, see :func:`build`); the result of ``day`` itself."""
    return next(r for r in build(spark, spec, day, rebuild=rebuild) if r.day == day)


def build_one(
    spark: SparkSession, spec: BuildSpec, day: date, rebuild: bool = False
) -> BuildResult:
    """Build and commit every feature table of ``day`` (and the state that day D+1 needs).

    Everything is written to the day's staging folder first and committed in one step
    with its lineage record (features/lineage.py): a failure before the commit leaves
    every committed partition, of this day and of any other, as it was.
    """
    lineage.recover_commits(spec.features_dir)
    events_today = check_raw_partition(spec.lake_dir, spec.quarantine_dir, day)
    previous = None if rebuild else previous_state_day(spec, day)
    reason = ""
    if previous is None:
        earlier = [d for d in lineage.built_days(spec.features_dir) if d < day]
        if earlier and not rebuild:
            reason = (
                f"rebuild: no state of a built day before {day} is kept (last built: {earlier[-1]})"
            )
        batch_days = [d for d in landed_days(spec.lake_dir) if d <= day]
        total = events_today + sum(
            check_raw_partition(spec.lake_dir, spec.quarantine_dir, d)
            for d in batch_days
            if d != day
        )
        mode = "rebuild"
    else:
        batch_days, total, mode = [day], events_today, "incremental"
    consumed = {d: partition_fingerprint(spec.lake_dir, d) for d in batch_days}
    lineage.discard_staging(spec.features_dir, day)
    events = drop_redeliveries(read_raw(spark, spec.lake_dir, batch_days)).cache()
    try:
        result = BuildResult(day=day, mode=mode, events=total, reason=reason)
        history = [d for d in batch_days if d != day] if previous is None else []
        result.example_days = _stage_tables(spark, spec, day, previous, events, history)
    except BaseException:  # nothing was committed: every day stays as it was
        lineage.discard_staging(spec.features_dir, day)
        raise
    finally:
        events.unpersist()
    lineage.commit_day(
        spec.features_dir,
        lineage.Lineage(day=day, mode=mode, previous=previous, raw=consumed),
    )
    _prune_state(spec.features_dir, day, previous, spec.config.keep_state_days)
    return result


def read_raw(spark: SparkSession, lake_dir: Path, days: list[date]) -> DataFrame:
    """Raw events of the given landed days with the lake schema."""
    paths = [str(partition_dir(lake_dir, d)) for d in days]
    return spark.read.schema(RAW_EVENTS_DDL).parquet(*paths)


@dataclass(frozen=True)
class _Table:
    """One table's rows for the staging folder, each with its ``dt``, sorted by ``key``."""

    name: str
    key: str
    frame: DataFrame


@dataclass(frozen=True)
class _DayInputs:
    """What the day's feature tables are computed from (:func:`_read_day_inputs`)."""

    users: DataFrame
    items: DataFrame
    user_daily: DataFrame
    item_daily: DataFrame
    user_dimension: DataFrame
    item_dimension: DataFrame


def _stage_tables(
    spark: SparkSession,
    spec: BuildSpec,
    day: date,
    previous: date | None,
    events: DataFrame,
    history: list[date],
) -> list[date]:
    """Stage training examples, the new state, then the day's feature tables (read from state).

    A rebuild also writes the user and item features of every earlier day of its batch
    (``history``): training reads each example's features as of the day before it, so
    a bootstrap needs every day's snapshot, exactly as the daily runs would have built it.
    Every partition goes to the day's staging folder (``out``); committed partitions are
    only read (the previous state, earlier daily counts). Returns the examples' days.
    """
    out = lineage.staging_root(spec.features_dir, day)
    prev_users = _read_state(spark, spec.features_dir, ft.USER_STATE, USER_STATE_DDL, previous)
    prev_items = _read_state(spark, spec.features_dir, ft.ITEM_STATE, ITEM_STATE_DDL, previous)
    example_days = _stage_examples(spec, out, prev_users, events, many_days=previous is None)
    _write_tables(out, ft.state_dir, _next_state(spec, day, prev_users, prev_items, events))
    inputs = _read_day_inputs(spark, spec, out, day)
    _write_tables(out, ft.table_dir, _day_tables(spec, day, inputs, everyone=previous is None))
    if history:
        frames = _history_tables(spark, spec, events, inputs, history)
        _write_tables(out, ft.table_dir, frames, many_days=True)
    return example_days


def _stage_examples(
    spec: BuildSpec, out: Path, prev_users: DataFrame, events: DataFrame, many_days: bool
) -> list[date]:
    """Stage the batch's training examples; return their days.

    An example's history is what its user did strictly before it: the previous state
    (never the state of ``day``, which already holds the batch) plus the batch's earlier
    events. ``many_days`` (a rebuild's batch of every day) spreads the days over tasks.
    """
    return ft.write_partitions(
        training_examples(prev_users, events, spec.config.long_seq_len),
        ft.table_dir(out, ft.TRAINING_EXAMPLES),
        ["event_timestamp", "event_id"],
        many_days=many_days,
    )


def _next_state(
    spec: BuildSpec, day: date, prev_users: DataFrame, prev_items: DataFrame, events: DataFrame
) -> list[_Table]:
    """The state of ``day`` (what the build of D+1 continues from) and the batch's daily counts.

    Only the daily counts that a window ending on ``day`` or later can reach are kept:
    a rebuild's batch holds every landed day, whose older counts no window ever reads.
    """
    from pyspark.sql import functions as F

    recent = F.col("dt") > F.lit(day - timedelta(days=max(spec.config.windows_days)))
    users = advance_user_state(prev_users, events, spec.config.long_seq_len)
    return [
        _Table(ft.USER_STATE, "user_id", users.withColumn("dt", F.lit(day))),
        _Table(
            ft.ITEM_STATE,
            "item_id",
            advance_item_state(prev_items, events).withColumn("dt", F.lit(day)),
        ),
        _Table(ft.USER_DAILY, "user_id", daily_counts(events, "user_id").where(recent)),
        _Table(ft.ITEM_DAILY, "item_id", daily_counts(events, "item_id").where(recent)),
    ]


def _read_day_inputs(spark: SparkSession, spec: BuildSpec, out: Path, day: date) -> _DayInputs:
    """Read back the staged state of ``day``, the windows' daily counts and the dimensions.

    The day's tables are computed from the state as written, the very snapshot D+1 will
    continue from, and Spark reads it from its files instead of re-running the joins
    that produced it. The windows' earlier daily counts are committed; the batch's are
    staged, and a staged day wins.
    """
    longest = max(spec.config.windows_days)
    layout = LakeLayout(spec.lake_dir)
    return _DayInputs(
        users=_read_state(spark, out, ft.USER_STATE, USER_STATE_DDL, day),
        items=_read_state(spark, out, ft.ITEM_STATE, ITEM_STATE_DDL, day),
        user_daily=_read_daily(
            spark, (out, spec.features_dir), ft.USER_DAILY, "user_id", day, longest
        ),
        item_daily=_read_daily(
            spark, (out, spec.features_dir), ft.ITEM_DAILY, "item_id", day, longest
        ),
        user_dimension=_read_dimension(
            spark, layout.dimension_dir("users"), dimension_ddl("user_id", spec.user_attributes)
        ),
        item_dimension=_read_dimension(
            spark, layout.dimension_dir("items"), dimension_ddl("item_id", spec.item_attributes)
        ),
    )


def _day_tables(spec: BuildSpec, day: date, inputs: _DayInputs, everyone: bool) -> list[_Table]:
    """The day's behaviour sequences, user features and item features, dated ``day``.

    ``everyone`` (a rebuild) puts every known user in the sequences; a daily run writes
    only the users the day changed (the table holds deltas).
    """
    from pyspark.sql import functions as F

    config = spec.config
    frames = [
        _Table(
            ft.USER_BEHAVIOR_SEQUENCES,
            "user_id",
            behavior_sequences(inputs.users, day, config.short_seq_len, everyone=everyone),
        ),
        _Table(
            ft.USER_FEATURES,
            "user_id",
            user_features(
                inputs.users,
                inputs.user_daily,
                inputs.user_dimension,
                day,
                config.windows_days,
                _names(spec.user_attributes),
            ),
        ),
        _Table(
            ft.ITEM_FEATURES,
            "item_id",
            item_features(
                inputs.items,
                inputs.item_daily,
                inputs.item_dimension,
                day,
                config.windows_days,
                _names(spec.item_attributes),
            ),
        ),
    ]
    return [_Table(t.name, t.key, t.frame.withColumn("dt", F.lit(day))) for t in frames]


def _history_tables(
    spark: SparkSession,
    spec: BuildSpec,
    events: DataFrame,
    inputs: _DayInputs,
    history: list[date],
) -> list[_Table]:
    """A rebuild's user and item features of every earlier day of its batch (``history``).

    A rebuild keeps no state of those days, so they come from the batch's events
    directly, each day as of its end: byte for byte the snapshots the daily runs write.
    """
    windows = spec.config.windows_days
    item_attributes = _names(spec.item_attributes)
    days = spark.createDataFrame([(d,) for d in history], "dt DATE NOT NULL")
    return [
        _Table(
            ft.USER_FEATURES,
            "user_id",
            user_feature_rows(
                user_history(events, days, windows),
                inputs.user_dimension,
                windows,
                _names(spec.user_attributes),
            ),
        ),
        _Table(
            ft.ITEM_FEATURES,
            "item_id",
            item_feature_rows(
                item_history(events, inputs.item_dimension, days, windows, item_attributes),
                windows,
                item_attributes,
            ),
        ),
    ]


def _write_tables(
    out: Path,
    folder: Callable[[Path, str], Path],
    tables: list[_Table],
    many_days: bool = False,
) -> None:
    """Write each table into its ``folder`` under ``out`` (a public table's or a state's).

    In the order given, one Spark job each: the callers' order is the job's write order.
    """
    for table in tables:
        ft.write_partitions(table.frame, folder(out, table.name), [table.key], many_days=many_days)


def _names(attributes: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    """The column names of a dimension's attributes."""
    return tuple(name for name, _ in attributes)


def _read_state(
    spark: SparkSession, features_dir: Path, table: str, ddl: str, day: date | None
) -> DataFrame:
    """A state snapshot of ``day``, or an empty frame of the same schema (bootstrap)."""
    if day is None:
        return spark.createDataFrame([], ddl)
    return spark.read.schema(ddl).parquet(
        str(ft.partition_path(ft.state_dir(features_dir, table), day))
    )


def _read_daily(
    spark: SparkSession,
    roots: tuple[Path, ...],
    table: str,
    key: str,
    day: date,
    longest: int,
) -> DataFrame:
    """Daily counts of the ``longest`` days ending with ``day`` (missing days have no events).

    Each day's partition comes from the first of ``roots`` that has it: the build's
    staging folder, then the committed features.
    """
    from pyspark.sql import functions as F

    first = day - timedelta(days=longest - 1)
    found: dict[date, Path] = {}
    for root in reversed(roots):
        folder = ft.state_dir(root, table)
        days = [d for d in ft.partition_days(folder) if first <= d <= day]
        found.update({d: ft.partition_path(folder, d) for d in days})
    ddl = f"{key} BIGINT, n BIGINT"
    frames = [
        spark.read.schema(ddl).parquet(str(path)).withColumn("dt", F.lit(d))
        for d, path in sorted(found.items())
    ]
    if not frames:
        return spark.createDataFrame([], f"{ddl}, dt DATE")
    return functools.reduce(lambda a, b: a.unionByName(b), frames)


def _read_dimension(spark: SparkSession, folder: Path, ddl: str) -> DataFrame:
    """A dimension table read with its known schema (no schema-inference job)."""
    if not folder.exists():
        raise UserFacingError(f"dimension table missing: {folder} (run grank data land)")
    return spark.read.schema(ddl).parquet(str(folder))


def _prune_state(features_dir: Path, day: date, previous: date | None, keep_days: int) -> None:
    """Keep the states a re-run or a cascade needs; older snapshots go.

    Kept: the state of ``day``, of the day it continued from (a re-run of ``day`` stays
    incremental) and of every day within ``keep_days`` of the newest state (a raw day that
    late cascades from a state). Anything older is only needed by a rebuild, which reads
    no state.
    """
    for table in (ft.USER_STATE, ft.ITEM_STATE):
        folder = ft.state_dir(features_dir, table)
        days = ft.partition_days(folder)
        if not days:
            continue
        horizon = days[-1] - timedelta(days=keep_days)
        for old in days:
            if old < day and old != previous and old < horizon:
                shutil.rmtree(ft.partition_path(folder, old), ignore_errors=True)
