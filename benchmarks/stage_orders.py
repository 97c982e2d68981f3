"""Next-day quality of one candidate's two stages: the Generator's order and the Ranker's.

Serving (and the gate) returns the Ranker's order of the Generator's top ``k1``. This
script scores one committed candidate on the next-day queries of consecutive days, both
orders side by side, with both popularity baselines (and, for a candidate whose
validation chose a popularity prior, its served order without the prior), on the same
queries and with the same seen filter and servable items as ``grank evaluate``:

    GRANK_DATA_ROOT=/tmp/r .venv/bin/python benchmarks/stage_orders.py \\
        --candidate-day 2000-12-07 --first 2000-12-07 --days 8

Both orders are also scored with the user vector read at each other place
(``GRankConfig.user_vector``: U, the newest event's slot, their mean), from the same
weights.

``--seen-filter all`` filters every item of the user's history instead of serving's last
``long_seq_len`` events: what a complete seen filter would change, for every order.

``--per-day`` adds each day's N@10 and R@50 per order: which days a model wins against
both popularity baselines, the count the daily replay reports for what served.

The candidate is the one ``grank train --date <candidate-day>`` committed (trained on
every event before that day); the features of every scored day must be built. Later days
are scored with the same, increasingly stale, model: the comparison is between the two
orders of one model, not of the daily pipeline.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from datetime import date, timedelta
from typing import Any

import numpy as np
import torch

from grank.cli.train import daily_job
from grank.config import Settings
from training.checkpoint import load_checkpoint
from training.config import USER_VECTORS, EvalConfig
from training.daily import DayData, read_day_data
from training.data import Queries, next_day
from training.evaluate import final_stage, rankings
from training.metrics import per_query_metrics
from training.model import GRank

METRICS = ("recall@10", "recall@50", "recall@200", "ndcg@10")
CPU = torch.device("cpu")


def _rankings_with(
    model: GRank, changes: dict[str, Any], data: DayData, queries: Queries, spec: EvalConfig
) -> dict[str, np.ndarray]:
    """The candidate's rankings with ``changes`` to its config, which stays as it was."""
    served = model.config
    model.config = replace(served, **changes)
    try:
        return rankings(model, data.timelines, queries, spec, CPU, data.model_inputs)
    finally:
        model.config = served


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidate-day", type=date.fromisoformat, required=True)
    parser.add_argument("--first", type=date.fromisoformat, required=True)
    parser.add_argument("--days", type=int, default=8)
    parser.add_argument("--seen-filter", choices=("serving", "all"), default="serving")
    parser.add_argument("--per-day", action="store_true", help="each day's N@10 and R@50 too")
    args = parser.parse_args()
    settings = Settings()
    registry = settings.model_registry()
    model, manifest = load_checkpoint(
        registry.checkpoint_path(registry.candidate(args.candidate_day))
    )
    first_history = date.fromisoformat(manifest["data_first_day"])
    n_rows = model.config.n_item_rows

    per_query: dict[str, dict[str, list[np.ndarray]]] = {}
    days = [args.first + timedelta(days=offset) for offset in range(args.days)]
    for day in days:
        job = daily_job(settings, day)
        spec = job.spec if args.seen_filter == "serving" else replace(job.spec, seen_len=None)
        data = read_day_data(job, first_history, model.config.inputs, n_rows, CPU, day)
        _, _, queries = next_day(data.timelines, day)
        stages = rankings(model, data.timelines, queries, spec, CPU, data.model_inputs)
        assert data.baseline_inputs.features is not None
        orders = {
            "generator order (stage 1)": stages["generator"],
            "ranker order (stage 2, served)": final_stage(stages),
        }
        for name, baseline in job.baselines.scorers(data.baseline_inputs.features).items():
            popular = rankings(baseline, data.timelines, queries, spec, CPU, data.baseline_inputs)
            orders[name] = popular["generator"]
        if model.config.prior_weight:  # the served order without its popularity prior
            without = _rankings_with(model, {"prior_weight": 0.0}, data, queries, spec)
            orders["ranker order, prior weight 0"] = final_stage(without)
        for other in USER_VECTORS:
            if other != model.config.user_vector:
                elsewhere = _rankings_with(model, {"user_vector": other}, data, queries, spec)
                orders[f"generator order, {other} vector"] = elsewhere["generator"]
                orders[f"ranker order, {other} vector"] = final_stage(elsewhere)
        for name, top in orders.items():
            metrics = per_query_metrics(
                top, queries.relevant_offsets, queries.relevant_items, (10, 50, 200), (10,)
            )
            for metric in METRICS:
                per_query.setdefault(name, {}).setdefault(metric, []).append(metrics[metric])
        print(f"{day}: {len(queries)} queries", flush=True)

    print(f"\n{'order':34} " + " ".join(f"{m:>10}" for m in METRICS))
    for name, by_metric in per_query.items():
        means = [float(np.concatenate(by_metric[m]).mean()) for m in METRICS]
        print(f"{name:34} " + " ".join(f"{v:10.4f}" for v in means))
    if args.per_day:
        for metric in ("ndcg@10", "recall@50"):
            header = f"{metric} per day"
            print(f"\n{header:34} " + " ".join(f"{d:%m-%d}" for d in days))
            for name, by_metric in per_query.items():
                means = [float(day_values.mean()) for day_values in by_metric[metric]]
                print(f"{name:34} " + " ".join(f"{v:.3f}" for v in means))


if __name__ == "__main__":
    main()
