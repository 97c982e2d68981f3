"""Benchmark of the Spark feature job: rebuild vs daily incremental, Spark vs DuckDB, 10x history.

Usage (results go to docs/benchmarks.md, "Spark feature ETL")::

    .venv/bin/python benchmarks/features_etl.py --workdir /tmp/grank-bench \
        [--scenarios synthetic-1m,ml-1m] [--skip-ml1m]

Scenarios, each in its own data root under ``--workdir``:
- ``synthetic-1m``: 1M synthetic events over 300 days, 20k users (``features.synthetic``);
- ``synthetic-100k``: 100k events over 30 days: the same events per day with 1/10 of
  the history, so its daily job is the "1x history" twin of the 1M one;
- ``ml-1m``: the real lake under ``data/lake`` (copied);
- ``synthetic-10m`` (not in the default set): 10M events over 300 days, 200k users.
For each, in a fresh process (its own JVM): a full rebuild at the second-to-last day (all
history, one Spark job, training examples for every day) run twice, the first with a
cold JVM like a CLI run, the second warm; then the daily incremental job of the last day;
and the same four tables in DuckDB SQL over the same Parquet files (best of two).
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date, timedelta
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from features.config import SparkConfig
from features.jobs import BuildSpec, build_day
from features.lake import landed_days, partition_dir
from features.quality import QualitySpec, validate_raw
from features.spark import get_session
from features.synthetic import SyntheticSpec, generate

REPO = Path(__file__).resolve().parent.parent
LONG, SHORT = 200, 64

# The four tables of the Spark rebuild, same columns and rows (every user's sequence, every
# catalogue or seen item), Parquet with the same codec (zstd level 1: pyarrow's default).
# Not included: the Spark job's state and daily counts (what the incremental job continues
# from) and its one-file-per-partition atomic publication.
DUCKDB_REBUILD = """
CREATE OR REPLACE VIEW ev AS
  SELECT * FROM read_parquet('{events}/*/*.parquet') WHERE event_timestamp < TIMESTAMPTZ '{end}';
COPY (
  SELECT event_id, user_id, item_id AS target_item_id, value AS target_value,
         coalesce(list(item_id) OVER w, []) AS history_item_seq,
         coalesce(list(epoch_us(event_timestamp)) OVER w, []) AS history_ts_seq,
         count(*) OVER w AS history_len, event_timestamp,
         CAST(CAST(event_timestamp AS DATE) + 1 AS TIMESTAMPTZ) - INTERVAL 1 MICROSECOND
           AS created,
         CAST(event_timestamp AS DATE) AS dt
  FROM ev
  WINDOW w AS (PARTITION BY user_id ORDER BY event_timestamp, event_id
               ROWS BETWEEN {long} PRECEDING AND 1 PRECEDING)
  ORDER BY dt, event_timestamp, event_id
) TO '{out}/training_examples' (FORMAT parquet, {codec}, PARTITION_BY (dt), OVERWRITE_OR_IGNORE);
COPY (
  SELECT user_id,
         list(item_id ORDER BY event_timestamp, event_id) AS item_seq,
         list(epoch_us(event_timestamp) ORDER BY event_timestamp, event_id) AS ts_seq,
         list(event_type ORDER BY event_timestamp, event_id) AS event_type_seq,
         list(value ORDER BY event_timestamp, event_id) AS value_seq,
         item_seq[-{short}:] AS short_item_seq, len(item_seq) AS seq_len,
         max(event_timestamp) AS last_event_ts, last_event_ts AS event_timestamp,
         {created} AS created
  FROM (SELECT *, row_number() OVER (PARTITION BY user_id
                   ORDER BY event_timestamp DESC, event_id DESC) AS back FROM ev)
  WHERE back <= {long}
  GROUP BY user_id
  ORDER BY user_id
) TO '{out}/user_behavior_sequences.parquet' (FORMAT parquet, {codec});
COPY (
  SELECT * EXCLUDE (zip) FROM (
    SELECT user_id,
           count(*) FILTER (WHERE event_timestamp >= TIMESTAMPTZ '{start}') AS events_1d,
           count(*) FILTER (WHERE event_timestamp >= {start_7d}) AS events_7d,
           count(*) FILTER (WHERE event_timestamp >= {start_30d}) AS events_30d,
           count(*) AS events_total, avg(value)::FLOAT AS mean_value,
           min(event_timestamp) AS first_seen_ts,
           date_diff('day', CAST(min(event_timestamp) AS DATE), DATE '{day}') AS tenure_days,
           {created} AS event_timestamp, {created} AS created
    FROM ev GROUP BY user_id
  ) LEFT JOIN read_parquet('{users}') USING (user_id)
  ORDER BY user_id
) TO '{out}/user_features.parquet' (FORMAT parquet, {codec});
COPY (
  SELECT item_id, coalesce(pop_1d, 0) AS pop_1d, coalesce(pop_7d, 0) AS pop_7d,
         coalesce(pop_30d, 0) AS pop_30d, coalesce(pop_total, 0) AS pop_total, first_seen_ts,
         title, year, genres, {created} AS event_timestamp, {created} AS created
  FROM (
    SELECT item_id,
           count(*) FILTER (WHERE event_timestamp >= TIMESTAMPTZ '{start}') AS pop_1d,
           count(*) FILTER (WHERE event_timestamp >= {start_7d}) AS pop_7d,
           count(*) FILTER (WHERE event_timestamp >= {start_30d}) AS pop_30d,
           count(*) AS pop_total, min(event_timestamp) AS first_seen_ts
    FROM ev GROUP BY item_id
  ) FULL OUTER JOIN read_parquet('{items}') USING (item_id)
  ORDER BY item_id
) TO '{out}/item_features.parquet' (FORMAT parquet, {codec});
"""


def day_events(lake_dir: Path, day: date) -> int:
    return sum(pq.read_metadata(f).num_rows for f in partition_dir(lake_dir, day).glob("*.parquet"))


def events_up_to(lake_dir: Path, day: date) -> int:
    return sum(day_events(lake_dir, d) for d in landed_days(lake_dir) if d <= day)


def duckdb_sql(lake_dir: Path, out: Path, day: date) -> str:
    """The DuckDB statements of the rebuild up to the end of ``day``, writing under ``out``."""
    return DUCKDB_REBUILD.format(
        events=lake_dir / "raw" / "events",
        users=lake_dir / "raw" / "users" / "users.parquet",
        items=lake_dir / "raw" / "items" / "items.parquet",
        codec="COMPRESSION zstd, COMPRESSION_LEVEL 1",
        day=day,
        created=f"TIMESTAMPTZ '{day + timedelta(days=1)} 00:00:00+00' - INTERVAL 1 MICROSECOND",
        start=f"{day} 00:00:00+00",
        end=f"{day + timedelta(days=1)} 00:00:00+00",
        out=out,
        long=LONG,
        short=SHORT,
        start_7d=f"TIMESTAMPTZ '{day - timedelta(days=6)} 00:00:00+00'",
        start_30d=f"TIMESTAMPTZ '{day - timedelta(days=29)} 00:00:00+00'",
    )


def duckdb_rebuild(lake_dir: Path, out: Path, day: date) -> float:
    """Seconds DuckDB (2 threads) takes for the rebuild transformation up to the end of ``day``."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    sql = duckdb_sql(lake_dir, out, day)
    connection = duckdb.connect()
    connection.execute(
        "SET threads = 2; SET TimeZone = 'UTC'; SET preserve_insertion_order = false;"
        " SET enable_progress_bar = false"
    )
    started = time.perf_counter()
    connection.execute(sql)
    elapsed = time.perf_counter() - started
    connection.close()
    return elapsed


def gate_seconds(root: Path) -> float:
    """Seconds of the raw gate (GX on pandas, import excluded) on the lake's busiest day."""
    import great_expectations  # noqa: F401  (import cost measured separately: ~4 s)

    lake_dir = root / "lake"
    busiest = max(landed_days(lake_dir), key=lambda d: day_events(lake_dir, d))
    spec = QualitySpec(
        lake_dir=lake_dir,
        features_dir=root / "features",
        quarantine_dir=root / "q",
        reports_dir=root / "reports",
    )
    started = time.perf_counter()
    outcome = validate_raw(spec, busiest)
    elapsed = time.perf_counter() - started
    assert outcome.success, outcome.failures
    return elapsed


def run_scenario(
    name: str, root: Path, driver_memory: str, shuffle_partitions: int
) -> dict[str, float | int | str]:
    try:
        return timed_scenario(name, root, driver_memory, shuffle_partitions)
    except Exception as error:  # py4j errors do not pickle back to the parent process
        raise RuntimeError(f"scenario {name} failed: {error}") from None


def timed_scenario(
    name: str, root: Path, driver_memory: str, shuffle_partitions: int
) -> dict[str, float | int | str]:
    spark = get_session(
        SparkConfig(
            master="local[2]", shuffle_partitions=shuffle_partitions, driver_memory=driver_memory
        )
    )
    lake_dir = root / "lake"
    days = landed_days(lake_dir)
    before, last = days[-2], days[-1]
    spec = BuildSpec(lake_dir=lake_dir, features_dir=root / "features", quarantine_dir=root / "q")
    shutil.rmtree(spec.features_dir, ignore_errors=True)
    history = events_up_to(lake_dir, before)

    rebuild_runs = []
    for _ in range(2):  # cold JVM (what a CLI rebuild pays), then warm
        started = time.perf_counter()
        build_day(spark, spec, before, rebuild=True)
        rebuild_runs.append(time.perf_counter() - started)
    cold_s, warm_s = rebuild_runs

    daily_runs = []
    for _ in range(2):  # the same incremental day twice: the best of two hides JIT warm-up
        started = time.perf_counter()
        daily = build_day(spark, spec, last)
        daily_runs.append(time.perf_counter() - started)
        assert daily.mode == "incremental"
    daily_s = min(daily_runs)
    print(f"{name}: Spark rebuild {cold_s:.1f} s cold, {warm_s:.1f} s warm", flush=True)
    return {
        "scenario": name,
        "history_events": history,
        "rebuild_day": before.isoformat(),
        "rebuild_cold_s": cold_s,
        "rebuild_s": warm_s,
        "rebuild_events_per_s": history / warm_s,
        "daily_events": daily.events,
        "daily_s": daily_s,
    }


def duckdb_best(root: Path, day: date) -> float:
    """Best of two DuckDB rebuilds up to the end of ``day``."""
    return min(duckdb_rebuild(root / "lake", root / "duckdb", day) for _ in range(2))


def run_in_fresh_processes(
    name: str, root: Path, args: argparse.Namespace
) -> dict[str, float | int | str]:
    """Spark, then DuckDB, each in a process of its own.

    Every scenario starts with a cold JVM, and DuckDB never shares the machine's memory
    with a JVM heap that outlives its jobs (at 10M the two together exceeded 24 GiB).
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        job = pool.submit(run_scenario, name, root, args.driver_memory, args.shuffle_partitions)
        result = job.result()
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        day = date.fromisoformat(str(result["rebuild_day"]))
        duck_s = pool.submit(duckdb_best, root, day).result()
    cold_s, warm_s = float(result["rebuild_cold_s"]), float(result["rebuild_s"])
    return {
        **result,
        "duckdb_rebuild_s": duck_s,
        "cold_over_duckdb": cold_s / duck_s,
        "spark_over_duckdb": warm_s / duck_s,
    }


# name: (events, days, users)
SYNTHETIC = {
    "synthetic-100k": (100_000, 30, 20_000),
    "synthetic-1m": (1_000_000, 300, 20_000),
    "synthetic-10m": (10_000_000, 300, 200_000),
}
SCENARIOS = (*SYNTHETIC, "ml-1m")
DEFAULT_SCENARIOS = ("synthetic-100k", "synthetic-1m", "ml-1m")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/grank-bench"))
    parser.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: %(default)s)",
    )
    parser.add_argument("--skip-ml1m", action="store_true", help="drop ml-1m from --scenarios")
    parser.add_argument(
        "--driver-memory", default="4g", help="Spark heap (the 10M rebuild needs ~12g)"
    )
    parser.add_argument("--shuffle-partitions", type=int, default=8)
    args = parser.parse_args()
    chosen = [name for name in args.scenarios.split(",") if name]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    if args.skip_ml1m:
        chosen = [name for name in chosen if name != "ml-1m"]
    scenarios: list[tuple[str, Path]] = []
    for name in chosen:
        root = args.workdir / name
        if not (root / "lake").exists():
            if name == "ml-1m":
                shutil.copytree(REPO / "data" / "lake", root / "lake")
            else:
                events, days, users = SYNTHETIC[name]
                spec = SyntheticSpec(
                    users=users, items=10_000, events=events, days=days, start=date(2024, 1, 1)
                )
                generate(spec, root / "lake")
        scenarios.append((name, root))

    results = [run_in_fresh_processes(name, root, args) for name, root in scenarios]
    print(
        "| scenario | history events | rebuild s cold / warm | events/s (warm) | DuckDB s"
        " | Spark/DuckDB cold / warm | daily events | daily job s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['scenario']} | {r['history_events']:,} |"
            f" {r['rebuild_cold_s']:.1f} / {r['rebuild_s']:.1f} |"
            f" {r['rebuild_events_per_s']:,.0f} | {r['duckdb_rebuild_s']:.1f} |"
            f" {r['cold_over_duckdb']:.2f}x / {r['spark_over_duckdb']:.2f}x |"
            f" {r['daily_events']:,} | {r['daily_s']:.1f} |"
        )
    if "ml-1m" in chosen:
        seconds = gate_seconds(args.workdir / "ml-1m")
        print(f"raw GX gate (pandas) on ML-1M's busiest day: {seconds:.1f} s")
    by_name = {r["scenario"]: r for r in results}
    if {"synthetic-1m", "synthetic-100k"} <= by_name.keys():
        ratio = float(by_name["synthetic-1m"]["daily_s"]) / float(
            by_name["synthetic-100k"]["daily_s"]
        )
        print(f"daily job at 10x history / 1x history (same events per day): {ratio:.2f}x")


if __name__ == "__main__":
    main()
