"""The feature job's pure Spark transforms: DataFrames in, DataFrames out.

Nothing here reads or writes a path: features/jobs.py decides which raw days and which
state a build reads and where each table goes, then hands the frames to these
functions. Kept apart so that every formula of Contract 2 (docs/features.md) sits in one
module that a test can drive with in-memory frames, and so that the orchestration reads
as what it is (plan, stage, commit).
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import TYPE_CHECKING

from features.config import ACTIVITY, POPULARITY, window_column
from features.lake import US_PER_DAY, day_start_us

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

# One event inside a sequence; field order = sort order (time, then the event_id tie-break).
EVENT_STRUCT_DDL = (
    "STRUCT<ts: BIGINT, event_id: BIGINT, item_id: BIGINT, event_type: STRING, value: FLOAT>"
)


def drop_redeliveries(events: DataFrame) -> DataFrame:
    """Drop exact re-deliveries: of the events sharing user, item, event type and timestamp,
    only the one with the lowest event id stays (a producer's retry under a new id).

    All four fields fall in one UTC day, so a day's partition holds every copy and
    incremental and rebuilt days drop the same events.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    same = Window.partitionBy("user_id", "item_id", "event_type", "event_timestamp").orderBy(
        "event_id"
    )
    return events.withColumn("_copy", F.row_number().over(same)).where("_copy = 1").drop("_copy")


def _event_struct() -> Column:
    """An event as a sequence element; sorting these structs sorts by (time, event_id)."""
    from pyspark.sql import functions as F

    return F.struct(
        F.unix_micros("event_timestamp").alias("ts"),
        F.col("event_id"),
        F.col("item_id"),
        F.col("event_type"),
        F.col("value"),
    )


def _end_of_day(day: date) -> Column:
    """The last microsecond of ``day``: ``created`` of every row and the features' event time."""
    from pyspark.sql import functions as F

    return F.timestamp_micros(F.lit(day_start_us(day) + US_PER_DAY - 1))


def training_examples(prev_users: DataFrame, events: DataFrame, max_len: int) -> DataFrame:
    """One row per new event: the user's ≤ ``max_len`` events strictly before it (tie-break order).

    The previous state supplies the history that precedes the batch, so an incremental
    day sees exactly what a rebuild sees. Each active user's events are collected and
    sorted once; a target's history is then the slice of that array just before it.
    A window (``collect_list`` over the 200 preceding rows) builds the same lists, but
    Spark evaluates a sliding frame's ``collect_list`` from scratch on every row, copying
    whole event structs ~200 times per row.
    """
    from pyspark.sql import functions as F

    active = events.select("user_id").distinct()
    fields = ["ts", "event_id", "item_id", "event_type", "value"]  # a history's or target's
    before = prev_users.join(active, "user_id", "left_semi").select(
        "user_id", F.inline("seq"), F.lit(False).alias("is_target")
    )
    targets = events.select(
        "user_id",
        F.unix_micros("event_timestamp").alias("ts"),
        *fields[1:],
        F.lit(True).alias("is_target"),
    )
    # sorting these structs sorts by (time, event_id), as everywhere
    per_user = (
        before.select("user_id", *fields, "is_target")
        .unionByName(targets)
        .groupBy("user_id")
        .agg(F.sort_array(F.collect_list(F.struct(*fields, "is_target"))).alias("events"))
        # per user, before the explode: in the same select Spark would compute them per row
        .select(
            "user_id",
            "events",
            F.transform("events", lambda x: x["item_id"]).alias("items"),
            F.transform("events", lambda x: x["ts"]).alias("times"),
            F.transform("events", lambda x: x["event_type"]).alias("types"),
            F.transform("events", lambda x: x["value"]).alias("values"),
        )
    )
    position = F.col("pos")  # 0-based: the number of the user's events before this one
    first = F.greatest(position - max_len, F.lit(0)) + 1
    history_len = F.least(position, F.lit(max_len))
    return (
        per_user.select(
            "user_id", "items", "times", "types", "values", F.posexplode("events").alias("pos", "x")
        )
        .where("x.is_target")
        .select(
            F.col("x.event_id").alias("event_id"),
            "user_id",
            F.col("x.item_id").alias("target_item_id"),
            F.col("x.value").alias("target_value"),
            F.col("x.event_type").alias("target_event_type"),
            F.slice("items", first, history_len).alias("history_item_seq"),
            F.slice("times", first, history_len).alias("history_ts_seq"),
            F.slice("types", first, history_len).alias("history_event_type_seq"),
            F.slice("values", first, history_len).alias("history_value_seq"),
            history_len.cast("bigint").alias("history_len"),
            F.timestamp_micros("x.ts").alias("event_timestamp"),
            F.timestamp_micros(F.col("x.ts")).cast("date").alias("dt"),
        )
        # created = the end of the example's own day, so a rebuild and the daily run agree
        .withColumn(
            "created",
            F.timestamp_micros((F.unix_date("dt").cast("bigint") + 1) * US_PER_DAY - 1),
        )
    )


def advance_user_state(prev_users: DataFrame, events: DataFrame, max_len: int) -> DataFrame:
    """Per user: the last ``max_len`` events (oldest → newest) and running totals.

    Only each user's last ``max_len`` events of the batch are collected (ranked in the
    sequences' own order): a user with 100,000 events in a day, or a long history in a
    rebuild, costs a sort that spills, not a list of all of them in memory.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    newest = Window.partitionBy("user_id").orderBy(F.desc(_event_struct()))
    ranked = events.withColumn("_rank", F.row_number().over(newest))
    batch = ranked.groupBy("user_id").agg(
        F.collect_list(F.when(F.col("_rank") <= max_len, _event_struct())).alias("new_seq"),
        F.count(F.lit(1)).alias("n"),
        F.sum(F.col("value").cast("double")).alias("vsum"),
        F.count("value").alias("vcnt"),
        F.min("event_timestamp").alias("first_ts"),
    )
    empty = F.array().cast(f"ARRAY<{EVENT_STRUCT_DDL}>")
    merged = F.sort_array(F.concat(F.coalesce("seq", empty), F.coalesce("new_seq", empty)))
    return (
        prev_users.join(batch, "user_id", "full_outer")
        .withColumn("merged", merged)
        .select(
            "user_id",
            F.slice("merged", F.greatest(F.size("merged") - max_len, F.lit(0)) + 1, max_len).alias(
                "seq"
            ),
            (F.coalesce("events_total", F.lit(0)) + F.coalesce("n", F.lit(0))).alias(
                "events_total"
            ),
            (F.coalesce("value_sum", F.lit(0.0)) + F.coalesce("vsum", F.lit(0.0))).alias(
                "value_sum"
            ),
            (F.coalesce("value_count", F.lit(0)) + F.coalesce("vcnt", F.lit(0))).alias(
                "value_count"
            ),
            F.least("first_seen_ts", "first_ts").alias("first_seen_ts"),
        )
    )


def advance_item_state(prev_items: DataFrame, events: DataFrame) -> DataFrame:
    """Per item: all-time event count and first-seen time."""
    from pyspark.sql import functions as F

    batch = events.groupBy("item_id").agg(
        F.count(F.lit(1)).alias("n"), F.min("event_timestamp").alias("first_ts")
    )
    return prev_items.join(batch, "item_id", "full_outer").select(
        "item_id",
        (F.coalesce("pop_total", F.lit(0)) + F.coalesce("n", F.lit(0))).alias("pop_total"),
        F.least("first_seen_ts", "first_ts").alias("first_seen_ts"),
    )


def daily_counts(events: DataFrame, key: str) -> DataFrame:
    """Events per ``key`` per UTC day: the small aggregate the popularity windows sum over."""
    from pyspark.sql import functions as F

    return events.groupBy(F.col("event_timestamp").cast("date").alias("dt"), key).agg(
        F.count(F.lit(1)).alias("n")
    )


def _windowed(
    daily: DataFrame, key: str, day: date, windows: tuple[int, ...], prefix: str
) -> DataFrame:
    """``<prefix>_<w>d`` = events of ``key`` in the ``w`` days ending with ``day``."""
    from pyspark.sql import functions as F

    return daily.groupBy(key).agg(
        *(
            F.sum(F.when(F.col("dt") > F.lit(day - timedelta(days=w)), F.col("n")).otherwise(0))
            .cast("bigint")
            .alias(window_column(prefix, w))
            for w in windows
        )
    )


def behavior_sequences(
    users: DataFrame, day: date, short_len: int, everyone: bool = False
) -> DataFrame:
    """Sequences of the users whose sequence changed on ``day`` (a delta: others keep their
    older row), or of ``everyone`` when the day starts from no earlier state (bootstrap or
    --rebuild): relative to nothing, every user changed, and the online store loaded from
    this partition must know every user, not only those active on the bootstrap day.
    """
    from pyspark.sql import functions as F

    last_ts = F.timestamp_micros(F.element_at("seq", -1)["ts"])
    item_seq = F.transform("seq", lambda x: x["item_id"])
    with_last = users.withColumn("last_event_ts", last_ts)
    if not everyone:
        with_last = with_last.where(
            F.col("last_event_ts") >= F.timestamp_micros(F.lit(day_start_us(day)))
        )
    return with_last.select(
        "user_id",
        item_seq.alias("item_seq"),
        F.transform("seq", lambda x: x["ts"]).alias("ts_seq"),
        F.transform("seq", lambda x: x["event_type"]).alias("event_type_seq"),
        F.transform("seq", lambda x: x["value"]).alias("value_seq"),
        F.slice(item_seq, F.greatest(F.size("seq") - short_len, F.lit(0)) + 1, short_len).alias(
            "short_item_seq"
        ),
        F.size("seq").cast("bigint").alias("seq_len"),
        "last_event_ts",
        F.col("last_event_ts").alias("event_timestamp"),
        _end_of_day(day).alias("created"),
    )


def user_features(
    users: DataFrame,
    daily: DataFrame,
    dimension: DataFrame,
    day: date,
    windows: tuple[int, ...],
    attributes: tuple[str, ...] = ("age", "gender", "occupation"),
) -> DataFrame:
    """Activity counts, mean value and tenure of every user seen up to ``day`` (full snapshot),
    with the user dimension's ``attributes``."""
    from pyspark.sql import functions as F

    counts = _windowed(daily, "user_id", day, windows, ACTIVITY)
    dated = users.join(counts, "user_id", "left").withColumn("dt", F.lit(day))
    return user_feature_rows(dated, dimension, windows, attributes).drop("dt")


def user_feature_rows(
    users: DataFrame, dimension: DataFrame, windows: tuple[int, ...], attributes: tuple[str, ...]
) -> DataFrame:
    """The user_features columns of each user's state as of its row's ``dt``.

    Shared by the daily snapshot and a rebuild's history, so both write the same bytes.
    """
    from pyspark.sql import functions as F

    names = [window_column(ACTIVITY, w) for w in windows]
    window_cols = [F.coalesce(n, F.lit(0)).cast("bigint").alias(n) for n in names]
    return users.join(dimension.select("user_id", *attributes), "user_id", "left").select(
        "user_id",
        *window_cols,
        "events_total",
        # null-safe: a user whose values are all null has value_count 0 (ANSI mode raises
        # on a plain division by zero); the mean is then null
        F.try_divide(F.col("value_sum"), F.col("value_count")).cast("float").alias("mean_value"),
        "first_seen_ts",
        F.datediff(F.col("dt"), F.col("first_seen_ts").cast("date"))
        .cast("bigint")
        .alias("tenure_days"),
        *attributes,
        _end_of(F.col("dt")).alias("event_timestamp"),
        _end_of(F.col("dt")).alias("created"),
        "dt",
    )


def item_features(
    items: DataFrame,
    daily: DataFrame,
    dimension: DataFrame,
    day: date,
    windows: tuple[int, ...],
    attributes: tuple[str, ...] = ("title", "year", "genres"),
) -> DataFrame:
    """Windowed popularity and first-seen time of every catalogue or seen item (full snapshot),
    with the item dimension's ``attributes``."""
    from pyspark.sql import functions as F

    counts = _windowed(daily, "item_id", day, windows, POPULARITY)
    dated = (
        items.join(dimension.select("item_id", *attributes), "item_id", "full_outer")
        .join(counts, "item_id", "left")
        .withColumn("dt", F.lit(day))
    )
    return item_feature_rows(dated, windows, attributes).drop("dt")


def item_feature_rows(
    items: DataFrame, windows: tuple[int, ...], attributes: tuple[str, ...]
) -> DataFrame:
    """The item_features columns of each item's state as of its row's ``dt`` (see users)."""
    from pyspark.sql import functions as F

    names = [window_column(POPULARITY, w) for w in windows]
    window_cols = [F.coalesce(n, F.lit(0)).cast("bigint").alias(n) for n in names]
    return items.select(
        "item_id",
        *window_cols,
        F.coalesce("pop_total", F.lit(0)).cast("bigint").alias("pop_total"),
        "first_seen_ts",
        F.datediff(F.col("dt"), F.col("first_seen_ts").cast("date"))
        .cast("bigint")
        .alias("age_days"),
        *attributes,
        _end_of(F.col("dt")).alias("event_timestamp"),
        _end_of(F.col("dt")).alias("created"),
        "dt",
    )


def _end_of(day: Column) -> Column:
    """The last microsecond of the date ``day`` (the column form of ``_end_of_day``)."""
    from pyspark.sql import functions as F

    return F.timestamp_micros((F.unix_date(day).cast("bigint") + 1) * US_PER_DAY - 1)


def _as_of_days(daily: DataFrame, key: str, days: DataFrame) -> DataFrame:
    """Each ``key``'s running totals (``daily`` rows: key, day, n, ...) on every day of ``days``.

    A key's row of day ``x`` holds for the days from ``x`` up to its next active day;
    ``n`` is the key's events on exactly that day (0 on the days it was idle).
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    last = days.agg(F.max("dt")).first()[0]  # type: ignore[index]
    spans = (
        daily.withColumn("next_day", F.lead("day").over(Window.partitionBy(key).orderBy("day")))
        .where(F.col("day") <= F.lit(last))
        .withColumn(
            "dt",
            F.explode(F.sequence("day", F.coalesce(F.date_sub("next_day", 1), F.lit(last)))),
        )
        .drop("next_day")
    )
    return spans.join(F.broadcast(days), "dt").withColumn(
        "n", F.when(F.col("dt") == F.col("day"), F.col("n")).otherwise(F.lit(0))
    )


def _running_windows(
    frame: DataFrame, key: str, windows: tuple[int, ...], prefix: str
) -> DataFrame:
    """``<prefix>_<w>d`` = the ``n`` of the ``w`` days ending with each row's ``dt``."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    by_day = Window.partitionBy(key).orderBy(F.unix_date("dt"))
    return frame.select(
        "*",
        *(
            F.sum("n").over(by_day.rangeBetween(-(w - 1), 0)).alias(window_column(prefix, w))
            for w in windows
        ),
    )


def user_history(events: DataFrame, days: DataFrame, windows: tuple[int, ...]) -> DataFrame:
    """The user state (totals, first seen, window counts) as of the end of each of ``days``."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    daily = events.groupBy("user_id", F.col("event_timestamp").cast("date").alias("day")).agg(
        F.count(F.lit(1)).alias("n"),
        F.coalesce(F.sum(F.col("value").cast("double")), F.lit(0.0)).alias("vsum"),
        F.count("value").alias("vcnt"),
        F.min("event_timestamp").alias("first_ts"),
    )
    upto = Window.partitionBy("user_id").orderBy("day").rowsBetween(Window.unboundedPreceding, 0)
    running = daily.select(
        "user_id",
        "day",
        "n",
        F.sum("n").over(upto).alias("events_total"),
        F.sum("vsum").over(upto).alias("value_sum"),
        F.sum("vcnt").over(upto).alias("value_count"),
        F.min("first_ts").over(upto).alias("first_seen_ts"),
    )
    return _running_windows(_as_of_days(running, "user_id", days), "user_id", windows, ACTIVITY)


def item_history(
    events: DataFrame,
    dimension: DataFrame,
    days: DataFrame,
    windows: tuple[int, ...],
    attributes: tuple[str, ...],
) -> DataFrame:
    """Every catalogue or seen item's totals and popularity windows as of each of ``days``."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    daily = events.groupBy("item_id", F.col("event_timestamp").cast("date").alias("day")).agg(
        F.count(F.lit(1)).alias("n"), F.min("event_timestamp").alias("first_ts")
    )
    upto = Window.partitionBy("item_id").orderBy("day").rowsBetween(Window.unboundedPreceding, 0)
    running = daily.select(
        "item_id",
        "day",
        "n",
        F.sum("n").over(upto).alias("pop_total"),
        F.min("first_ts").over(upto).alias("first_seen_ts"),
    )
    seen = _running_windows(_as_of_days(running, "item_id", days), "item_id", windows, POPULARITY)
    catalogue = dimension.select("item_id", *attributes)
    # every catalogue item every day, and each seen item from its first day (no outer join:
    # it would make ``dt`` nullable, and the files' schema differ from the daily ones)
    keys = (
        catalogue.select("item_id")
        .crossJoin(F.broadcast(days))
        .unionByName(seen.select("item_id", "dt"))
        .distinct()
    )
    return keys.join(seen, ["item_id", "dt"], "left").join(catalogue, "item_id", "left")
