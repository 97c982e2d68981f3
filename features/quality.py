"""Great Expectations gates on the raw events of a day and on the feature partitions built for it.

The suites are committed JSON under ``features/gx/expectations/`` (one per table), but
for the checks of the window counts, whose columns follow the configured windows
(:func:`window_expectations`); values that depend on the day (its bounds, the known item
ids, the volume band of the trailing average) are suite parameters filled in here. Each
run copies the committed context to a temporary folder (GX persists data sources and
checkpoints into its context, and the repository must stay untouched), adds the window
checks there, validates pandas frames (a day's partition fits in memory and pandas
avoids a Spark session; docs/features.md has the measurement), and stores GX's result
JSON under ``reports/dt=D/validations/`` plus the gate's verdict in
``reports/dt=D/summary.json``; features/quality_report.py then renders the report site
from them. Each run is named after the day and stage (``2000-12-08 raw``) and each data
asset after the table and partition (``raw_events dt=2000-12-08``), so every result says
what it is about.

A failed *critical* expectation fails the gate: the day's partitions move to
``quarantine/`` byte for byte (same relative paths) and nothing downstream runs. A
failed *warning* expectation (volume) is reported and does not fail the gate.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.atomic import atomic_write_text
from common.errors import UserFacingError
from features import feature_tables as ft
from features import lineage, quality_report
from features.config import ACTIVITY, POPULARITY, BuildConfig, QualityConfig, count_columns
from features.jobs import quarantined_raw_dir
from features.lake import US_PER_DAY, LakeLayout, day_start_us, landed_days, partition_dir

if TYPE_CHECKING:
    import pandas as pd

GX_DIR = Path(__file__).resolve().parent / "gx"
RAW_SUITE = "raw_events"
FEATURE_SUITES = (
    ft.USER_BEHAVIOR_SEQUENCES,
    ft.ITEM_FEATURES,
    ft.USER_FEATURES,
    ft.TRAINING_EXAMPLES,
)


@dataclass(frozen=True)
class QualitySpec:
    """Where the gates read, quarantine and report, and what they check against.

    ``config`` holds the thresholds a deployment sets (features/config.py); the CLI
    hands them over from the settings in one piece.
    """

    lake_dir: Path
    features_dir: Path
    quarantine_dir: Path
    reports_dir: Path
    config: QualityConfig = field(default_factory=QualityConfig)
    long_seq_len: int = BuildConfig.long_seq_len
    windows_days: tuple[int, ...] = BuildConfig.windows_days
    # what the dataset config allows (features/dataset_config.py)
    event_types: tuple[str, ...] = ("click", "rating")
    value_min: float = 0.0
    value_max: float = 5.0


@dataclass(frozen=True)
class VolumeBaseline:
    """What the raw volume warning compared the day with, kept for the report's trend."""

    trailing_average_rows: float | None  # None: no earlier landed day, any volume passes
    low_ratio: float
    high_ratio: float


@dataclass
class GateOutcome:
    """The verdict of one gate run: what failed, what only warned, where the report is.

    ``report`` is the day's page, ``home`` the page of all days; ``validated_at`` is also
    the GX run time of the run's results, which is how the report finds them.
    """

    success: bool
    report: Path
    home: Path
    validated_at: datetime
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    quarantined: list[Path] = field(default_factory=list)
    volume: VolumeBaseline | None = None


def validate_raw(spec: QualitySpec, day: date) -> GateOutcome:
    """Gate the raw events of ``day``; on a critical failure quarantine the raw partition."""
    folder = partition_dir(spec.lake_dir, day)
    if not folder.exists():
        raise UserFacingError(f"no raw events for {day}: expected {folder}")
    frame, read_error = _read_frame(folder, raw_checks=True)
    volume = VolumeBaseline(
        trailing_average_rows=_trailing_average_rows(spec, day),
        low_ratio=spec.config.volume_low_ratio,
        high_ratio=spec.config.volume_high_ratio,
    )
    low, high = _volume_band(volume)
    parameters: dict[str, Any] = {
        **_day_bounds(day),
        "known_item_ids": _known_item_ids(spec.lake_dir),
        "volume_low": low,
        "volume_high": high,
        "event_types": list(spec.event_types),
        "value_min": spec.value_min,
        "value_max": spec.value_max,
        "max_user_events": spec.config.max_user_events,
    }
    outcome = _run_gate(spec.reports_dir, day, "raw", {RAW_SUITE: (frame, read_error)}, parameters)
    outcome.volume = volume
    if not outcome.success:
        destination = quarantined_raw_dir(spec.quarantine_dir, day)
        ft.move_partition(folder, destination)
        outcome.quarantined.append(destination)
    _write_summary(spec.reports_dir, day, "raw", outcome)
    quality_report.render_day(spec.reports_dir, day)
    return outcome


def validate_features(spec: QualitySpec, day: date) -> GateOutcome:
    """Gate the built feature partitions of ``day``; on failure quarantine them and their state."""
    folders = {
        t: ft.partition_path(ft.table_dir(spec.features_dir, t), day) for t in FEATURE_SUITES
    }
    missing = [t for t, f in folders.items() if not f.exists()]
    if missing:
        raise UserFacingError(
            f"features of {day} are not built ({', '.join(missing)} missing);"
            " run grank features build"
        )
    frames = {t: _read_frame(f, with_checks=True) for t, f in folders.items()}
    parameters = {**_day_bounds(day), "long_seq_len": spec.long_seq_len}
    outcome = _run_gate(
        spec.reports_dir,
        day,
        "features",
        frames,
        parameters,
        window_expectations(spec.windows_days),
    )
    if not outcome.success:
        state = {
            f"{ft.STATE_DIR}/{t}": ft.partition_path(ft.state_dir(spec.features_dir, t), day)
            for t in ft.STATE_TABLES
        }
        lineage.remove_lineage(spec.features_dir, day)  # the day is no longer built
        for name, source in {**folders, **state}.items():
            if source.exists():
                destination = spec.quarantine_dir / "features" / name / source.name
                ft.move_partition(source, destination)
                outcome.quarantined.append(destination)
    _write_summary(spec.reports_dir, day, "features", outcome)
    quality_report.render_day(spec.reports_dir, day)
    return outcome


def _day_bounds(day: date) -> dict[str, Any]:
    start = day_start_us(day)
    return {"day_start": _utc(start), "day_end": _utc(start + US_PER_DAY - 1)}


def _utc(timestamp_us: int) -> datetime:
    """Naive UTC datetime: the frames GX sees carry naive UTC timestamps (see _to_pandas)."""
    return datetime(1970, 1, 1) + timedelta(microseconds=timestamp_us)


def _known_item_ids(lake_dir: Path) -> list[int]:
    items = LakeLayout(lake_dir).items_file
    if not items.exists():
        raise UserFacingError(f"item dimension missing: {items} (run grank data land)")
    ids: list[int] = pq.read_table(items, columns=["item_id"])["item_id"].to_pylist()
    return ids


def _volume_band(volume: VolumeBaseline) -> tuple[int, int | None]:
    """Row-count band around the trailing average (no earlier day: any volume)."""
    average = volume.trailing_average_rows
    if average is None:
        return 0, None
    return int(average * volume.low_ratio), int(np.ceil(average * volume.high_ratio))


def _trailing_average_rows(spec: QualitySpec, day: date) -> float | None:
    """Average row count of the trailing landed days before ``day`` (None: no such day)."""
    earlier = [d for d in landed_days(spec.lake_dir) if d < day]
    trailing = earlier[-spec.config.volume_trailing_days :]
    counts = []
    for previous in trailing:
        try:
            counts.append(
                sum(
                    pq.read_metadata(f).num_rows
                    for f in partition_dir(spec.lake_dir, previous).glob("*.parquet")
                )
            )
        except (pa.ArrowException, OSError):
            continue
    return sum(counts) / len(counts) if counts else None


def _read_frame(
    folder: Path, with_checks: bool = False, raw_checks: bool = False
) -> tuple[pd.DataFrame, str | None]:
    """A partition as pandas; an unreadable one becomes an empty frame plus the read error.

    ``with_checks`` adds ``check_*`` columns for properties of array columns that GX has
    no expectation for (sorted sequences, history before the target), computed
    vectorised with pyarrow/numpy.
    """
    import pandas as pd

    try:
        table = pa.concat_tables([pq.read_table(f) for f in sorted(folder.glob("*.parquet"))])
    except (pa.ArrowException, OSError, ValueError) as exc:
        return pd.DataFrame(), f"{folder}: {exc}"
    if with_checks:
        table = _add_checks(table)
    if raw_checks:
        table = _add_raw_checks(table)
    return _to_pandas(table), None


def _add_raw_checks(table: pa.Table) -> pa.Table:
    """``check_numeric_finite``: no NaN/±inf in any floating column of the row (GX's range
    checks skip NaN); ``check_user_day_events``: the row's user's events that day."""
    finite = pa.array(np.ones(table.num_rows, dtype=bool))
    for column, kind in zip(table.columns, table.schema.types, strict=True):
        if pa.types.is_floating(kind):
            finite = pc.and_(finite, pc.fill_null(pc.is_finite(column), True))
    table = table.append_column("check_numeric_finite", finite)
    if "user_id" in table.column_names and pa.types.is_integer(table.schema.field("user_id").type):
        users = pc.fill_null(table["user_id"], -1).to_numpy()
        _, inverse, counts = np.unique(users, return_inverse=True, return_counts=True)
        per_row = pa.array(counts[inverse].astype(np.int64))
    else:
        per_row = pa.nulls(table.num_rows, pa.int64())
    return table.append_column("check_user_day_events", per_row)


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    """Pandas view for GX: ``timestamp[us, UTC]`` becomes naive UTC ``datetime64[us]``.

    GX's pandas type check cannot name a tz-aware dtype, so the contract type is mapped
    to a nameable one here and any other timestamp type to text, which then fails the
    suite's type expectation instead of slipping through.
    """
    contract = pa.timestamp("us", tz="UTC")
    columns = []
    for column, kind in zip(table.columns, table.schema.types, strict=True):
        if kind == contract:
            columns.append(column.cast(pa.timestamp("us")))
        elif pa.types.is_timestamp(kind):
            columns.append(column.cast(pa.string()))
        else:
            columns.append(column)
    return pa.table(columns, names=table.column_names).to_pandas()


def _add_checks(table: pa.Table) -> pa.Table:
    names = table.column_names
    if "event_timestamp" in names:
        table = table.append_column(
            "check_event_timestamp_us", table["event_timestamp"].cast(pa.int64())
        )
    if "ts_seq" in names:
        table = table.append_column("check_ts_seq_sorted", _lists_sorted(table["ts_seq"]))
        table = table.append_column(
            "check_item_seq_len", pc.list_value_length(table["item_seq"]).cast(pa.int64())
        )
        table = table.append_column("check_last_ts_us", _last_elements(table["ts_seq"]))
    if "history_ts_seq" in names:
        table = table.append_column(
            "check_history_ts_sorted", _lists_sorted(table["history_ts_seq"])
        )
        table = table.append_column(
            "check_history_last_ts_us", _last_elements(table["history_ts_seq"])
        )
    return table


def _lists_sorted(column: pa.ChunkedArray) -> pa.Array:
    """Per row: is the int64 list non-decreasing?"""
    lists = column.combine_chunks()
    values = pc.list_flatten(lists).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    descending = (values[1:] < values[:-1]) & (parents[1:] == parents[:-1])
    bad = np.bincount(parents[1:][descending], minlength=len(lists))
    return pa.array(bad == 0)


def _last_elements(column: pa.ChunkedArray) -> pa.Array:
    """Per row: the list's last value (the smallest int64 for an empty history)."""
    lists = column.combine_chunks()
    values = pc.list_flatten(lists).to_numpy(zero_copy_only=False)
    lengths = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False)
    ends = np.cumsum(lengths)
    last = np.full(len(lists), np.iinfo(np.int64).min, dtype=np.int64)
    last[lengths > 0] = values[ends[lengths > 0] - 1]
    return pa.array(last)


def window_expectations(windows_days: tuple[int, ...]) -> dict[str, list[dict[str, Any]]]:
    """Suite -> the checks of its window counts (as GX suite JSON), for these windows.

    A count over a longer span holds every shorter one: an item's shortest window is >= 0,
    each window >= the one before and the all-time count >= the longest window; a user's
    all-time count >= the longest window (its own floor, 1, is in the committed suite).
    Each check's id derives from what it checks, so a report names it the same every run.
    """
    windows = tuple(sorted(windows_days))
    items = count_columns(POPULARITY, windows)
    checks = {
        ft.ITEM_FEATURES: [
            ("expect_column_values_to_be_between", {"column": items[0], "min_value": 0.0}),
            *_nested(items),
        ],
        ft.USER_FEATURES: _nested(count_columns(ACTIVITY, windows[-1:])),
    }
    return {
        suite: [
            {
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{suite}/{kind}/{json.dumps(kwargs)}")),
                "kwargs": kwargs,
                "meta": {},
                "severity": "critical",
                "type": kind,
            }
            for kind, kwargs in expectations
        ]
        for suite, expectations in checks.items()
    }


def _nested(columns: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    """Each count of ``columns`` (shortest span first) >= the one before it."""
    return [
        (
            "expect_column_pair_values_a_to_be_greater_than_b",
            {"column_A": longer, "column_B": shorter, "or_equal": True},
        )
        for shorter, longer in pairwise(columns)
    ]


def _add_expectations(gx_dir: Path, added: dict[str, list[dict[str, Any]]]) -> None:
    """Append ``added`` (suite -> checks as suite JSON) to the context copy at ``gx_dir``."""
    for suite, expectations in added.items():
        path = gx_dir / "expectations" / f"{suite}.json"
        content = json.loads(path.read_text())
        content["expectations"] += expectations
        path.write_text(json.dumps(content, indent=2))


def _run_gate(
    reports_dir: Path,
    day: date,
    stage: str,
    frames: dict[str, tuple[pd.DataFrame, str | None]],
    parameters: dict[str, Any],
    added: dict[str, list[dict[str, Any]]] | None = None,
) -> GateOutcome:
    """Validate each suite's frame (results stored as GX JSON), classify failures by severity.

    ``added`` (suite -> checks) joins the committed suites in this run's context copy only:
    the features gate's window checks, whose columns follow the configured windows.
    """
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    run = RunIdentifier(run_name=quality_report.run_name(day, stage), run_time=datetime.now(tz=UTC))
    outcome = GateOutcome(
        success=True,
        report=quality_report.day_page(reports_dir, day),
        home=quality_report.home_page(reports_dir),
        validated_at=run.run_time,
    )
    with tempfile.TemporaryDirectory(prefix="grank-gx-") as scratch:
        shutil.copytree(GX_DIR, Path(scratch) / "gx")
        _add_expectations(Path(scratch) / "gx", added or {})
        context = gx.get_context(
            mode="file",
            project_root_dir=scratch,
            runtime_environment={"GRANK_REPORT_DIR": str(quality_report.day_dir(reports_dir, day))},
        )
        source = context.data_sources.add_pandas(stage)
        for suite_name, (frame, read_error) in frames.items():
            if read_error:
                outcome.failures.append(f"{suite_name}: unreadable ({read_error})")
            asset = source.add_dataframe_asset(quality_report.asset_name(suite_name, day))
            definition = context.validation_definitions.add(
                gx.ValidationDefinition(
                    name=f"{suite_name}-{day.isoformat()}",
                    data=asset.add_batch_definition_whole_dataframe("day"),
                    suite=context.suites.get(suite_name),
                )
            )
            result = definition.run(
                batch_parameters={"dataframe": frame},
                expectation_parameters=parameters,
                run_id=run,
            )
            for check in result.results:
                if check.success:
                    continue
                config = check.expectation_config
                assert config is not None  # GX fills it for every suite result
                line = quality_report.check_label(suite_name, config.type, config.kwargs)
                if str(config.severity.value) == "warning":
                    outcome.warnings.append(line)
                else:
                    outcome.failures.append(line)
    outcome.success = not outcome.failures
    return outcome


def _write_summary(reports_dir: Path, day: date, stage: str, outcome: GateOutcome) -> None:
    """Merge this stage's verdict into ``reports/dt=D/summary.json`` (one file per date)."""
    path = quality_report.day_dir(reports_dir, day) / quality_report.SUMMARY
    summary: dict[str, Any] = (
        json.loads(path.read_text()) if path.exists() else {"date": day.isoformat()}
    )
    entry: dict[str, Any] = {
        "success": outcome.success,
        "failures": outcome.failures,
        "warnings": outcome.warnings,
        "quarantined": [str(p) for p in outcome.quarantined],
        "report": str(outcome.report),
        "validated_at": outcome.validated_at.isoformat(),
    }
    if outcome.volume is not None:
        entry["volume"] = asdict(outcome.volume)
    summary.setdefault("stages", {})[stage] = entry
    summary["success"] = all(s["success"] for s in summary["stages"].values())
    atomic_write_text(path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
