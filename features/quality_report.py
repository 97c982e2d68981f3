"""The data quality report site: one home page over all days, a page per day and per result.

Great Expectations stays the engine and its validation-result JSON the source of truth
(stored per day under ``reports/dt=D/validations/``, beside the gate's ``summary.json``);
the pages are rendered here from those files with templates of ours
(``features/report_templates/``) that load nothing: no script, no stylesheet, font or
image from elsewhere, the trend chart is inline SVG (features/trend_chart.py). GX's own
Data Docs pull Bootstrap, jQuery and Vega from public CDNs and a logo from a public bucket,
so without internet their home page is empty.

Layout (every link relative, so the folder can be copied or served anywhere)::

    reports/index.html                        every day and stage, failed days first, trend
    reports/dt=D/index.html                   one day: each stage's verdict and all its runs
    reports/dt=D/validations/.../<batch>.json GX's result (one suite on one partition)
    reports/dt=D/validations/.../<batch>.html its page, beside it

A gate run rebuilds its day and the home page (``render_day``); ``grank features report``
rebuilds everything (``render_all``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2

from common.atomic import atomic_write_text
from common.errors import UserFacingError
from features import trend_chart

SUMMARY = "summary.json"
RESULTS = "validations"  # the validation results store of features/gx/great_expectations.yml
PAGE = "index.html"
STAGES = ("raw", "features")
TEMPLATES = Path(__file__).resolve().parent / "report_templates"
ROW_COUNT = "expect_table_row_count_to_be_between"
NOT_NULL = "expect_column_values_to_not_be_null"
SAMPLE_SIZE = 10  # unexpected values shown per expectation (GX keeps up to 20)
LONG_LIST = 8  # longer argument lists are shown as their length


def run_name(day: date, stage: str) -> str:
    """GX run name of a gate run: the logical date and the stage (``2000-12-08 raw``)."""
    return f"{day.isoformat()} {stage}"


def asset_name(table: str, day: date) -> str:
    """GX data asset name of a validated partition (``raw_events dt=2000-12-08``)."""
    return f"{table} dt={day.isoformat()}"


def check_label(suite: str, expectation: str, kwargs: Mapping[str, Any]) -> str:
    """One failed expectation as the gate reports it: ``suite: expectation(column)``."""
    return f"{suite}: {expectation}({kwargs.get('column', '')})"


def day_dir(reports_dir: Path, day: date) -> Path:
    """The folder of one date: its page, its summary and its GX results."""
    return reports_dir / f"dt={day.isoformat()}"


def day_page(reports_dir: Path, day: date) -> Path:
    """The page of one date."""
    return day_dir(reports_dir, day) / PAGE


def home_page(reports_dir: Path) -> Path:
    """The page that lists every day."""
    return reports_dir / PAGE


@dataclass(frozen=True)
class Check:
    """One expectation of one validation result, in words."""

    label: str
    expectation: str
    columns: str
    severity: str
    success: bool
    arguments: str
    observed: str
    sample: str
    notes: str

    @property
    def explanation(self) -> str:
        """What was seen against what was expected, in one line."""
        return "; expected ".join(t for t in (self.observed, self.arguments) if t)

    @property
    def outcome(self) -> str:
        if self.success:
            return "passed"
        return "warning" if self.severity == "warning" else "failed"


@dataclass(frozen=True)
class Validation:
    """One stored GX result: one suite on one partition in one run."""

    source: Path
    suite: str
    asset: str
    run: str
    run_time: datetime
    gx_version: str
    checks: tuple[Check, ...]
    rows: int | None
    null_rates: Mapping[str, float]  # column -> percent of rows missing

    @property
    def page(self) -> Path:
        return self.source.with_suffix(".html")

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.outcome == "failed")

    @property
    def warned(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.outcome == "warning")

    @property
    def status(self) -> str:
        return _status(not self.failed, bool(self.warned))

    @property
    def passed(self) -> int:
        return sum(c.success for c in self.checks)


@dataclass(frozen=True)
class Finding:
    """One line of what went wrong in a stage, with the page that shows it."""

    kind: str  # "failed" or "warning"
    label: str
    detail: str
    page: Path | None  # None: the gate failed before GX (e.g. an unreadable file)


@dataclass(frozen=True)
class StageReport:
    """A stage's verdict for a day (from ``summary.json``) and the results it was drawn from."""

    name: str
    success: bool
    failures: tuple[str, ...]
    warnings: tuple[str, ...]
    quarantined: tuple[str, ...]
    validated_at: datetime
    trailing_average_rows: float | None
    volume_band: tuple[float, float] | None
    validations: tuple[Validation, ...]

    @property
    def status(self) -> str:
        return _status(self.success, bool(self.warnings))

    @property
    def other_failures(self) -> tuple[str, ...]:
        """Gate failures no stored expectation explains (e.g. an unreadable Parquet file)."""
        explained = {c.label for v in self.validations for c in v.failed}
        return tuple(f for f in self.failures if f not in explained)

    @property
    def findings(self) -> tuple[Finding, ...]:
        """Failures first (those GX did not see lead: they are usually the cause), warnings last."""
        return (
            *(Finding("failed", line, "", None) for line in self.other_failures),
            *(
                Finding(c.outcome, c.label, c.explanation, v.page)
                for outcome in ("failed", "warning")
                for v in self.validations
                for c in v.checks
                if c.outcome == outcome
            ),
        )

    @property
    def volume_ratio(self) -> float | None:
        """Rows of the day over the trailing average the volume warning compares it with."""
        rows = next((v.rows for v in self.validations), None)
        if rows is None or not self.trailing_average_rows:
            return None
        return rows / self.trailing_average_rows


@dataclass(frozen=True)
class DayReport:
    """Everything stored for one date: the stages' verdicts and every result of every run."""

    day: date
    page: Path
    success: bool
    stages: Mapping[str, StageReport]
    runs: tuple[Validation, ...]  # newest first
    unreadable: tuple[str, ...]  # result files that could not be read, with the reason

    @property
    def status(self) -> str:
        return _status(self.success, any(s.warnings for s in self.stages.values()))

    @property
    def raw_rows(self) -> int | None:
        raw = self.stages.get("raw")
        return next((v.rows for v in raw.validations), None) if raw else None


def _status(success: bool, warned: bool) -> str:
    if not success:
        return "failed"
    return "passed with warnings" if warned else "passed"


def render_day(reports_dir: Path, day: date) -> Path:
    """Render the pages of ``day`` and the home page (after a gate run); returns the home."""
    days = load_days(reports_dir)
    for report in days:
        if report.day == day:
            _write_day(reports_dir, report)
    return _write_home(reports_dir, days)


def render_all(reports_dir: Path) -> Path:
    """Render every page from the stored results; returns the home page."""
    days = load_days(reports_dir)
    if not days:
        raise UserFacingError(
            f"no quality reports under {reports_dir}: run grank features validate first"
        )
    for report in days:
        _write_day(reports_dir, report)
    return _write_home(reports_dir, days)


def load_days(reports_dir: Path) -> list[DayReport]:
    """Every date that has a verdict (``dt=D/summary.json``), oldest first."""
    days = []
    for folder in sorted(reports_dir.glob("dt=*")):
        try:
            day = date.fromisoformat(folder.name.removeprefix("dt="))
        except ValueError:
            continue
        if (folder / SUMMARY).is_file():
            days.append(load_day(reports_dir, day))
    return days


def load_day(reports_dir: Path, day: date) -> DayReport:
    """One date's verdict, matched with the GX results of each stage's latest run."""
    folder = day_dir(reports_dir, day)
    summary = json.loads((folder / SUMMARY).read_text())
    runs, unreadable = _load_results(folder / RESULTS)
    stages = {}
    for name, entry in summary.get("stages", {}).items():
        validated_at = datetime.fromisoformat(entry["validated_at"])
        volume = entry.get("volume") or {}
        stages[name] = StageReport(
            name=name,
            success=bool(entry["success"]),
            failures=tuple(entry.get("failures", ())),
            warnings=tuple(entry.get("warnings", ())),
            quarantined=tuple(entry.get("quarantined", ())),
            validated_at=validated_at,
            trailing_average_rows=volume.get("trailing_average_rows"),
            volume_band=(volume["low_ratio"], volume["high_ratio"]) if volume else None,
            validations=tuple(
                sorted(
                    (
                        v
                        for v in runs
                        if v.run == run_name(day, name) and v.run_time == validated_at
                    ),
                    key=lambda v: (not v.failed, v.suite),
                )
            ),
        )
    return DayReport(
        day=day,
        page=folder / PAGE,
        success=bool(summary.get("success", True)),
        stages=stages,
        runs=tuple(sorted(runs, key=lambda v: (v.run_time, v.suite), reverse=True)),
        unreadable=tuple(unreadable),
    )


def _load_results(folder: Path) -> tuple[list[Validation], list[str]]:
    runs, unreadable = [], []
    for path in sorted(folder.rglob("*.json")):
        try:
            runs.append(_read_validation(path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            unreadable.append(f"{path}: {exc}")
    return runs, unreadable


def _read_validation(path: Path) -> Validation:
    data = json.loads(path.read_text())
    meta = data["meta"]
    suite = data["suite_name"]
    run = meta.get("run_id") or {}
    results = data["results"]
    return Validation(
        source=path,
        suite=suite,
        asset=str((meta.get("active_batch_definition") or {}).get("data_asset_name")),
        run=str(run.get("run_name")),
        run_time=datetime.fromisoformat(run["run_time"]),
        gx_version=str(meta.get("great_expectations_version", "")),
        checks=tuple(_read_check(suite, r) for r in results),
        rows=_rows(results),
        null_rates=_null_rates(results),
    )


def _read_check(suite: str, result: Mapping[str, Any]) -> Check:
    config = result["expectation_config"]
    kwargs = config["kwargs"]
    details = result.get("result") or {}
    columns = [kwargs[k] for k in ("column", "column_A", "column_B") if k in kwargs]
    shown = {"batch_id", "column", "column_A", "column_B"}
    sample = details.get("partial_unexpected_list") or []
    return Check(
        label=check_label(suite, config["type"], kwargs),
        expectation=config["type"],
        columns=", ".join(str(c) for c in columns),
        severity=str(config.get("severity") or "critical"),
        success=bool(result["success"]),
        arguments=", ".join(f"{k}={_short(v)}" for k, v in kwargs.items() if k not in shown),
        observed=_observed(details, result.get("exception_info") or {}),
        sample=", ".join(_short(v) for v in sample[:SAMPLE_SIZE])
        + (", …" if len(sample) > SAMPLE_SIZE else ""),
        notes=str(config.get("notes") or ""),
    )


def _observed(details: Mapping[str, Any], exception: Mapping[str, Any]) -> str:
    """What GX saw: the observed value, or how many rows broke the expectation, or its error."""
    infos = [exception] if "raised_exception" in exception else list(exception.values())
    errors = [
        str(i.get("exception_message"))
        for i in infos
        if isinstance(i, dict) and i.get("raised_exception")
    ]
    if errors:
        return "error: " + "; ".join(dict.fromkeys(e.removeprefix("Error: ") for e in errors))
    if "observed_value" in details:
        return _short(details["observed_value"], limit=20)
    if "unexpected_count" in details:
        text = (
            f"{details['unexpected_count']:,} of {details.get('element_count', 0):,} rows"
            f" unexpected ({details.get('unexpected_percent') or 0:.2f}%)"
        )
        if details.get("missing_count"):
            text += f", {details['missing_count']:,} missing"
        return text
    return ""


def _short(value: Any, limit: int = LONG_LIST) -> str:
    if isinstance(value, list | tuple):
        if len(value) > limit:
            return f"[{len(value):,} values]"
        return "[" + ", ".join(_short(v) for v in value) + "]"
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _rows(results: Iterable[Mapping[str, Any]]) -> int | None:
    """Rows of the validated partition: the row-count expectation's observation, else the
    element count any column expectation saw."""
    counts: list[int] = []
    for result in results:
        details = result.get("result") or {}
        if result["expectation_config"]["type"] == ROW_COUNT and isinstance(
            details.get("observed_value"), int
        ):
            return int(details["observed_value"])
        if isinstance(details.get("element_count"), int):
            counts.append(details["element_count"])
    return max(counts) if counts else None


def _null_rates(results: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Percent of missing values per column, from what the column expectations counted."""
    rates: dict[str, float] = {}
    for result in results:
        config, details = result["expectation_config"], result.get("result") or {}
        column = config["kwargs"].get("column")
        key = "unexpected_percent" if config["type"] == NOT_NULL else "missing_percent"
        # ``check_*`` columns are derived per row by the gate (features/quality.py), not data
        if column is None or column.startswith("check_") or details.get(key) is None:
            continue
        rates[column] = max(rates.get(column, 0.0), float(details[key]))
    return rates


# ---------------------------------------------------------------- pages


@cache
def _templates() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _render(page: Path, template: str, **values: Any) -> None:
    def link(target: Path) -> str:
        return quote(os.path.relpath(target, page.parent).replace(os.sep, "/"), safe="/=")

    html = _templates().get_template(template).render(link=link, **values)
    atomic_write_text(page, html)


def _write_day(reports_dir: Path, report: DayReport) -> None:
    home = home_page(reports_dir)
    for validation in report.runs:
        _render(
            validation.page,
            "validation.html",
            v=validation,
            day=report,
            home=home,
            checks=sorted(
                validation.checks, key=lambda c: ("failed", "warning", "passed").index(c.outcome)
            ),
        )
    _render(report.page, "day.html", day=report, home=home, stages=STAGES)


def _write_home(reports_dir: Path, days: list[DayReport]) -> Path:
    home = home_page(reports_dir)
    newest_first = sorted(days, key=lambda d: d.day, reverse=True)
    listed = [d for d in newest_first if not d.success] + [d for d in newest_first if d.success]
    _render(
        home,
        "home.html",
        days=listed,
        failed=[d for d in listed if not d.success],
        stages=STAGES,
        panels=_trend(days),
        built_at=datetime.now(tz=UTC).strftime("%Y-%m-%d %H:%M UTC"),
        reports_dir=reports_dir,
    )
    return home


def _trend(days: list[DayReport]) -> list[tuple[trend_chart.Panel, str]]:
    """The trend panels over all days (oldest first), each with its SVG markup."""
    current = [
        [v for name in STAGES if name in d.stages for v in d.stages[name].validations] for d in days
    ]
    raw = [d.stages.get("raw") for d in days]
    band = next((s.volume_band for s in reversed(raw) if s and s.volume_band), None)
    ratio = tuple(s.volume_ratio if s else None for s in raw)
    panels = [
        trend_chart.Panel(
            "Rows per table",
            "rows",
            _rows_per_table(current),
            integer=True,
            note="rows GX counted in each validated partition",
        ),
        trend_chart.Panel(
            "Raw volume ratio",
            "x",
            (trend_chart.Series("rows / trailing average", ratio, trend_chart.PALETTE[0]),),
            log_scale=True,
            references=band or (),
            note="raw events over the average of the previous landed days; dashed: the"
            " warning band",
        ),
        trend_chart.Panel(
            "Null rates",
            "%",
            _null_rates_per_column(current),
            note="percent of missing values, per column that had any; all others 0%",
        ),
        trend_chart.Panel(
            "Failed expectations",
            "expectations",
            (
                trend_chart.Series("critical", _count(days, "failed"), "#c0392b"),
                trend_chart.Series("warning", _count(days, "warning"), "#e0a000"),
            ),
            bars=True,
            integer=True,
            note="per day, raw and features stages together",
        ),
    ]
    labels = [d.day.isoformat() for d in days]
    marked = [i for i, d in enumerate(days) if not d.success]
    return [(p, trend_chart.render(p, labels, marked)) for p in panels]


def _rows_per_table(current: list[list[Validation]]) -> tuple[trend_chart.Series, ...]:
    """One series per validated table (in stage order) of its rows on each day."""
    tables = list(dict.fromkeys(v.suite for validations in current for v in validations))
    return tuple(
        trend_chart.Series(
            table,
            tuple(next((v.rows for v in vs if v.suite == table), None) for vs in current),
            color,
        )
        for table, color in zip(tables, trend_chart.colors(len(tables)), strict=True)
    )


def _null_rates_per_column(current: list[list[Validation]]) -> tuple[trend_chart.Series, ...]:
    """One series per column that had missing values on some day; else one flat series."""
    nullable = sorted(
        {(v.suite, c) for vs in current for v in vs for c, rate in v.null_rates.items() if rate}
    )
    if not nullable:
        flat = tuple(0.0 if vs else None for vs in current)
        return (trend_chart.Series("every checked column", flat, trend_chart.PALETTE[0]),)
    return tuple(
        trend_chart.Series(
            f"{table}.{column}",
            tuple(
                next((v.null_rates.get(column) for v in vs if v.suite == table), None)
                for vs in current
            ),
            color,
        )
        for (table, column), color in zip(nullable, trend_chart.colors(len(nullable)), strict=True)
    )


def _count(days: list[DayReport], outcome: str) -> tuple[float, ...]:
    """Expectations per day with this outcome in the current runs (failures GX did not see
    count as failed)."""
    counts = []
    for day in days:
        stages = day.stages.values()
        count = sum(c.outcome == outcome for s in stages for v in s.validations for c in v.checks)
        if outcome == "failed":
            count += sum(len(s.other_failures) for s in stages)
        counts.append(float(count))
    return tuple(counts)
