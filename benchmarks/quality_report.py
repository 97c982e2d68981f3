"""Benchmark of the quality report site: how long a gate run spends redrawing the home page.

Usage (results go to docs/features.md, "Reports: how to read them")::

    .venv/bin/python benchmarks/quality_report.py --workdir /tmp/grank-report-bench --days 365

One real run of both gates on an ML-100K day (``data/datasets`` must hold ML-100K: ``grank
data fetch ml-100k``; the feature build uses Spark) gives real GX results (raw events and
the four feature tables); their result JSON and the summary are then copied to
``--days`` consecutive days, with every mention of the date replaced (run names, data
assets, day bounds), as if each day had been validated. Then, best of three:
``render_day`` (what every ``grank features validate`` does after the gate: that day's
pages and the home page, which reads every day's results) and ``render_all`` (``grank
features report``: every page, each written atomically and synced to disk).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path

from features import quality_report

REPO = Path(__file__).resolve().parent.parent
GRANK = REPO / ".venv" / "bin" / "grank"
SOURCE_DAY = date(1998, 3, 31)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--days", type=int, default=365)
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    reports = args.workdir / "reports"
    template = one_real_day(args.workdir, reports)
    first = date(2001, 1, 1)
    for offset in range(args.days):
        copy_day(template, reports, first + timedelta(days=offset))
    shutil.rmtree(template)
    json_bytes = sum(p.stat().st_size for p in reports.rglob("*.json"))
    last = first + timedelta(days=args.days - 1)
    print(f"{args.days} days, {json_bytes / 1e6:.1f} MB of result JSON and summaries")
    one_day = best(lambda: quality_report.render_day(reports, last))
    print(f"render_day (after each gate run): {one_day:.2f} s")
    every_page = best(lambda: quality_report.render_all(reports))
    print(f"render_all (grank features report): {every_page:.2f} s")


def one_real_day(workdir: Path, reports: Path) -> Path:
    """Land a week of ML-100K, run both gates (and the Spark build) on its last day (CLI)."""
    workdir.mkdir(parents=True)
    (workdir / "datasets").symlink_to(REPO / "data" / "datasets")
    env = {**os.environ, "GRANK_DATA_ROOT": str(workdir), "GRANK_DATASET": "ml-100k"}
    first = (SOURCE_DAY - timedelta(days=7)).isoformat()
    for command in (
        ["data", "land", "--from", first, "--to", SOURCE_DAY.isoformat()],
        ["features", "validate", "--date", SOURCE_DAY.isoformat()],
        ["features", "build", "--date", SOURCE_DAY.isoformat()],
        ["features", "validate", "--date", SOURCE_DAY.isoformat(), "--stage", "features"],
    ):
        subprocess.run([str(GRANK), *command], env=env, check=True, stdout=subprocess.DEVNULL)
    return quality_report.day_dir(reports, SOURCE_DAY)


def copy_day(template: Path, reports: Path, day: date) -> None:
    """The template day's results and summary, every mention of its date replaced by ``day``."""
    old, new = SOURCE_DAY.isoformat(), day.isoformat()
    target = quality_report.day_dir(reports, day)
    for source in template.rglob("*.json"):
        path = target / str(source.relative_to(template)).replace(old, new)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source.read_text().replace(old, new))


def best(run: Callable[[], object], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


if __name__ == "__main__":
    main()
