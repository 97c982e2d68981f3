"""Replay consecutive ML-1M days through the daily commands; chart the published model's quality.

For each day D of the replay, in order, exactly what the DAG runs for the model:
``grank features build --date D`` (the first day bootstraps from all history),
``grank train --date D`` (the first day from scratch under the bootstrap budget, then
warm starts) and ``grank evaluate --date D`` (the gate). After each day, the model
PUBLISHED names is the one that serves the next day; its next-day metrics on D (the
candidate's if it passed, the incumbent's otherwise) are set against both popularity
baselines and the previous model. Prints one table, writes it as JSON and a PNG chart:

    .venv/bin/python benchmarks/daily_replay.py --data-root /tmp/replay \\
        --first 2000-12-07 --days 14 --bootstrap-minutes 25

The data root gets the fetched datasets and the landed lake from ``data/`` (symlinked).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from grank.config import Settings

REPO = Path(__file__).resolve().parents[1]
GRANK = str(REPO / ".venv" / "bin" / "grank")
METRICS = ("recall@10", "recall@50", "ndcg@10")


def run(args: list[str], env: dict[str, str]) -> tuple[int, float, str]:
    started = time.perf_counter()
    done = subprocess.run([GRANK, *args], env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 99):
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"grank {' '.join(args)} failed ({done.returncode})")
    return done.returncode, seconds, done.stdout


def prepare(data_root: Path) -> None:
    """Share the checkout's fetched datasets and landed lake (read-only inputs)."""
    data_root.mkdir(parents=True, exist_ok=True)
    for name in ("downloads", "datasets", "lake"):
        link = data_root / name
        if not link.exists():
            link.symlink_to(REPO / "data" / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--first", type=date.fromisoformat, default=date(2000, 12, 7))
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--bootstrap-minutes", type=float, default=25.0)
    args = parser.parse_args()
    prepare(args.data_root)
    env = {
        **os.environ,
        "GRANK_DATA_ROOT": str(args.data_root),
        "GRANK_TRAIN__MAX_MINUTES": str(args.bootstrap_minutes),
    }
    settings = Settings(data_root=args.data_root)
    registry = settings.model_registry()
    recent = settings.train.recent_popularity_baseline  # popularity_7d by default
    rows = []
    for i in range(args.days):
        day = args.first + timedelta(days=i)
        build = ["features", "build", "--date", str(day)] + (["--rebuild"] if i == 0 else [])
        _, build_s, _ = run(build, env)
        _, train_s, _ = run(["train", "--date", str(day)], env)
        _, eval_s, _ = run(["evaluate", "--date", str(day)], env)
        row = day_row(registry.evaluation_dir(day), recent)
        row["seconds"] = {"build": build_s, "train": train_s, "evaluate": eval_s}
        rows.append(row)
        print(_line(row, recent), flush=True)
    out = args.data_root / "replay.json"
    out.write_text(json.dumps(rows, indent=2))
    summarize(rows, args.data_root / "replay.png", recent)
    print(f"table: {out}, chart: {args.data_root / 'replay.png'}")


def day_row(evaluation_dir: Path, recent: str) -> dict[str, Any]:
    """One day of the table from ``grank evaluate``'s report: what served the next day
    (the candidate if the gate passed it, else the model published before it)."""
    report = json.loads((evaluation_dir / "metrics.json").read_text())
    results = report["results"]
    passed = report["gate"]["publishable"]
    serving = results.get("candidate" if passed else "published", {})
    return {
        "day": evaluation_dir.name,
        "gate": "passed" if passed else "refused",
        "queries": report["n_queries"],
        "published_model": {m: serving.get(m) for m in METRICS},
        "candidate": {m: results.get("candidate", {}).get(m) for m in METRICS},
        "previous_model": {m: results.get("published", {}).get(m) for m in METRICS},
        "popularity_all_time": results["popularity_all_time"],
        recent: results[recent],
    }


def _line(row: dict[str, Any], recent: str) -> str:
    def cell(values: dict[str, Any]) -> str:
        return " ".join("   -  " if values.get(m) is None else f"{values[m]:.4f}" for m in METRICS)

    return (
        f"{row['day']} {row['gate']:8} q={row['queries']:3d}"
        f" | published {cell(row['published_model'])} | candidate {cell(row['candidate'])}"
        f" | previous {cell(row['previous_model'])} | {recent} {cell(row[recent])}"
        f" | pop_all {cell(row['popularity_all_time'])} | train {row['seconds']['train']:.0f}s"
    )


def summarize(rows: list[dict[str, Any]], chart: Path, recent: str) -> None:
    """Pooled (query-weighted) means, days won, and the PNG chart; ``recent`` names the
    recent-popularity baseline (train.recent_popularity_days)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def pooled(key: str, metric: str) -> float:
        pairs = [(r[key].get(metric), r["queries"]) for r in rows if r[key].get(metric) is not None]
        return sum(v * n for v, n in pairs) / max(sum(n for _, n in pairs), 1)

    for metric in METRICS:
        wins = sum(
            1
            for r in rows
            if r["published_model"].get(metric) is not None
            and r["published_model"][metric]
            > max(r[recent][metric], r["popularity_all_time"][metric])
        )
        print(
            f"{metric}: pooled published {pooled('published_model', metric):.4f}"
            f" candidate {pooled('candidate', metric):.4f}"
            f" {recent} {pooled(recent, metric):.4f}"
            f" pop_all {pooled('popularity_all_time', metric):.4f};"
            f" published beats both baselines on {wins} of {len(rows)} days"
        )
    fig, axes = plt.subplots(1, len(METRICS), figsize=(15, 4))
    days = [r["day"][5:] for r in rows]
    for ax, metric in zip(axes, METRICS, strict=True):
        for key, style in (
            ("published_model", "o-"),
            ("candidate", "d-"),
            ("previous_model", "x--"),
            (recent, "s:"),
            ("popularity_all_time", "^:"),
        ):
            values = [r[key].get(metric) for r in rows]
            ax.plot(days, [float("nan") if v is None else v for v in values], style, label=key)
        ax.set_title(f"next-day {metric}")
        ax.tick_params(axis="x", rotation=60)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(chart, dpi=100)


if __name__ == "__main__":
    main()
