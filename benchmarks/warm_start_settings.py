"""Settings of the daily warm start side by side, on the days after one shared bootstrap.

A daily replay spends most of its time on its first day's bootstrap, whose weights also
depend on the machine's speed (its time budget). To compare settings of the days after
it, this script starts every setting from the same bootstrapped data root (one made by
``daily_replay.py --days 1``): it builds the features of the later days there (those not
built yet), copies the root once per setting, and on each copy runs ``grank train --date
D`` and ``grank evaluate --date D`` for each day in order with the setting's environment,
``--parallel`` copies at a time (``OMP_NUM_THREADS=1`` each). Then, per setting, the
daily replay's summary (pooled next-day metrics of what served, days ahead of both
popularity baselines; the bootstrap's evaluated days included) and its chart:

    .venv/bin/python benchmarks/daily_replay.py --data-root /tmp/boot --first 2000-12-07 --days 1
    .venv/bin/python benchmarks/warm_start_settings.py --bootstrapped /tmp/boot \\
        --first 2000-12-08 --days 13 --out /tmp/settings \\
        --setting default= --setting epochs5=GRANK_TRAIN__FINETUNE_MAX_EPOCHS=5

A setting is ``NAME=`` (the configuration as it is) or ``NAME=VAR=VALUE[,VAR=VALUE...]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta
from pathlib import Path

from daily_replay import day_row, run, summarize

from features.feature_tables import TRAINING_EXAMPLES, FeatureTables
from grank.config import Settings


def parse_setting(text: str) -> tuple[str, dict[str, str]]:
    name, _, assignments = text.partition("=")
    pairs = [a.split("=", 1) for a in assignments.split(",") if a]
    if not name or any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"not NAME= or NAME=VAR=VALUE[,...]: {text!r}")
    return name, dict(pairs)


def build_missing_features(root: Path, days: list[date]) -> None:
    """Build the days' features on the shared root once, before it is copied."""
    tables = FeatureTables(Settings(data_root=root).features_dir)
    env = {**os.environ, "GRANK_DATA_ROOT": str(root)}
    for day in days:
        if not tables.partition(TRAINING_EXAMPLES, day).is_dir():
            run(["features", "build", "--date", str(day)], env)


def train_and_judge(source: Path, copy: Path, overrides: dict[str, str], days: list[date]) -> None:
    """One setting: copy the bootstrapped root, then each day's train and evaluate."""
    shutil.copytree(source, copy, symlinks=True)
    env = {**os.environ, **overrides, "GRANK_DATA_ROOT": str(copy), "OMP_NUM_THREADS": "1"}
    for day in days:
        run(["train", "--date", str(day)], env)
        run(["evaluate", "--date", str(day)], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrapped", type=Path, required=True, help="data root to start from")
    parser.add_argument("--first", type=date.fromisoformat, required=True)
    parser.add_argument("--days", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for the copies")
    parser.add_argument("--setting", type=parse_setting, action="append", required=True)
    parser.add_argument("--parallel", type=int, default=2, help="copies trained at a time")
    args = parser.parse_args()
    days = [args.first + timedelta(days=i) for i in range(args.days)]
    settings = dict(args.setting)
    copies = {name: args.out / name for name in settings}
    if taken := [str(c) for c in copies.values() if c.exists()]:
        raise SystemExit(f"already there (remove them or pick another --out): {taken}")
    build_missing_features(args.bootstrapped, days)
    args.out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        jobs = [
            pool.submit(train_and_judge, args.bootstrapped, copies[name], overrides, days)
            for name, overrides in settings.items()
        ]
        for job in jobs:
            job.result()
    recent = Settings(data_root=args.bootstrapped).train.recent_popularity_baseline
    for name, copy in copies.items():
        evaluations = Settings(data_root=copy).model_registry().evaluation_dir(days[0]).parent
        folders = sorted(f for f in evaluations.iterdir() if (f / "metrics.json").is_file())
        rows = [day_row(folder, recent) for folder in folders]
        print(f"== {name} {' '.join(f'{k}={v}' for k, v in settings[name].items())}")
        summarize(rows, copy / "replay.png", recent)


if __name__ == "__main__":
    main()
