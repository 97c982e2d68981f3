"""The Spark feature job on hand-made events (expected values written out) and on ML-100K.

Covers the point-in-time boundary, the (event_timestamp, event_id) tie-break, sequence
truncation, windows, incremental == rebuild, byte-identical re-runs, and refusals.
"""

from __future__ import annotations

import random
import shutil
from collections import defaultdict
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from common.atomic import sha256_file
from common.errors import UserFacingError
from features import feature_tables as ft
from features.config import BuildConfig
from features.jobs import BuildSpec, build_day, previous_state_day
from features.lake import EVENT_SCHEMA, ITEM_SCHEMA, USER_SCHEMA, land_dimensions, partition_dir
from grank.cli import cli
from tests.conftest import make_settings

pytestmark = pytest.mark.spark

D1, D2 = date(2024, 1, 1), date(2024, 1, 2)


def at(day: date, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, second, micro, tzinfo=UTC)


def us(moment: datetime) -> int:
    return int((moment - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(microseconds=1))


def raw_table(rows: list[tuple[Any, ...]], schema: pa.Schema = EVENT_SCHEMA) -> pa.Table:
    """Rows of (event_id, user_id, item_id, ts[, event_type, value, ingestion]) as a raw table."""
    columns: dict[str, list[Any]] = {name: [] for name in EVENT_SCHEMA.names}
    for row in rows:
        event_id, user_id, item_id, ts, *rest = row
        event_type, value, ingestion = [*rest, None, None, None][:3]
        columns["event_id"].append(event_id)
        columns["user_id"].append(user_id)
        columns["item_id"].append(item_id)
        columns["event_type"].append(event_type or "rating")
        columns["value"].append(value if value is not None else 4.0)
        columns["event_timestamp"].append(ts)
        day = ts.date() if isinstance(ts, datetime) else D1
        columns["ingestion_time"].append(ingestion or at(day + timedelta(days=1)))
    return pa.table(columns, schema=schema)


def write_raw(lake_dir: Path, day: date, table: pa.Table) -> Path:
    """Write a raw partition as-is (no validation: tests also write broken ones)."""
    folder = partition_dir(lake_dir, day)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "part-00000.parquet")
    return folder


def write_dimensions(lake_dir: Path, items: int = 6, users: int = 3) -> None:
    land_dimensions(
        lake_dir,
        pa.table(
            {
                "item_id": list(range(1, items + 1)),
                "title": [f"t{i}" for i in range(1, items + 1)],
                "year": [2000] * items,
                "genres": ["Drama"] * items,
            },
            schema=ITEM_SCHEMA,
        ),
        pa.table(
            {
                "user_id": list(range(1, users + 1)),
                "age": [30] * users,
                "gender": ["F"] * users,
                "occupation": ["x"] * users,
                "zip": ["0"] * users,
            },
            schema=USER_SCHEMA,
        ),
    )


HAND_MADE = {
    # written out of tie-break order on purpose: e2 and e1 share a timestamp
    D1: [
        (0, 1, 1, at(D1, 10)),
        (2, 1, 2, at(D1, 12)),
        (1, 1, 3, at(D1, 12)),
        (3, 2, 1, at(D1, 23, 59, 59, 999_999)),
    ],
    D2: [
        (4, 1, 4, at(D2)),  # exactly D1's cut-off: belongs to D2
        (5, 2, 5, at(D2, 8)),
        (6, 1, 5, at(D2, 9)),
    ],
}


def hand_made_lake(root: Path) -> BuildSpec:
    settings = make_settings(root)
    for day, rows in HAND_MADE.items():
        write_raw(settings.lake_dir, day, raw_table(rows))
    write_dimensions(settings.lake_dir)
    return BuildSpec(
        lake_dir=settings.lake_dir,
        features_dir=settings.features_dir,
        quarantine_dir=settings.quarantine_dir,
        config=BuildConfig(long_seq_len=3, short_seq_len=2, windows_days=(1, 7, 30)),
    )


def read_rows(features_dir: Path, table: str, day: date, key: str) -> list[dict[str, Any]]:
    folder = ft.partition_path(ft.table_dir(features_dir, table), day)
    return sorted(pq.read_table(folder).to_pylist(), key=lambda row: row[key])


def test_hand_made_sequences_boundary_and_tie_break(spark, tmp_path):
    spec = hand_made_lake(tmp_path)
    first = build_day(spark, spec, D1)
    assert (first.mode, first.events, first.example_days) == ("rebuild", 4, [D1])

    sequences = read_rows(spec.features_dir, ft.USER_BEHAVIOR_SEQUENCES, D1, "user_id")
    assert [
        (r["user_id"], r["item_seq"], r["short_item_seq"], r["seq_len"]) for r in sequences
    ] == [
        (1, [1, 3, 2], [3, 2], 3),
        (2, [1], [1], 1),
    ]
    assert sequences[0]["ts_seq"] == [us(at(D1, 10)), us(at(D1, 12)), us(at(D1, 12))]
    assert sequences[1]["last_event_ts"] == at(D1, 23, 59, 59, 999_999)
    assert sequences[1]["event_timestamp"] == sequences[1]["last_event_ts"]
    assert {r["created"] for r in sequences} == {at(D1, 23, 59, 59, 999_999)}

    examples = read_rows(spec.features_dir, ft.TRAINING_EXAMPLES, D1, "event_id")
    assert [(r["event_id"], r["target_item_id"], r["history_item_seq"]) for r in examples] == [
        (0, 1, []),
        (1, 3, [1]),
        (2, 2, [1, 3]),
        (3, 1, []),
    ]

    second = build_day(spark, spec, D2)
    assert (second.mode, second.events) == ("incremental", 3)
    sequences = read_rows(spec.features_dir, ft.USER_BEHAVIOR_SEQUENCES, D2, "user_id")
    assert [
        (r["user_id"], r["item_seq"], r["short_item_seq"], r["seq_len"]) for r in sequences
    ] == [
        (1, [2, 4, 5], [4, 5], 3),
        (2, [1, 5], [1, 5], 2),
    ]
    examples = read_rows(spec.features_dir, ft.TRAINING_EXAMPLES, D2, "event_id")
    assert [(r["event_id"], r["history_item_seq"], r["history_len"]) for r in examples] == [
        (4, [1, 3, 2], 3),  # the event at exactly 00:00 of D2 sees all of D1
        (5, [1], 1),
        (6, [3, 2, 4], 3),
    ]
    assert examples[1]["history_ts_seq"] == [us(at(D1, 23, 59, 59, 999_999))]

    users = read_rows(spec.features_dir, ft.USER_FEATURES, D2, "user_id")
    assert [
        (r["user_id"], r["events_1d"], r["events_7d"], r["events_total"], r["tenure_days"])
        for r in users
    ] == [(1, 2, 5, 5, 1), (2, 1, 2, 2, 1)]
    assert users[0]["first_seen_ts"] == at(D1, 10)
    assert users[0]["mean_value"] == pytest.approx(4.0)
    items = {r["item_id"]: r for r in read_rows(spec.features_dir, ft.ITEM_FEATURES, D2, "item_id")}
    assert [(items[i]["pop_1d"], items[i]["pop_7d"], items[i]["pop_total"]) for i in (1, 5, 6)] == [
        (0, 2, 2),
        (2, 2, 2),
        (0, 0, 0),
    ]
    assert items[6]["first_seen_ts"] is None
    assert items[6]["title"] == "t6"


def test_histories_equal_a_direct_computation_across_ties_truncation_and_state(spark, tmp_path):
    """Random events, most sharing a timestamp with another event of the same user, event ids
    not in time order, users with more events than ``long_seq_len`` before the incremental
    day: every example's history is the ≤ 4 events before it, computed directly."""
    rng = random.Random(7)
    events: dict[date, list[tuple[int, int, int, datetime]]] = {D1: [], D2: []}
    for n, event_id in enumerate(rng.sample(range(1000), 120)):
        day = D1 if n < 80 else D2
        moment = at(day, rng.choice([0, 6, 12]), second=rng.choice([0, 1]))
        events[day].append((event_id, rng.choice([1, 1, 1, 2, 3]), rng.randint(1, 6), moment))
    settings = make_settings(tmp_path)
    for day, rows in events.items():
        write_raw(settings.lake_dir, day, raw_table(rows))
    write_dimensions(settings.lake_dir)
    spec = BuildSpec(
        lake_dir=settings.lake_dir,
        features_dir=settings.features_dir,
        quarantine_dir=settings.quarantine_dir,
        config=BuildConfig(long_seq_len=4, short_seq_len=2),
    )
    assert build_day(spark, spec, D1).mode == "rebuild"
    assert build_day(spark, spec, D2).mode == "incremental"

    # the documented re-delivery rule: of the events sharing user, item, type and time,
    # only the lowest event id is kept
    first_copy: dict[tuple[int, int, datetime], int] = {}
    for event_id, user, item, moment in events[D1] + events[D2]:
        key = (user, item, moment)
        first_copy[key] = min(event_id, first_copy.get(key, event_id))
    kept = {
        day: [r for r in rows if first_copy[r[1], r[2], r[3]] == r[0]]
        for day, rows in events.items()
    }
    assert sum(map(len, kept.values())) < 120  # the draw holds re-deliveries

    expected: dict[int, tuple[list[int], list[int], int]] = {}
    before: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for event_id, user, item, moment in sorted(
        kept[D1] + kept[D2], key=lambda row: (row[3], row[0])
    ):
        history = before[user][-4:]
        expected[event_id] = ([i for i, _ in history], [t for _, t in history], len(history))
        before[user].append((item, us(moment)))
    for day in (D1, D2):
        folder = ft.partition_path(ft.table_dir(spec.features_dir, ft.TRAINING_EXAMPLES), day)
        rows = pq.read_table(folder).to_pylist()
        assert [(r["event_timestamp"], r["event_id"]) for r in rows] == sorted(
            (moment, event_id) for event_id, _, _, moment in kept[day]
        )
        assert {
            r["event_id"]: (r["history_item_seq"], r["history_ts_seq"], r["history_len"])
            for r in rows
        } == {event_id: expected[event_id] for event_id, *_ in kept[day]}


def test_refuses_missing_quarantined_out_of_day_and_unbuilt_gap(spark, tmp_path):
    spec = hand_made_lake(tmp_path)
    with pytest.raises(UserFacingError, match="no raw events for 2024-01-03"):
        build_day(spark, spec, date(2024, 1, 3))
    quarantined = spec.quarantine_dir / "raw" / "events" / "dt=2024-01-03"
    quarantined.mkdir(parents=True)
    with pytest.raises(UserFacingError, match="quarantined"):
        build_day(spark, spec, date(2024, 1, 3))
    # an event at D+1 00:00:00.000000 filed under D is outside D: refused, nothing written
    write_raw(spec.lake_dir, date(2024, 1, 4), raw_table([(9, 1, 1, at(date(2024, 1, 5)))]))
    with pytest.raises(UserFacingError, match="outside that day"):
        build_day(spark, spec, date(2024, 1, 4))
    assert not spec.features_dir.exists()
    build_day(spark, spec, D1)
    write_raw(spec.lake_dir, date(2024, 1, 3), raw_table([(7, 1, 2, at(date(2024, 1, 3), 5))]))
    with pytest.raises(UserFacingError, match="features of 2024-01-02 are not built"):
        build_day(spark, spec, date(2024, 1, 3))
    # a quarantined day between the last built day and D must not be skipped silently
    with pytest.raises(UserFacingError, match="2024-01-03 are quarantined"):
        previous_state_day(spec, date(2024, 1, 5))


def copy_lake_days(source: Path, target: Path, first: date, last: date) -> None:
    """A lake holding only ``first..last`` of ``source`` (raw partitions + dimensions)."""
    for name in ("items", "users"):
        shutil.copytree(source / "raw" / name, target / "raw" / name)
    for folder in sorted((source / "raw" / "events").iterdir()):
        if first.isoformat() <= folder.name[3:] <= last.isoformat():
            shutil.copytree(folder, target / "raw" / "events" / folder.name)


def table_rows(features_dir: Path, table: str, days: list[date]) -> list[dict[str, Any]]:
    rows = []
    for day in days:
        rows += pq.read_table(ft.partition_path(ft.table_dir(features_dir, table), day)).to_pylist()
    return rows


def test_ml100k_incremental_equals_rebuild_and_reruns_are_byte_identical(
    spark, tmp_path, ml100k_settings
):
    first, bootstrap, last = date(1998, 3, 20), date(1998, 3, 28), date(1998, 3, 31)
    incremental = make_settings(tmp_path / "incremental")
    rebuild = make_settings(tmp_path / "rebuild")
    for settings in (incremental, rebuild):
        copy_lake_days(ml100k_settings.lake_dir, settings.lake_dir, first, last)

    runner = CliRunner()
    env = {"GRANK_DATA_ROOT": str(incremental.data_root), "GRANK_DATASET": "ml-100k"}
    result = runner.invoke(cli, ["features", "build", "--date", bootstrap.isoformat()], env=env)
    assert result.exit_code == 0, result.output
    assert "rebuild" in result.output
    result = runner.invoke(
        cli, ["features", "build", "--from", "1998-03-29", "--to", last.isoformat()], env=env
    )
    assert result.exit_code == 0, result.output
    assert result.output.count(": incremental,") == 3

    env["GRANK_DATA_ROOT"] = str(rebuild.data_root)
    result = runner.invoke(
        cli, ["features", "build", "--date", last.isoformat(), "--rebuild"], env=env
    )
    assert result.exit_code == 0, result.output

    days = ft.partition_days(ft.table_dir(rebuild.features_dir, ft.TRAINING_EXAMPLES))
    assert days == ft.partition_days(ft.table_dir(incremental.features_dir, ft.TRAINING_EXAMPLES))
    assert days[0] >= first and days[-1] == last
    for table in ft.PUBLIC_TABLES:
        if table == ft.USER_BEHAVIOR_SEQUENCES:
            continue  # a delta table: compared as of the last day below
        table_days = days if table == ft.TRAINING_EXAMPLES else [last]
        built = table_rows(incremental.features_dir, table, table_days)
        assert built, table
        assert built == table_rows(rebuild.features_dir, table, table_days), table

    # user_behavior_sequences holds deltas after a bootstrap that holds every user: the
    # latest row per user as of the last day (what Feast serves) must equal the rebuild's
    # all-users partition; only ``created`` (when each row was written) differs.
    def as_of(features_dir: Path, table_days: list[date]) -> list[dict]:
        latest: dict[int, dict] = {}
        for row in table_rows(features_dir, ft.USER_BEHAVIOR_SEQUENCES, table_days):
            row.pop("created")
            if (
                row["user_id"] not in latest
                or row["event_timestamp"] >= latest[row["user_id"]]["event_timestamp"]
            ):
                latest[row["user_id"]] = row
        return sorted(latest.values(), key=lambda r: r["user_id"])

    incremental_days = ft.partition_days(
        ft.table_dir(incremental.features_dir, ft.USER_BEHAVIOR_SEQUENCES)
    )
    assert incremental_days == [bootstrap, date(1998, 3, 29), date(1998, 3, 30), last]
    everyone = as_of(rebuild.features_dir, [last])
    assert len(everyone) > len(
        table_rows(incremental.features_dir, ft.USER_BEHAVIOR_SEQUENCES, [last])
    )
    assert as_of(incremental.features_dir, incremental_days) == everyone

    sequences = table_rows(incremental.features_dir, ft.USER_BEHAVIOR_SEQUENCES, [last])
    assert all(row["ts_seq"] == sorted(row["ts_seq"]) for row in sequences)
    assert max(row["seq_len"] for row in sequences) == 200

    # a rebuild also writes every earlier day's user and item features (training reads each
    # example's features as of the day before it): byte for byte what the daily runs wrote
    for table in (ft.USER_FEATURES, ft.ITEM_FEATURES):
        daily = ft.table_dir(incremental.features_dir, table)
        rebuilt = ft.table_dir(rebuild.features_dir, table)
        assert ft.partition_days(rebuilt) == ft.partition_days(daily) == days, table
        for day in (bootstrap, date(1998, 3, 29), date(1998, 3, 30)):
            assert sha256_file(ft.partition_path(rebuilt, day) / ft.PART_FILE) == sha256_file(
                ft.partition_path(daily, day) / ft.PART_FILE
            ), (table, day)

    partition = ft.partition_path(ft.table_dir(incremental.features_dir, ft.USER_FEATURES), last)
    before = {p.name: sha256_file(p) for p in partition.iterdir()}
    spec = BuildSpec(
        lake_dir=incremental.lake_dir,
        features_dir=incremental.features_dir,
        quarantine_dir=incremental.quarantine_dir,
    )
    assert build_day(spark, spec, last).mode == "incremental"
    assert (
        {p.name: sha256_file(p) for p in partition.iterdir()}
        == before
        == {ft.PART_FILE: before[ft.PART_FILE]}
    )
    # states within keep_state_days (7) of the newest are kept, for cascades; older go
    state = ft.state_dir(incremental.features_dir, ft.USER_STATE)
    assert ft.partition_days(state) == [bootstrap, date(1998, 3, 29), date(1998, 3, 30), last]
    spec = replace(spec, config=replace(spec.config, keep_state_days=0))
    assert build_day(spark, spec, last).mode == "incremental"
    assert ft.partition_days(state) == [date(1998, 3, 30), last]
