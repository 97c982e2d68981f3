"""The gate's verdict on one evaluated day under trailing windows of several lengths.

``grank evaluate --date D`` stores every query it judged, a bootstrap's walk-forward days
included (``models/evaluations/D/queries.parquet``). This script re-decides that evidence
exactly as ``grank evaluate`` does (earlier evaluations in the window pooled in, the
configured policy and baselines), changing only ``window_days``: how the interval of
(candidate - best baseline) narrows as the window holds more queries.

    GRANK_DATA_ROOT=/tmp/r .venv/bin/python benchmarks/gate_windows.py \\
        --date 2000-12-07 --windows 7,10,14
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from datetime import date

from grank.cli.train import daily_job
from grank.config import Settings
from training.daily import gate_verdict
from training.data import day_number
from training.gate import EVIDENCE_FILE, read_evidence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--date", type=date.fromisoformat, required=True, help="evaluated day")
    parser.add_argument("--windows", default="7,10,14", help="window lengths in days")
    args = parser.parse_args()
    job = daily_job(Settings(), args.date)
    folder = job.registry.evaluation_dir(args.date)
    evidence = read_evidence([folder], 0, day_number(args.date))
    if evidence is None:
        raise SystemExit(f"no {EVIDENCE_FILE} under {folder}: run grank evaluate first")
    print(f"{folder}: {evidence.num_rows} queries, baselines {', '.join(job.baselines.columns)}")
    print(f"{'days':>4} {'queries':>7} {'users':>5}  verdict")
    for window in (int(days) for days in args.windows.split(",")):
        windowed = replace(job, gate=replace(job.gate, window_days=window))
        verdict = gate_verdict(windowed, evidence)
        outcome = "passed" if verdict.publishable else "refused"
        counts = f"{window:>4} {verdict.n_queries:>7} {verdict.n_users:>5}"
        print(f"{counts}  {outcome}: {verdict.reason}")


if __name__ == "__main__":
    main()
