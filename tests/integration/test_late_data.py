"""Late, corrected and re-run days of ML-100K: whatever the order of landings and builds, every
built day's partitions end up byte-identical to a clean build.

The references are built once per module on five consecutive ML-100K days (each landed
with its final content): ``--rebuild`` of each day, and a clean in-order daily build. A
property-style test then draws a random landing order (fixed seed), with some days first
landed with wrong content and corrected later, each landing followed by the build of its
day, as the daily DAG does, plus a re-run; named tests cover each scenario on its own.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import subprocess
import sys
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from common.atomic import CRASH_AT_ENV, sha256_file
from common.errors import UserFacingError
from features import feature_tables as ft
from features import lake, lineage
from features.jobs import BuildSpec, build, build_one
from grank.cli import cli
from grank.config import REPO_ROOT, Settings
from tests.conftest import make_settings
from tests.integration.test_features_jobs import (
    D1,
    D2,
    HAND_MADE,
    at,
    hand_made_lake,
    raw_table,
    read_rows,
    write_raw,
)

pytestmark = pytest.mark.spark

DAYS = [date(1998, 4, 12) + timedelta(days=n) for n in range(5)]
REBUILD_TABLES = (ft.USER_FEATURES, ft.ITEM_FEATURES, ft.TRAINING_EXAMPLES)
Hashes = dict[tuple[str, date], str]


def final_events(ml100k_settings: Settings, day: date) -> pa.Table:
    return lake.read_partition(ml100k_settings.lake_dir, day)


def wrong_events(events: pa.Table) -> pa.Table:
    """What a producer delivered first: the last fifth missing and every value 1.0."""
    kept = events.slice(0, max(1, events.num_rows * 4 // 5))
    index = kept.schema.get_field_index("value")
    ones = pa.array([1.0] * kept.num_rows, pa.float32())
    return kept.set_column(index, kept.schema.field("value"), ones)


def new_root(root: Path, ml100k_settings: Settings) -> tuple[Settings, BuildSpec]:
    """A data root with the dimensions and no events yet."""
    settings = make_settings(root)
    for name in ("items", "users"):
        shutil.copytree(ml100k_settings.lake_dir / "raw" / name, settings.lake_dir / "raw" / name)
    spec = BuildSpec(
        lake_dir=settings.lake_dir,
        features_dir=settings.features_dir,
        quarantine_dir=settings.quarantine_dir,
    )
    return settings, spec


def partition_hashes(spec: BuildSpec, tables: tuple[str, ...], days: list[date]) -> Hashes:
    hashes = {}
    for table in tables:
        folder = ft.table_dir(spec.features_dir, table)
        if table in ft.STATE_TABLES:
            folder = ft.state_dir(spec.features_dir, table)
        for day in days:
            part = ft.partition_path(folder, day) / ft.PART_FILE
            if part.exists():
                hashes[(table, day)] = sha256_file(part)
    return hashes


@pytest.fixture(scope="module")
def references(
    spark, tmp_path_factory: pytest.TempPathFactory, ml100k_settings: Settings
) -> tuple[Hashes, Hashes]:
    """(``--rebuild`` of each day, a clean in-order daily build) as partition hashes."""
    rebuilt: Hashes = {}
    _, rebuild_spec = new_root(tmp_path_factory.mktemp("rebuild"), ml100k_settings)
    _, daily_spec = new_root(tmp_path_factory.mktemp("daily"), ml100k_settings)
    for day in DAYS:
        for spec in (rebuild_spec, daily_spec):
            lake.write_partition(spec.lake_dir, day, final_events(ml100k_settings, day))
        build_one(spark, rebuild_spec, day, rebuild=True)
        rebuilt.update(partition_hashes(rebuild_spec, REBUILD_TABLES, [day]))
        build_one(spark, daily_spec, day)
    daily = partition_hashes(daily_spec, (*ft.PUBLIC_TABLES, ft.USER_DAILY), DAYS)
    return rebuilt, daily


def assert_matches(spec: BuildSpec, references: tuple[Hashes, Hashes]) -> None:
    """Every day is built and byte-identical to ``--rebuild`` of it and to the clean build."""
    rebuilt, daily = references
    assert lineage.built_days(spec.features_dir) == DAYS
    assert partition_hashes(spec, REBUILD_TABLES, DAYS) == rebuilt
    assert partition_hashes(spec, (*ft.PUBLIC_TABLES, ft.USER_DAILY), DAYS) == daily
    current = lineage.current_raw(spec.lake_dir, DAYS[-1])
    assert lineage.first_stale_day(spec.features_dir, current, set()) is None


def land_and_build(spark, spec: BuildSpec, day: date, events: pa.Table) -> list[str]:
    """One DAG run's worth: land ``day``, build it; the build's log lines."""
    lake.write_partition(spec.lake_dir, day, events)
    lines: list[str] = []
    build(spark, spec, day, on_built=lambda r: lines.append(f"{r.day} {r.mode} {r.reason}"))
    return lines


def test_a_random_landing_order_ends_byte_identical_to_rebuilds(
    spark, tmp_path: Path, ml100k_settings: Settings, references: tuple[Hashes, Hashes]
) -> None:
    rng = random.Random(20260)
    _, spec = new_root(tmp_path, ml100k_settings)
    order = rng.sample(DAYS, len(DAYS))
    corrected = set(rng.sample(DAYS, 2))
    steps: list[tuple[date, bool]] = [(d, d in corrected) for d in order]
    for day in corrected:  # the correction lands at a random later point
        at = rng.randint(order.index(day) + 1, len(steps))
        steps.insert(at, (day, False))
    for day, wrong in steps:
        events = final_events(ml100k_settings, day)
        land_and_build(spark, spec, day, wrong_events(events) if wrong else events)
    rerun = rng.choice(DAYS)  # "clear and re-run" of an old day changes nothing
    land_and_build(spark, spec, rerun, final_events(ml100k_settings, rerun))
    assert order != sorted(order), order  # the seed's order is out of order
    assert_matches(spec, references)


def test_late_day_cascades_through_the_later_days(
    spark, tmp_path: Path, ml100k_settings: Settings, references: tuple[Hashes, Hashes]
) -> None:
    settings, spec = new_root(tmp_path, ml100k_settings)
    late = DAYS[3]
    for day in DAYS:
        if day != late:
            land_and_build(spark, spec, day, final_events(ml100k_settings, day))
    lake.write_partition(spec.lake_dir, late, final_events(ml100k_settings, late))
    result = CliRunner().invoke(
        cli,
        ["features", "build", "--date", late.isoformat()],
        env={"GRANK_DATA_ROOT": str(settings.data_root), "GRANK_DATASET": "ml-100k"},
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == (
        f"raw events of {late} are late since {DAYS[4]} was built: cascading"
        f" {late}..{DAYS[-1]} (2 day(s))"
    )
    # one line per day, in order, each incremental: never a silent rebuild
    assert [line.split(":")[0] for line in lines[1:]] == [d.isoformat() for d in DAYS[3:]]
    assert all(": incremental (cascade)," in line for line in lines[1:]), lines
    assert_matches(spec, references)


def test_corrected_day_cascades_and_reaches_every_later_day(
    spark, tmp_path: Path, ml100k_settings: Settings, references: tuple[Hashes, Hashes]
) -> None:
    _, spec = new_root(tmp_path, ml100k_settings)
    for day in DAYS:
        events = final_events(ml100k_settings, day)
        land_and_build(spark, spec, day, wrong_events(events) if day == DAYS[3] else events)
    lines = land_and_build(spark, spec, DAYS[3], final_events(ml100k_settings, DAYS[3]))
    assert [line.split()[:2] for line in lines] == [
        [d.isoformat(), "incremental"] for d in DAYS[3:]
    ]
    assert "are corrected since" in lines[0]
    assert_matches(spec, references)


def test_cascade_without_the_state_it_needs_restarts_from_a_rebuild_and_says_so(
    spark, tmp_path: Path, ml100k_settings: Settings, references: tuple[Hashes, Hashes]
) -> None:
    _, spec = new_root(tmp_path, ml100k_settings)
    spec = replace(spec, config=replace(spec.config, keep_state_days=0))
    for day in DAYS:
        land_and_build(spark, spec, day, final_events(ml100k_settings, day))
    assert ft.partition_days(ft.state_dir(spec.features_dir, ft.USER_STATE)) == DAYS[-2:]
    events = final_events(ml100k_settings, DAYS[2])
    lines = land_and_build(spark, spec, DAYS[2], events.slice(0, events.num_rows - 1))
    assert lines[0].startswith(f"{DAYS[2]} rebuild raw events of {DAYS[2]} are corrected")
    assert f"the state of {DAYS[1]} is no longer kept" in lines[0]
    assert [line.split()[1] for line in lines] == ["rebuild", "incremental", "incremental"]
    # the original content back: the cascade needs the state of DAYS[1] again
    land_and_build(spark, spec, DAYS[2], events)
    assert partition_hashes(spec, REBUILD_TABLES, DAYS) == references[0]


def test_staleness_follows_each_built_day_back_along_its_chain(tmp_path: Path) -> None:
    """The issue's case: 03-02, 03-03, 03-05, 03-06 built, then 03-04 lands; and the other
    ways a built day's inputs change (no Spark: lineage records written by hand)."""
    d = [date(1998, 3, n) for n in range(1, 8)]  # d[1] = 03-02 ... d[5] = 03-06
    features_dir = tmp_path / "features"
    current = {day: f"sha-{day}" for day in (d[1], d[2], d[4], d[5])}
    records = [
        lineage.Lineage(d[1], "rebuild", None, {d[1]: current[d[1]]}),
        lineage.Lineage(d[2], "incremental", d[1], {d[2]: current[d[2]]}),
        lineage.Lineage(d[4], "incremental", d[2], {d[4]: current[d[4]]}),
        lineage.Lineage(d[5], "incremental", d[4], {d[5]: current[d[5]]}),
    ]
    for record in records:
        lineage.write_lineage(features_dir, record)
    assert lineage.first_stale_day(features_dir, current, set()) is None
    late = {**current, d[3]: "sha-late"}
    assert lineage.first_stale_day(features_dir, late, set()) == lineage.Staleness(
        d[3], "late", d[4]
    )
    assert lineage.first_stale_day(features_dir, late, {d[3]}) is None  # pending a fix
    corrected = {**current, d[2]: "sha-fixed"}
    assert lineage.first_stale_day(features_dir, corrected, set()) == lineage.Staleness(
        d[2], "corrected", d[2]
    )
    removed = {k: v for k, v in current.items() if k != d[4]}
    assert lineage.first_stale_day(features_dir, removed, set()) == lineage.Staleness(
        d[4], "removed", d[4]
    )
    lineage.remove_lineage(features_dir, d[4])  # its build failed half-way
    assert lineage.first_stale_day(features_dir, current, set()) == lineage.Staleness(
        d[4], "uncommitted", d[5]
    )


def test_relanding_identical_content_is_a_noop(tmp_path: Path, ml100k_settings: Settings) -> None:
    settings, _ = new_root(tmp_path, ml100k_settings)
    events = final_events(ml100k_settings, DAYS[0])
    assert lake.write_partition(settings.lake_dir, DAYS[0], events)
    folder = lake.partition_dir(settings.lake_dir, DAYS[0])
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in folder.iterdir()}
    assert not lake.write_partition(settings.lake_dir, DAYS[0], events)
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in folder.iterdir()} == before
    assert sorted(before) == [lake.MARKER_FILE, "part-00000.parquet"]
    assert lake.write_partition(settings.lake_dir, DAYS[0], events.slice(1))


def test_landed_cli_verifies_the_completion_marker(
    tmp_path: Path, ml100k_settings: Settings
) -> None:
    settings, _ = new_root(tmp_path, ml100k_settings)
    env = {"GRANK_DATA_ROOT": str(settings.data_root), "GRANK_DATASET": "ml-100k"}
    runner = CliRunner()
    day = DAYS[0].isoformat()
    result = runner.invoke(cli, ["data", "landed", "--date", day], env=env)
    assert result.exit_code == 1 and "no completion marker" in str(result.exception)
    lake.write_partition(settings.lake_dir, DAYS[0], final_events(ml100k_settings, DAYS[0]))
    result = runner.invoke(cli, ["data", "landed", "--date", day], env=env)
    assert result.exit_code == 0, result.output
    # a producer still writing (a file added after the marker) is not landed
    folder = lake.partition_dir(settings.lake_dir, DAYS[0])
    shutil.copy(folder / "part-00000.parquet", folder / "part-00001.parquet")
    result = runner.invoke(cli, ["data", "landed", "--date", day], env=env)
    assert result.exit_code == 1 and "do not match their completion marker" in str(result.exception)
    # a marker whose row count lies is refused too
    (folder / "part-00001.parquet").unlink()
    marker = (folder / lake.MARKER_FILE).read_text()
    (folder / lake.MARKER_FILE).write_text(marker.replace('"rows": ', '"rows": 1'))
    result = runner.invoke(cli, ["data", "landed", "--date", day], env=env)
    assert result.exit_code == 1 and "their marker says" in str(result.exception)


def test_exact_redeliveries_are_dropped_by_the_lowest_event_id(
    spark, tmp_path: Path, ml100k_settings: Settings, references: tuple[Hashes, Hashes]
) -> None:
    """The same events again under new event ids: built as if they were not there."""
    _, spec = new_root(tmp_path, ml100k_settings)
    for day in DAYS:
        events = final_events(ml100k_settings, day)
        if day == DAYS[1]:
            copies = events.slice(0, 10)
            copies = copies.set_column(
                0, copies.schema.field("event_id"), pc.add(copies["event_id"], 10_000_000)
            )
            events = pa.concat_tables([events, copies]).sort_by(
                [("event_timestamp", "ascending"), ("event_id", "ascending")]
            )
        land_and_build(spark, spec, day, events)
    assert_matches(spec, references)


def test_null_values_and_a_failed_build_leave_the_previous_complete_day(
    spark, tmp_path: Path
) -> None:
    """A user whose values are all null gets a null mean (no ANSI division error); a build
    that fails half-way leaves its day not built and nothing of it on disk."""
    spec = hand_made_lake(tmp_path)
    nulls = raw_table([(10, 3, 1, at(D2, 5))])
    index = nulls.schema.get_field_index("value")
    nulls = nulls.set_column(index, nulls.schema.field(index), pa.array([None], pa.float32()))
    write_raw(spec.lake_dir, D2, pa.concat_tables([raw_table(HAND_MADE[D2]), nulls]))
    build_one(spark, spec, D1)
    users = spec.lake_dir / "raw" / "users"
    shutil.move(users, tmp_path / "users")  # read after the state and examples are written
    with pytest.raises(UserFacingError, match="dimension table missing"):
        build_one(spark, spec, D2)
    assert lineage.built_days(spec.features_dir) == [D1]
    for folder in [
        *(ft.table_dir(spec.features_dir, t) for t in ft.PUBLIC_TABLES),
        *(ft.state_dir(spec.features_dir, t) for t in ft.STATE_TABLES),
    ]:
        assert D2 not in ft.partition_days(folder), folder
    shutil.move(tmp_path / "users", users)
    assert build_one(spark, spec, D2).mode == "incremental"
    rows = read_rows(spec.features_dir, ft.USER_FEATURES, D2, "user_id")
    assert [(r["user_id"], r["mean_value"]) for r in rows] == [(1, 4.0), (2, 4.0), (3, None)]


def committed_files(spec: BuildSpec) -> dict[str, str]:
    """Every published and state file under ``features/`` with its sha256, and the lineage
    records' text: what readers and the next build see."""
    files = {}
    folders = [ft.table_dir(spec.features_dir, t) for t in ft.PUBLIC_TABLES]
    folders += [ft.state_dir(spec.features_dir, t) for t in ft.STATE_TABLES]
    for folder in folders:
        for day in ft.partition_days(folder):
            part = ft.partition_path(folder, day) / ft.PART_FILE
            files[str(part.relative_to(spec.features_dir))] = sha256_file(part)
    for day in lineage.built_days(spec.features_dir):
        files[f"lineage {day}"] = lineage.lineage_path(spec.features_dir, day).read_text()
    return files


RECOVER = """
import sys
from pathlib import Path
from features import lineage
lineage.recover_commits(Path(sys.argv[1]))
"""


def test_a_failed_or_killed_rebuild_of_a_built_day_leaves_a_complete_day(
    spark, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-building a built day (its raw day corrected) that fails between two table writes
    leaves every file of the previous complete build, readable and still committed; one
    killed while publishing its commit is finished on the next start, never half."""
    spec = hand_made_lake(tmp_path)
    build_one(spark, spec, D1)
    build_one(spark, spec, D2)
    before = committed_files(spec)
    # corrected: a new user and item on D2 change every table and state of D2
    write_raw(spec.lake_dir, D2, raw_table([*HAND_MADE[D2], (7, 3, 6, at(D2, 10))]))
    write_partitions = ft.write_partitions
    written: list[Path] = []

    def fails_before_user_features(frame, folder: Path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if folder.name == ft.USER_FEATURES:  # after examples, state and sequences
            raise RuntimeError("injected failure between table writes")
        written.append(folder)
        return write_partitions(frame, folder, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(ft, "write_partitions", fails_before_user_features)
        with pytest.raises(RuntimeError, match="injected failure"):
            build_one(spark, spec, D2)
    assert len(written) == 6, written  # examples, 4 state tables, sequences were written
    assert committed_files(spec) == before
    assert lineage.built_days(spec.features_dir) == [D1, D2]  # the old D2 is still committed
    assert [
        r["user_id"] for r in read_rows(spec.features_dir, ft.USER_FEATURES, D2, "user_id")
    ] == [1, 2]
    assert not lineage.staging_root(spec.features_dir, D2).exists()

    # killed after the commit point, between two partition swaps
    def dies(features_dir: Path, day: date) -> None:
        raise SystemExit("killed after the commit point")

    with monkeypatch.context() as patch:
        patch.setattr(lineage, "_apply", dies)
        with pytest.raises(SystemExit):
            build_one(spark, spec, D2)
    staged_root = lineage.staging_root(spec.features_dir, D2)
    staged = {
        str(p.relative_to(staged_root)): sha256_file(p) for p in staged_root.rglob(ft.PART_FILE)
    }
    assert committed_files(spec) == before  # nothing published yet
    killed = subprocess.run(
        [sys.executable, "-c", RECOVER, str(spec.features_dir)],
        env={**os.environ, CRASH_AT_ENV: "partition-swapped"},
        cwd=REPO_ROOT,
        check=False,
    )
    assert killed.returncode == 97
    assert lineage.built_days(spec.features_dir) == [D1]  # half-published: not built
    assert lineage.recover_commits(spec.features_dir) == [D2]  # the next start finishes it
    after = committed_files(spec)
    assert {k: v for k, v in after.items() if D2.isoformat() not in k} == {
        k: v for k, v in before.items() if D2.isoformat() not in k
    }
    assert {k: v for k, v in after.items() if k in staged} == staged
    assert all(before[k] != staged[k] for k in staged)
    assert lineage.built_days(spec.features_dir) == [D1, D2]
    current = lineage.current_raw(spec.lake_dir, D2)
    assert lineage.first_stale_day(spec.features_dir, current, set()) is None
    assert [
        r["user_id"] for r in read_rows(spec.features_dir, ft.USER_FEATURES, D2, "user_id")
    ] == [1, 2, 3]
    assert not staged_root.exists()


def heavy_user_events(day: date, user_id: int, count: int) -> pa.Table:
    """``count`` ratings of one user spread over ``day`` (1 ms + 864 ms apart: never on a
    whole second, so none is a re-delivery of a MovieLens event)."""
    start = lake.day_start_us(day)
    return pa.table(
        {
            "event_id": pa.array(range(10_000_000, 10_000_000 + count), pa.int64()),
            "user_id": pa.array([user_id] * count, pa.int64()),
            "item_id": pa.array([1 + i % 1_600 for i in range(count)], pa.int64()),
            "event_type": pa.array(["rating"] * count),
            "value": pa.array([float(1 + i % 5) for i in range(count)], pa.float32()),
            "event_timestamp": pa.array(
                [start + 1_000 + 864_000 * i for i in range(count)], pa.timestamp("us", tz="UTC")
            ),
            "ingestion_time": pa.array(
                [start + lake.US_PER_DAY] * count, pa.timestamp("us", tz="UTC")
            ),
        }
    )


def test_a_100k_event_user_on_a_10x_day_warns_and_builds_in_bounded_memory(
    spark, tmp_path: Path, ml100k_settings: Settings
) -> None:
    """Through the CLI, as the DAG runs it: the raw gate warns (a user over
    max_user_events, the volume far above the trailing average) and passes; the Spark build
    keeps the user's last long_seq_len events in its state, and the writer writes the
    day's examples a row group at a time."""
    settings, spec = new_root(tmp_path, ml100k_settings)
    heavy = DAYS[2]
    for day in DAYS[:2]:
        lake.write_partition(spec.lake_dir, day, final_events(ml100k_settings, day))
    usual = final_events(ml100k_settings, heavy)
    extra = heavy_user_events(heavy, 1, 100_000).cast(usual.schema)
    events = pa.concat_tables([usual, extra]).sort_by(
        [("event_timestamp", "ascending"), ("event_id", "ascending")]
    )
    lake.write_partition(spec.lake_dir, heavy, events)
    env = {
        "GRANK_DATA_ROOT": str(settings.data_root),
        "GRANK_DATASET": "ml-100k",
        "GRANK_FEATURES__LONG_SEQ_LEN": "20",  # CI time; docs/operations.md has the 200 run
    }
    runner = CliRunner()
    built = runner.invoke(cli, ["features", "build", "--date", DAYS[1].isoformat()], env=env)
    assert built.exit_code == 0, built.output
    gate = runner.invoke(
        cli, ["features", "validate", "--date", heavy.isoformat(), "--stage", "raw"], env=env
    )
    assert gate.exit_code == 0, gate.output
    assert "warning: raw_events: expect_column_max_to_be_between(check_user_day_events)" in (
        gate.output
    )
    assert "warning: raw_events: expect_table_row_count_to_be_between()" in gate.output
    built = runner.invoke(cli, ["features", "build", "--date", heavy.isoformat()], env=env)
    assert built.exit_code == 0, built.output
    assert f"{heavy}: incremental" in built.output

    state = pq.read_table(ft.partition_path(ft.state_dir(spec.features_dir, ft.USER_STATE), heavy))
    user = state.filter(pc.equal(state["user_id"], 1)).to_pylist()[0]
    last = extra.slice(extra.num_rows - 20)
    assert [e["item_id"] for e in user["seq"]] == last["item_id"].to_pylist()
    assert user["events_total"] >= 100_000
    examples = pq.ParquetFile(
        ft.partition_path(ft.table_dir(spec.features_dir, ft.TRAINING_EXAMPLES), heavy)
        / ft.PART_FILE
    )
    assert examples.metadata.num_rows == events.num_rows
    assert examples.metadata.num_row_groups == math.ceil(events.num_rows / ft.ROW_GROUP_ROWS)
    lengths = examples.read(columns=["history_len"])["history_len"]
    assert pc.max(lengths).as_py() == 20
