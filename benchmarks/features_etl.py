"""Benchmark of the Spark feature job: rebuild vs daily incremental, Spark vs DuckDB, 10x history.

Usage (results go to docs/benchmarks.md, "Spark feature ETL")::

    .venv/bin/python benchmarks/features_etl.py --workdir /tmp/grank-bench [--skip-ml1m]

Scenarios, each in its own data root under ``--workdir``:
- ``synthetic-1m``: 1M synthetic events over 300 days (``features.synthetic``);
- ``synthetic-100k``: 100k events over 30 days: the same events per day with 1/10 of
  the history, so its daily job is the "1x history" twin of the 1M one;
- ``ml-1m``: the real lake under ``data/lake`` (copied).
For each: a full rebuild at the second-to-last day (all history, one Spark job, training
examples for every day), then the daily incremental job of the last day; and the same
rebuild transformation in DuckDB SQL over the same Parquet files.
"""

from __future__ import annotations

import argparse
import shutil
import time
from datetime import date, timedelta
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from features.jobs import BuildSpec, build_day
from features.lake import landed_days, partition_dir
from features.quality import QualitySpec, validate_raw
from features.spark import get_session
from features.synthetic import SyntheticSpec, generate

REPO = Path(__file__).resolve().parent.parent
LONG, SHORT = 200, 64

DUCKDB_REBUILD = """
CREATE OR REPLACE VIEW ev AS
  SELECT * FROM read_parquet('{events}/*/*.parquet') WHERE event_timestamp < TIMESTAMPTZ '{end}';
COPY (
  SELECT event_id, user_id, item_id AS target_item_id, value AS target_value,
         coalesce(list(item_id) OVER w, []) AS history_item_seq,
         coalesce(list(epoch_us(event_timestamp)) OVER w, []) AS history_ts_seq,
         count(*) OVER w AS history_len, event_timestamp,
         CAST(event_timestamp AS DATE) AS dt
  FROM ev
  WINDOW w AS (PARTITION BY user_id ORDER BY event_timestamp, event_id
               ROWS BETWEEN {long} PRECEDING AND 1 PRECEDING)
  ORDER BY dt, event_timestamp, event_id
) TO '{out}/training_examples' (FORMAT parquet, PARTITION_BY (dt), OVERWRITE_OR_IGNORE);
COPY (
  SELECT user_id,
         list(item_id ORDER BY event_timestamp, event_id) AS item_seq,
         list(epoch_us(event_timestamp) ORDER BY event_timestamp, event_id) AS ts_seq,
         list(event_type ORDER BY event_timestamp, event_id) AS event_type_seq,
         list(value ORDER BY event_timestamp, event_id) AS value_seq,
         item_seq[-{short}:] AS short_item_seq, len(item_seq) AS seq_len,
         max(event_timestamp) AS last_event_ts
  FROM (SELECT *, row_number() OVER (PARTITION BY user_id
                   ORDER BY event_timestamp DESC, event_id DESC) AS back FROM ev)
  WHERE back <= {long}
  GROUP BY user_id HAVING max(event_timestamp) >= TIMESTAMPTZ '{start}'
  ORDER BY user_id
) TO '{out}/user_behavior_sequences.parquet' (FORMAT parquet);
COPY (
  SELECT user_id,
         count(*) FILTER (WHERE event_timestamp >= TIMESTAMPTZ '{start}') AS events_1d,
         count(*) FILTER (WHERE event_timestamp >= {start_7d}) AS events_7d,
         count(*) FILTER (WHERE event_timestamp >= {start_30d}) AS events_30d,
         count(*) AS events_total, avg(value)::FLOAT AS mean_value,
         min(event_timestamp) AS first_seen_ts
  FROM ev GROUP BY user_id ORDER BY user_id
) TO '{out}/user_features.parquet' (FORMAT parquet);
COPY (
  SELECT item_id,
         count(*) FILTER (WHERE event_timestamp >= TIMESTAMPTZ '{start}') AS pop_1d,
         count(*) FILTER (WHERE event_timestamp >= {start_7d}) AS pop_7d,
         count(*) FILTER (WHERE event_timestamp >= {start_30d}) AS pop_30d,
         count(*) AS pop_total, min(event_timestamp) AS first_seen_ts
  FROM ev GROUP BY item_id ORDER BY item_id
) TO '{out}/item_features.parquet' (FORMAT parquet);
"""


def day_events(lake_dir: Path, day: date) -> int:
    return sum(pq.read_metadata(f).num_rows for f in partition_dir(lake_dir, day).glob("*.parquet"))


def events_up_to(lake_dir: Path, day: date) -> int:
    return sum(day_events(lake_dir, d) for d in landed_days(lake_dir) if d <= day)


def duckdb_rebuild(lake_dir: Path, out: Path, day: date) -> float:
    """Seconds DuckDB (2 threads) takes for the rebuild transformation up to the end of ``day``."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    sql = DUCKDB_REBUILD.format(
        events=lake_dir / "raw" / "events",
        start=f"{day} 00:00:00+00",
        end=f"{day + timedelta(days=1)} 00:00:00+00",
        out=out,
        long=LONG,
        short=SHORT,
        start_7d=f"TIMESTAMPTZ '{day - timedelta(days=6)} 00:00:00+00'",
        start_30d=f"TIMESTAMPTZ '{day - timedelta(days=29)} 00:00:00+00'",
    )
    connection = duckdb.connect()
    connection.execute(
        "SET threads = 2; SET TimeZone = 'UTC'; SET preserve_insertion_order = false"
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


def run_scenario(name: str, root: Path) -> dict[str, float | int | str]:
    spark = get_session(master="local[2]", shuffle_partitions=8, driver_memory="4g")
    lake_dir = root / "lake"
    days = landed_days(lake_dir)
    before, last = days[-2], days[-1]
    spec = BuildSpec(lake_dir=lake_dir, features_dir=root / "features", quarantine_dir=root / "q")
    shutil.rmtree(spec.features_dir, ignore_errors=True)
    history = events_up_to(lake_dir, before)

    started = time.perf_counter()
    build_day(spark, spec, before, rebuild=True)
    rebuild_s = time.perf_counter() - started

    daily_runs = []
    for _ in range(2):  # the same incremental day twice: the best of two hides JIT warm-up
        started = time.perf_counter()
        daily = build_day(spark, spec, last)
        daily_runs.append(time.perf_counter() - started)
        assert daily.mode == "incremental"
    daily_s = min(daily_runs)

    duck_s = duckdb_rebuild(lake_dir, root / "duckdb", before)
    return {
        "scenario": name,
        "history_events": history,
        "rebuild_s": rebuild_s,
        "rebuild_events_per_s": history / rebuild_s,
        "duckdb_rebuild_s": duck_s,
        "spark_over_duckdb": rebuild_s / duck_s,
        "daily_events": daily.events,
        "daily_s": daily_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/grank-bench"))
    parser.add_argument("--skip-ml1m", action="store_true")
    args = parser.parse_args()
    scenarios: list[tuple[str, Path]] = []
    for name, events, days in (("synthetic-100k", 100_000, 30), ("synthetic-1m", 1_000_000, 300)):
        root = args.workdir / name
        if not (root / "lake").exists():
            spec = SyntheticSpec(
                users=20_000, items=10_000, events=events, days=days, start=date(2024, 1, 1)
            )
            generate(spec, root / "lake")
        scenarios.append((name, root))
    if not args.skip_ml1m:
        root = args.workdir / "ml-1m"
        if not (root / "lake").exists():
            shutil.copytree(REPO / "data" / "lake", root / "lake")
        scenarios.append(("ml-1m", root))

    results = [run_scenario(name, root) for name, root in scenarios]
    print(
        "| scenario | history events | rebuild s | events/s | DuckDB rebuild s | Spark/DuckDB"
        " | daily events | daily job s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['scenario']} | {r['history_events']:,} | {r['rebuild_s']:.1f} |"
            f" {r['rebuild_events_per_s']:,.0f} | {r['duckdb_rebuild_s']:.1f} |"
            f" {r['spark_over_duckdb']:.2f}x | {r['daily_events']:,} | {r['daily_s']:.1f} |"
        )
    if not args.skip_ml1m:
        seconds = gate_seconds(args.workdir / "ml-1m")
        print(f"raw GX gate (pandas) on ML-1M's busiest day: {seconds:.1f} s")
    by_name = {r["scenario"]: r for r in results}
    ratio = float(by_name["synthetic-1m"]["daily_s"]) / float(by_name["synthetic-100k"]["daily_s"])
    print(f"daily job at 10x history / 1x history (same events per day): {ratio:.2f}x")


if __name__ == "__main__":
    main()
