"""The quality report site, opened the way its readers open it: in a real browser, offline.

ML-100K days go through the real gates (raw, then Spark-built features, then the feature
gate) and one injected bad partition (every event twice, as in tests/e2e/test_dag_e2e.py)
fails the raw gate. Headless Chromium (Debian's package, installed by scripts/setup.sh)
then renders the home page and validation pages with host resolution switched off and a
net log of every request; the page must show the day's table and status, and the log
must hold no request the page started. A control page with a CDN script proves the
detection sees such a request.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from datetime import date
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from features import quality_report, trend_chart
from features.jobs import build_day
from features.quality import QualitySpec, validate_features, validate_raw
from grank.cli import cli, main
from grank.cli.features_etl import build_spec
from grank.config import REPO_ROOT, Settings
from tests.conftest import land_dataset, make_settings
from tests.integration.test_features_jobs import raw_table, write_dimensions, write_raw
from tests.integration.test_quality_gates import DAY, GOOD, NULLABLE, quality_spec

FIRST_LANDED = date(1998, 3, 20)
DAY_1, DAY_2, BAD_DAY = date(1998, 3, 30), date(1998, 3, 31), date(1998, 4, 1)
FEATURE_TABLES = ("item_features", "training_examples", "user_behavior_sequences", "user_features")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # no name resolves: a report that needs the internet cannot get it here
    "--host-resolver-rules=MAP * ~NOTFOUND",
)
# Chromium's own background requests (update checks, account probes) carry no page
# origin; a request a page starts carries the page's origin ("null" for file://).
BROWSER_OWN_INITIATOR = "not an origin"


@pytest.fixture(scope="session")  # session: skipped before the Spark session would start
def chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-headless-shell")
    if binary is None:
        pytest.skip(
            "NOT TESTED IN A BROWSER: chromium is not installed (scripts/setup.sh installs"
            " Debian's chromium where apt-get runs as root); the report pages were not opened"
        )
    return binary


def open_page(chromium: str, page: Path, workdir: Path) -> tuple[str, list[str]]:
    """The DOM Chromium rendered for ``page`` and the URLs of the requests the page started."""
    workdir.mkdir(parents=True, exist_ok=True)
    netlog = workdir / "netlog.json"
    run = subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={workdir / 'profile'}",
            f"--log-net-log={netlog}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout, page_requests(netlog)


def page_requests(netlog: Path) -> list[str]:
    log = json.loads(netlog.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    starts = (e.get("params", {}) for e in log["events"] if e["type"] == start_job)
    return [p["url"] for p in starts if "url" in p and p.get("initiator") != BROWSER_OWN_INITIATOR]


class _References(HTMLParser):
    """Every URL a page refers to: attributes that load or link, and CSS ``url()``/``@import``."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str, str]] = []  # (tag, attribute, value)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in {"href", "src", "srcset", "action", "poster", "data", "xlink:href"}:
                self.found.append((tag, name, value or ""))
            if name == "style" and value and re.search(r"url\(|@import", value):
                self.found.append((tag, name, value))

    def handle_data(self, data: str) -> None:
        if re.search(r"url\(|@import", data):
            self.found.append(("text", "css", data))


def outside_references(page: Path) -> list[str]:
    """References of ``page`` that leave its folder tree or do not exist (should be none)."""
    parser = _References()
    parser.feed(page.read_text())
    problems = []
    for tag, attribute, value in parser.found:
        target = value.split("#")[0]
        if attribute in {"style", "css"} or re.match(r"^[a-z][a-z0-9+.-]*:|^//|^/", value, re.I):
            problems.append(f"{tag} {attribute}={value[:80]}")
        elif target and not (page.parent / unquote(target)).exists():
            problems.append(f"{tag} {attribute}={value} (missing)")
    return problems


@pytest.fixture(scope="module")
def site(spark, tmp_path_factory, datasets_dir) -> Settings:
    """Two replayed ML-100K days through both gates, then a bad raw day through the raw gate."""
    settings = make_settings(tmp_path_factory.mktemp("report-site"))
    land_dataset(settings, datasets_dir, FIRST_LANDED, BAD_DAY)
    spec = gate_spec(settings)
    for day in (DAY_1, DAY_2):
        assert validate_raw(spec, day).success
        build_day(spark, build_spec(settings), day)
        assert validate_features(spec, day).success
    partition = settings.lake_dir / "raw" / "events" / f"dt={BAD_DAY.isoformat()}"
    events = pq.read_table(partition)
    for part in partition.glob("*.parquet"):
        part.unlink()
    pq.write_table(pa.concat_tables([events, events]), partition / "part-00000.parquet")
    assert not validate_raw(spec, BAD_DAY).success
    return settings


def gate_spec(settings: Settings) -> QualitySpec:
    return QualitySpec(
        lake_dir=settings.lake_dir,
        features_dir=settings.features_dir,
        quarantine_dir=settings.quarantine_dir,
        reports_dir=settings.reports_dir,
    )


def result_page(settings: Settings, day: date, table: str) -> Path:
    """The page of the current result of ``table`` on ``day``."""
    report = quality_report.load_day(settings.reports_dir, day)
    return next(v.page for s in report.stages.values() for v in s.validations if v.suite == table)


def read_offline(chromium: str, page: Path, workdir: Path) -> tuple[str, str]:
    """The DOM and visible text of ``page``, which must not have asked for anything remote."""
    dom, requests = open_page(chromium, page, workdir)
    assert requests == [], page
    return dom, text_of(dom)


def text_of(dom: str) -> str:
    """Visible text of a DOM dump, whitespace collapsed (what a reader sees, in order)."""
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body))


@pytest.mark.spark
def test_home_page_opened_offline_lists_failed_day_first_with_its_expectation(
    chromium, site, tmp_path
):
    dom, _ = read_offline(chromium, quality_report.home_page(site.reports_dir), tmp_path)

    rows = re.findall(r"<tr class=\"(failed|ok)\">(.*?)</tr>", dom, flags=re.S)
    listed = [(kind, text_of(row)) for kind, row in rows]
    assert [text.split()[0] for _, text in listed] == [
        BAD_DAY.isoformat(),
        DAY_2.isoformat(),
        DAY_1.isoformat(),
    ]
    kind, bad = listed[0]
    assert kind == "failed"
    assert "failed" in bad and "not validated" in bad  # raw failed, features never ran
    assert "raw_events: expect_column_values_to_be_unique(event_id)" in bad
    for kind, day_text in listed[1:]:
        assert kind == "ok"
        assert day_text.count("passed") >= 3, day_text  # the day, its raw and features stage
        for table in ("raw_events", *FEATURE_TABLES):
            assert table in day_text
    trend = dom[dom.index('id="trend"') :]
    for title in (
        "Rows per table",
        "Raw volume ratio",
        "Null rates",
        "Failed expectations",
    ):
        assert title in trend
    assert trend.count("<svg") == 4
    # a point per validated day and table: 3 raw days, 2 days of each feature table
    rows_panel = trend[: trend.index("Raw volume ratio")]
    assert rows_panel.count("<circle") == 3 + 2 * len(FEATURE_TABLES)
    assert f"{BAD_DAY.isoformat()} · raw_events:" in rows_panel
    assert 'class="failed-day"' in trend


@pytest.mark.spark
def test_validation_pages_opened_offline_name_table_day_and_status(chromium, site, tmp_path):
    dom, text = read_offline(chromium, result_page(site, BAD_DAY, "raw_events"), tmp_path / "a")
    assert f"raw_events dt={BAD_DAY.isoformat()} failed" in text
    assert f"Run {BAD_DAY.isoformat()} raw" in text
    checks = re.findall(r'<tr class="(failed|warning|passed)">(.*?)</tr>', dom, flags=re.S)
    outcome, first = checks[0]  # failed expectations come first
    assert outcome == "failed"
    assert "expect_column_values_to_be_unique" in first and "event_id" in first
    # the doubled day also repeats (user, item, type, time): the re-delivery warning, then
    # every other check passed
    outcome, second = checks[1]
    assert outcome == "warning" and "expect_compound_columns_to_be_unique" in second
    assert [o for o, _ in checks[2:]] == ["passed"] * (len(checks) - 2)

    _, text = read_offline(chromium, result_page(site, DAY_2, "user_features"), tmp_path / "b")
    assert f"user_features dt={DAY_2.isoformat()} passed" in text
    assert f"Run {DAY_2.isoformat()} features" in text
    assert "failed" not in text


@pytest.mark.spark
def test_no_report_page_refers_to_anything_outside_the_report(site):
    pages = sorted(site.reports_dir.rglob("*.html"))
    # home, 3 day pages, 3 raw results, 2 x 4 feature results
    assert len(pages) == 1 + 3 + 3 + 2 * len(FEATURE_TABLES)
    for page in pages:
        html = page.read_text()
        assert outside_references(page) == [], page
        assert "<script" not in html and "<img" not in html and "<link" not in html, page


def test_detection_sees_a_page_that_loads_from_the_internet(chromium, tmp_path):
    page = tmp_path / "cdn.html"
    page.write_text(
        '<html><head><script src="https://cdn.jsdelivr.net/npm/jquery@3/dist/jquery.min.js">'
        '</script><style>@import url("https://fonts.example.org/a.css");</style></head>'
        '<body><img src="https://storage.googleapis.com/x/logo.png"><a href="missing.html">'
        "x</a></body></html>"
    )
    _, requests = open_page(chromium, page, tmp_path / "browser")
    assert "https://cdn.jsdelivr.net/npm/jquery@3/dist/jquery.min.js" in requests
    assert "https://storage.googleapis.com/x/logo.png" in requests
    assert len(outside_references(page)) == 4


# ------------------------------------------------------------ without Spark or a browser


def test_results_are_named_after_day_stage_table_and_partition(tmp_path):
    spec = quality_spec(tmp_path)
    write_dimensions(spec.lake_dir)
    write_raw(spec.lake_dir, DAY, raw_table(GOOD))

    outcome = validate_raw(spec, DAY)

    (stored,) = (outcome.report.parent / quality_report.RESULTS).rglob("*.json")
    meta = json.loads(stored.read_text())["meta"]
    assert meta["run_id"]["run_name"] == "2024-03-10 raw"
    assert meta["active_batch_definition"]["data_asset_name"] == "raw_events dt=2024-03-10"
    page = stored.with_suffix(".html").read_text()
    assert "raw_events dt=2024-03-10" in page and "2024-03-10 raw" in page
    assert outcome.home == spec.reports_dir / "index.html" and outcome.home.is_file()
    assert not list(spec.reports_dir.rglob("static")), "no GX Data Docs assets"


def test_rerun_of_a_day_shows_the_new_verdict_and_keeps_the_old_run(tmp_path):
    spec = quality_spec(tmp_path)
    write_dimensions(spec.lake_dir)
    write_raw(spec.lake_dir, DAY, raw_table([*GOOD, GOOD[0]]))
    assert not validate_raw(spec, DAY).success
    write_raw(spec.lake_dir, DAY, raw_table(GOOD))  # the fixed day, landed again

    assert validate_raw(spec, DAY).success

    (report,) = quality_report.load_days(spec.reports_dir)
    assert report.status == "passed"
    assert [v.status for v in report.runs] == ["passed", "failed"]  # newest first
    assert [v.status for v in report.stages["raw"].validations] == ["passed"]
    home = quality_report.home_page(spec.reports_dir).read_text()
    assert 'class="banner ok"' in home and "expect_column_values_to_be_unique" not in home
    assert home.count('class="status failed"') == 0
    day_page = report.page.read_text()
    assert day_page.count('class="status failed"') == 1  # the earlier run, still listed


def test_summary_keeps_the_volume_baseline_the_ratio_is_drawn_from(tmp_path):
    spec = quality_spec(tmp_path)
    write_dimensions(spec.lake_dir)
    previous = date(2024, 3, 9)
    write_raw(spec.lake_dir, previous, raw_table(GOOD[:5]))  # hand-made rows of another day
    write_raw(spec.lake_dir, DAY, raw_table(GOOD))

    validate_raw(spec, DAY)

    summary = json.loads((spec.reports_dir / "dt=2024-03-10" / "summary.json").read_text())
    assert summary["stages"]["raw"]["volume"] == {
        "trailing_average_rows": 5.0,
        "low_ratio": 0.2,
        "high_ratio": 5.0,
    }
    (report,) = [d for d in quality_report.load_days(spec.reports_dir) if d.day == DAY]
    assert report.stages["raw"].volume_ratio == pytest.approx(10 / 5)


def test_null_rates_are_what_gx_counted_per_column(tmp_path):
    spec = quality_spec(tmp_path)
    write_dimensions(spec.lake_dir)
    table = raw_table(GOOD, NULLABLE)
    column = table.schema.get_field_index("value")
    values = pa.array([None, *table["value"].to_pylist()[1:]], pa.float32())
    write_raw(spec.lake_dir, DAY, table.set_column(column, NULLABLE.field("value"), values))

    validate_raw(spec, DAY)

    (report,) = quality_report.load_days(spec.reports_dir)
    (raw,) = report.stages["raw"].validations
    assert raw.null_rates["value"] == pytest.approx(10.0)
    assert {c: r for c, r in raw.null_rates.items() if c != "value"} == dict.fromkeys(
        ["event_id", "user_id", "item_id", "event_type", "event_timestamp", "ingestion_time"],
        0.0,
    )
    home = quality_report.home_page(spec.reports_dir).read_text()
    assert "2024-03-10 · raw_events.value: 10.00%" in home


def test_report_command_rebuilds_every_page_and_survives_a_broken_result(tmp_path):
    spec = quality_spec(tmp_path)
    write_dimensions(spec.lake_dir)
    write_raw(spec.lake_dir, DAY, raw_table(GOOD))
    validate_raw(spec, DAY)
    pages = sorted(spec.reports_dir.rglob("*.html"))
    for page in pages:
        page.unlink()
    broken = spec.reports_dir / "dt=2024-03-10" / quality_report.RESULTS / "x" / "broken.json"
    broken.parent.mkdir(parents=True)
    broken.write_text("{not json")
    env = {"GRANK_DATA_ROOT": str(tmp_path)}

    result = CliRunner().invoke(cli, ["features", "report"], env=env)

    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(str(spec.reports_dir / "index.html"))
    assert sorted(spec.reports_dir.rglob("*.html")) == pages
    assert (
        f"unreadable result: {broken}"
        in (spec.reports_dir / "dt=2024-03-10" / "index.html").read_text()
    )


def test_report_command_without_reports_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GRANK_DATA_ROOT", str(tmp_path))
    monkeypatch.setattr("sys.argv", ["grank", "features", "report"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == (
        f"error: no quality reports under {tmp_path / 'reports'}: run grank features validate first"
    )


def test_report_site_imports_no_spark():
    code = "import sys, features.quality_report; sys.exit('pyspark' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT).returncode == 0


def test_trend_chart_draws_every_value_with_its_tooltip_and_breaks_lines_at_gaps():
    days = ["2024-03-01", "2024-03-02", "2024-03-03", "2024-03-04"]
    panel = trend_chart.Panel(
        "Rows",
        "rows",
        (trend_chart.Series("events", (10.0, 20.0, None, 40.0), "#000"),),
        integer=True,
    )
    svg = trend_chart.render(panel, days, marked=[2])
    assert svg.count("<circle") == 3
    assert svg.count("<polyline") == 1  # 10-20 joined; 40 alone after the gap
    assert "2024-03-04 · events: 40 rows" in svg
    assert svg.count('class="failed-day"') == 1
    assert "http" not in svg  # inline SVG needs no namespace URL either

    ratio = trend_chart.Panel(
        "Ratio",
        "x",
        (trend_chart.Series("r", (0.5, 2.0), "#000"),),
        log_scale=True,
        references=(0.2, 5.0),
    )
    svg = trend_chart.render(ratio, days[:2])
    assert svg.count('class="reference"') == 2
    ticks = re.findall(r'text-anchor="end">([^<]+)<', svg)
    assert ticks == ["0.2", "0.5", "1", "2", "5"]

    bars = trend_chart.Panel(
        "Failed",
        "expectations",
        (
            trend_chart.Series("critical", (0.0, 2.0), "#f00"),
            trend_chart.Series("warning", (1.0, 1.0), "#fa0"),
        ),
        bars=True,
        integer=True,
    )
    svg = trend_chart.render(bars, days[:2])
    assert svg.count("<rect") == 3
    assert re.findall(r'text-anchor="end">([^<]+)<', svg) == ["0", "1", "2", "3"]
