"""Great Expectations gates: every bad input of issue 3 is caught, quarantined byte for byte,
reported in HTML + summary.json, and leaves everything downstream untouched.

The report pages themselves (naming, the site over all days, the browser) are tested in
tests/integration/test_quality_report.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from common.atomic import sha256_file
from common.errors import UserFacingError
from features import feature_tables as ft
from features.jobs import build_day, check_raw_partition
from features.quality import QualitySpec, validate_features, validate_raw
from grank.cli import cli, main
from tests.conftest import make_settings
from tests.integration.test_features_jobs import (
    D1,
    D2,
    at,
    hand_made_lake,
    raw_table,
    write_dimensions,
    write_raw,
)

DAY = date(2024, 3, 10)
GOOD = [(i, 1 + i % 3, 1 + i % 5, at(DAY, 1 + i)) for i in range(10)]


def quality_spec(root: Path) -> QualitySpec:
    settings = make_settings(root)
    return QualitySpec(
        lake_dir=settings.lake_dir,
        features_dir=settings.features_dir,
        quarantine_dir=settings.quarantine_dir,
        reports_dir=settings.reports_dir,
        long_seq_len=3,
    )


def checksums(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


def truncated(folder: Path) -> None:
    part = folder / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:-40])


def without_column(rows: list) -> pa.Table:
    return raw_table(rows).drop_columns(["value"])


def user_id_as_text(rows: list) -> pa.Table:
    table = raw_table(rows)
    return table.set_column(1, "user_id", table["user_id"].cast(pa.string()))


NULLABLE = pa.schema([pa.field(f.name, f.type) for f in raw_table(GOOD).schema])
BAD_DAYS: dict[str, tuple[Callable[[], pa.Table], Callable[[Path], None] | None, str]] = {
    "null ids": (
        lambda: raw_table([*GOOD, (10, None, 1, at(DAY, 20))], NULLABLE),
        None,
        "expect_column_values_to_not_be_null(user_id)",
    ),
    "duplicate events": (
        lambda: raw_table([*GOOD, GOOD[3]]),
        None,
        "expect_column_values_to_be_unique(event_id)",
    ),
    "outside the partition": (
        lambda: raw_table([*GOOD, (10, 1, 1, at(date(2024, 3, 11)))]),
        None,
        "expect_column_values_to_be_between(event_timestamp)",
    ),
    "future timestamps": (
        lambda: raw_table([*GOOD, (10, 1, 1, at(DAY, 22), None, None, at(DAY, 21))]),
        None,
        "expect_column_pair_values_a_to_be_greater_than_b",
    ),
    "unknown item ids": (
        lambda: raw_table([*GOOD, (10, 1, 999, at(DAY, 20))]),
        None,
        "expect_column_values_to_be_in_set(item_id)",
    ),
    "wrong column type": (
        lambda: user_id_as_text(GOOD),
        None,
        "expect_column_values_to_be_in_type_list(user_id)",
    ),
    "missing column": (
        lambda: without_column(GOOD),
        None,
        "expect_table_columns_to_match_set",
    ),
    "empty day": (
        lambda: raw_table([]),
        None,
        "expect_table_row_count_to_be_between",
    ),
    "truncated parquet": (lambda: raw_table(GOOD), truncated, "unreadable"),
    # GX's range checks skip NaN: a dedicated finite check catches NaN and both infinities
    "NaN values": (
        lambda: raw_table([*GOOD, (10, 1, 1, at(DAY, 20), "rating", float("nan"))]),
        None,
        "expect_column_values_to_be_in_set(check_numeric_finite)",
    ),
    "infinite values": (
        lambda: raw_table(
            [
                *GOOD,
                (10, 1, 1, at(DAY, 20), "rating", float("inf")),
                (11, 2, 1, at(DAY, 20), "rating", float("-inf")),
            ]
        ),
        None,
        "expect_column_values_to_be_in_set(check_numeric_finite)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DAYS))
def test_bad_raw_day_is_quarantined_byte_for_byte(tmp_path, case):
    make_table, damage, expected = BAD_DAYS[case]
    spec = quality_spec(tmp_path)
    write_dimensions(spec.lake_dir)
    folder = write_raw(spec.lake_dir, DAY, make_table())
    if damage:
        damage(folder)
    original = checksums(folder)

    outcome = validate_raw(spec, DAY)

    assert not outcome.success
    assert any(expected in failure for failure in outcome.failures), outcome.failures
    quarantined = spec.quarantine_dir / "raw" / "events" / f"dt={DAY.isoformat()}"
    assert outcome.quarantined == [quarantined]
    assert not folder.exists()
    assert checksums(quarantined) == original
    assert outcome.report.name == "index.html" and outcome.report.exists()
    summary = json.loads((outcome.report.parent / "summary.json").read_text())
    assert summary["success"] is False
    assert summary["stages"]["raw"]["quarantined"] == [str(quarantined)]
    with pytest.raises(UserFacingError, match="quarantined"):  # the build refuses the day
        check_raw_partition(spec.lake_dir, spec.quarantine_dir, DAY)


def test_good_day_passes_and_volume_drop_only_warns(tmp_path):
    spec = quality_spec(tmp_path)
    write_dimensions(spec.lake_dir)
    previous = date(2024, 3, 9)
    write_raw(
        spec.lake_dir,
        previous,
        raw_table([(100 + i, 1, 1, at(previous, i // 60, i % 60)) for i in range(100)]),
    )
    folder = write_raw(spec.lake_dir, DAY, raw_table(GOOD))

    outcome = validate_raw(spec, DAY)

    assert outcome.success, outcome.failures
    assert outcome.warnings == ["raw_events: expect_table_row_count_to_be_between()"]
    assert folder.exists() and not spec.quarantine_dir.exists()
    summary = json.loads((outcome.report.parent / "summary.json").read_text())
    assert summary["stages"]["raw"]["warnings"] == outcome.warnings
    assert "raw_events" in outcome.report.read_text()


def test_heavy_user_volume_spike_and_redeliveries_only_warn(tmp_path):
    """One user with 100,000 events in a day, 10x the trailing volume, and events delivered
    twice under new ids: reported as warnings, and the day passes."""
    spec = quality_spec(tmp_path)
    write_dimensions(spec.lake_dir)
    previous = date(2024, 3, 9)
    write_raw(
        spec.lake_dir,
        previous,
        raw_table([(i, 1 + i % 3, 1, at(previous) + timedelta(seconds=i)) for i in range(10_000)]),
    )
    # user 1's 100,000 events, 864 ms apart over the day
    rows = [
        (10_000 + i, 1, 1 + i % 5, at(DAY) + timedelta(milliseconds=864 * i))
        for i in range(100_000)
    ]
    rows.append((999_999, *rows[0][1:]))  # a re-delivery of the first event
    write_raw(spec.lake_dir, DAY, raw_table(rows))

    outcome = validate_raw(spec, DAY)

    assert outcome.success, outcome.failures
    assert sorted(outcome.warnings) == [
        "raw_events: expect_column_max_to_be_between(check_user_day_events)",
        "raw_events: expect_compound_columns_to_be_unique()",
        "raw_events: expect_table_row_count_to_be_between()",
    ]


def test_cli_gate_exits_1_with_one_line_pointing_at_the_report(tmp_path, capsys, monkeypatch):
    spec = quality_spec(tmp_path)
    write_dimensions(spec.lake_dir)
    write_raw(spec.lake_dir, DAY, raw_table([*GOOD, GOOD[0]]))
    monkeypatch.setenv("GRANK_DATA_ROOT", str(tmp_path))
    monkeypatch.setattr("sys.argv", ["grank", "features", "validate", "--date", DAY.isoformat()])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1
    assert error[0].startswith("error: raw quality gate failed for 2024-03-10")
    assert error[0].endswith(
        f"report: {spec.reports_dir / 'dt=2024-03-10' / 'index.html'};"
        f" all days: {spec.reports_dir / 'index.html'}"
    )


@pytest.mark.spark
def test_feature_gate_passes_built_day_and_quarantines_a_bad_one(spark, tmp_path):
    build = hand_made_lake(tmp_path)
    build_day(spark, build, D1)
    build_day(spark, build, D2)
    spec = quality_spec(tmp_path)
    runner = CliRunner()
    env = {"GRANK_DATA_ROOT": str(tmp_path), "GRANK_FEATURES__LONG_SEQ_LEN": "3"}
    result = runner.invoke(
        cli, ["features", "validate", "--date", D2.isoformat(), "--stage", "features"], env=env
    )
    assert result.exit_code == 0, result.output
    assert "features quality gate passed" in result.output

    # corrupt D2's user features: a duplicated key must fail the gate
    users = ft.partition_path(ft.table_dir(build.features_dir, ft.USER_FEATURES), D2)
    table = pq.read_table(users / ft.PART_FILE)
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), users / ft.PART_FILE)
    original = checksums(users)
    yesterday = {
        t: checksums(ft.partition_path(ft.table_dir(build.features_dir, t), D1))
        for t in ft.PUBLIC_TABLES
    }

    outcome = validate_features(spec, D2)

    assert not outcome.success
    assert outcome.failures == ["user_features: expect_column_values_to_be_unique(user_id)"]
    for table_name in ft.PUBLIC_TABLES:
        assert not ft.partition_path(ft.table_dir(build.features_dir, table_name), D2).exists()
        day_one = ft.partition_path(ft.table_dir(build.features_dir, table_name), D1)
        assert checksums(day_one) == yesterday[table_name]
    assert not ft.partition_path(ft.state_dir(build.features_dir, ft.USER_STATE), D2).exists()
    assert (
        checksums(spec.quarantine_dir / "features" / ft.USER_FEATURES / "dt=2024-01-02") == original
    )
    with pytest.raises(UserFacingError, match="not built"):
        validate_features(spec, D2)
