"""Scoring the global temporal split under both seen filters: one pass against two.

``grank offline-eval --protocol gts`` scores every target under serving's seen filter
(the user's last ``long_seq_len`` events) and under the literature's (every event of
the history). Both are masks over the same model scores, so
``training.evaluate.evaluate_by_filter`` runs the model once and ranks again only the
queries whose masks differ. This script times that against a pass under each filter,
side by side on the same model and queries, and checks that both give the same metrics:

    GRANK_DATA_ROOT=<root> GRANK_TRAIN__DIM=128 GRANK_TRAIN__N_LAYERS=3 \\
        .venv/bin/python benchmarks/gts_scoring.py --queries 8192

The model is untrained: scoring time does not depend on the weights, and which queries
the two masks set apart depends on the histories only.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from grank.cli.train import offline_job
from grank.config import Settings
from training.evaluate import evaluate, evaluate_by_filter
from training.offline import gts_variant, load
from training.train import pick_device, seed_everything


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--queries", type=int, default=8192, help="Successive targets to score (evenly spaced)."
    )
    parser.add_argument("--rounds", type=int, default=2, help="Alternating timed rounds.")
    args = parser.parse_args()

    job = offline_job(Settings(), 0.9, None, next_day_windows=False)
    device = pick_device()
    data = load(job, device)
    seed_everything(job.fit.seed)
    model, _, spec, _, inputs = gts_variant(job, data, "grank", device)
    successive = data.split.test_successive
    step = max(1, len(successive) // args.queries)
    queries = successive.select(np.arange(0, len(successive), step)[: args.queries])
    specs = [spec, replace(spec, seen_len=None)]
    longer = float((queries.cuts > spec.seen_len).mean()) if spec.seen_len else 0.0
    print(
        f"{len(queries):,} successive targets; {longer:.0%} with more history than serving's"
        f" filter of {spec.seen_len} events"
    )
    times: dict[str, list[float]] = {"a pass per filter": [], "one pass": []}
    for _ in range(args.rounds):
        started = time.perf_counter()
        separate = [evaluate(model, data.timelines, queries, s, device, inputs) for s in specs]
        times["a pass per filter"].append(time.perf_counter() - started)
        started = time.perf_counter()
        together = evaluate_by_filter(model, data.timelines, queries, specs, device, inputs)
        times["one pass"].append(time.perf_counter() - started)
        if together != separate:
            raise SystemExit("the two ways disagree")
    best = {name: min(values) for name, values in times.items()}
    for name, seconds in best.items():
        print(f"{name:18} {seconds:6.1f} s  (best of {args.rounds})")
    print(f"one pass / a pass per filter: {best['one pass'] / best['a pass per filter']:.2f}")


if __name__ == "__main__":
    main()
