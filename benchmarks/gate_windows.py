"""The gate's verdict on a bootstrap's evidence under trailing windows of several lengths.

``grank evaluate --date D`` stores every query it judged, the bootstrap's walk-forward
days included (``models/evaluations/D/queries.parquet``). This script re-decides that
evidence with the configured gate policy, changing only ``window_days``: how the
interval of (candidate - best baseline) narrows as the window holds more queries.

    GRANK_DATA_ROOT=/tmp/r .venv/bin/python benchmarks/gate_windows.py \\
        --date 2000-12-07 --windows 7,10,14

Only the candidate's own records are re-decided (no earlier evaluation is pooled in), so
the numbers equal ``grank evaluate``'s for a bootstrap on a fresh data root, not for a
warm start.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from datetime import date

import pyarrow as pa

from grank.config import Settings
from training.data import day_number
from training.gate import CANDIDATE, EVIDENCE_FILE, PUBLISHED, decide, read_evidence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--date", type=date.fromisoformat, required=True, help="evaluated day")
    parser.add_argument("--windows", default="7,10,14", help="window lengths in days")
    args = parser.parse_args()
    settings = Settings()
    folder = settings.model_registry().evaluation_dir(args.date)
    last = day_number(args.date)
    records = read_evidence([folder], 0, last)
    if records is None:
        raise SystemExit(f"no {EVIDENCE_FILE} under {folder}: run grank evaluate first")
    models = {name.split(".")[0] for name in records.column_names if "." in name}
    baselines = sorted(models - {CANDIDATE, PUBLISHED})
    print(f"{folder}: {records.num_rows} queries, baselines {', '.join(baselines)}")
    print(f"{'days':>4} {'queries':>7} {'users':>5}  verdict")
    for window in (int(days) for days in args.windows.split(",")):
        in_window = records.filter(pa.array(records["day"].to_numpy() > last - window))
        verdict = decide(in_window, baselines, replace(settings.train.gate, window_days=window))
        outcome = "passed" if verdict.publishable else "refused"
        counts = f"{window:>4} {verdict.n_queries:>7} {verdict.n_users:>5}"
        print(f"{counts}  {outcome}: {verdict.reason}")


if __name__ == "__main__":
    main()
