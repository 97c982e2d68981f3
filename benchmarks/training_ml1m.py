"""ML-1M leave-last-out benchmark: GRank vs popularity vs DSSM, and the paper's ablation.

Every model trains on the same windows under the same wall-clock budget and is evaluated
by full ranking over all items (seen filtered and unfiltered). Prints one JSON line per
model and a table; docs/benchmarks.md records the numbers with the command, e.g.

    .venv/bin/python benchmarks/training_ml1m.py --features-dir data/features --minutes 8
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

from training.baselines import Popularity, TwoTower
from training.data import item_counts, leave_last_out, read_timelines
from training.evaluate import EvalSpec, evaluate
from training.losses import LossWeights, grank_batch_loss, two_tower_batch_loss
from training.model import GRank, GRankConfig
from training.train import FitConfig, fit, pick_device, seed_everything

ABLATIONS = {
    "generator_only": (False, False),
    "gen+aux": (True, False),
    "gen+ranker": (False, True),
    "grank_full": (True, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--features-dir", type=Path, default=Path("data/features"))
    parser.add_argument("--minutes", type=float, default=8.0, help="training budget per model")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ntp-negatives", choices=["full", "in_batch"], default="full")
    parser.add_argument(
        "--variants", default="pop,dssm,generator_only,gen+aux,gen+ranker,grank_full"
    )
    parser.add_argument("--dssm-sweep", default="0.001:64,0.003:64,0.003:128", help="lr:dim,...")
    parser.add_argument("--dssm-minutes", type=float, default=3.0, help="budget per sweep point")
    parser.add_argument("--hard-negatives", type=int, default=0, help="L_CA negatives per row")
    parser.add_argument(
        "--lambdas", default="1.0,0.1,0.5", help="λ0,λ1,λ2 of NTP,SA,CA (as train.lambda_*)"
    )
    parser.add_argument("--max-epochs", type=int, default=200, help="stop after this many epochs")
    parser.add_argument("--patience", type=int, default=3, help="epochs without validation gain")
    parser.add_argument(
        "--plateau-lr-factor", type=float, default=1.0, help="lr x this after a stale epoch"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--ranker-residual",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Ranker score = Generator score + correction (docs/model.md)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device()
    started = time.perf_counter()
    timelines = read_timelines(args.features_dir, None, date.max)
    train_end, validation, test = leave_last_out(timelines)
    n_rows = timelines.max_item_id + 1
    counts = item_counts(timelines, train_end, n_rows)
    log_q = torch.log(torch.as_tensor(counts, dtype=torch.float32).clamp(min=1) / counts.sum())
    log_q = log_q.to(device)
    spec = EvalSpec(short_len=64, long_len=200)
    ntp, sa, ca = (float(x) for x in args.lambdas.split(","))
    weights = LossWeights(
        ntp=ntp,
        sa=sa,
        ca=ca,
        ntp_negatives=args.ntp_negatives,
        hard_negatives=args.hard_negatives,
    )
    budget = args.minutes * 60
    print(
        f"read {len(timelines.items)} events of {timelines.n_users} users "
        f"in {time.perf_counter() - started:.0f}s",
        flush=True,
    )
    results: dict[str, dict[str, object]] = {}
    variants = args.variants.split(",")

    def report(name: str, model: torch.nn.Module, seconds: float, extra: dict[str, object]) -> None:
        metrics = evaluate(model, timelines, test, spec, device)  # type: ignore[arg-type]
        results[name] = {"train_seconds": round(seconds, 1), **extra, "metrics": metrics}
        print(json.dumps({"model": name, **results[name]}), flush=True)

    if "pop" in variants:
        report("popularity", Popularity(counts).to(device), 0.0, {})
    if "dssm" in variants:
        best: tuple[float, str, TwoTower, float] | None = None
        for point in args.dssm_sweep.split(","):
            lr, dim = float(point.split(":")[0]), int(point.split(":")[1])
            seed_everything(42)
            tower = TwoTower(n_rows, dim, dropout=0.1)
            config = FitConfig(
                lr=lr,
                batch_size=1024,
                stride=1,
                max_seconds=args.dssm_minutes * 60,
                max_epochs=50,
                patience=2,
            )
            fitted = fit(
                tower,
                two_tower_batch_loss(weights, log_q),
                timelines,
                train_end,
                validation,
                replace(spec, long_len=0),
                config,
                device,
            )
            print(
                f"dssm lr={lr} dim={dim}: val recall@10 {fitted.best_score:.4f} "
                f"(epoch {fitted.best_epoch}, {fitted.seconds:.0f}s)",
                flush=True,
            )
            if best is None or fitted.best_score > best[0]:
                best = (fitted.best_score, point, tower, fitted.seconds)
        assert best is not None
        report("dssm", best[2], best[3], {"sweep_best": best[1]})
    for name, (use_aux, use_ranker) in ABLATIONS.items():
        if name not in variants:
            continue
        seed_everything(42)
        model = GRank(
            GRankConfig(
                n_item_rows=n_rows,
                dim=args.dim,
                n_layers=args.layers,
                n_heads=2,
                dropout=0.2,
                use_aux=use_aux,
                use_ranker=use_ranker,
                ranker_residual=args.ranker_residual,
            )
        )
        config = FitConfig(
            batch_size=args.batch_size,
            max_seconds=budget,
            max_epochs=args.max_epochs,
            patience=args.patience,
            plateau_lr_factor=args.plateau_lr_factor,
        )
        fitted = fit(
            model,
            grank_batch_loss(weights, log_q),
            timelines,
            train_end,
            validation,
            spec,
            config,
            device,
        )
        report(
            name, model, fitted.seconds, {"epochs": len(fitted.history), "stop": fitted.stop_reason}
        )
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"\npeak RSS {peak_mib:.0f} MiB, total {time.perf_counter() - started:.0f}s, "
        f"device {device}, threads {args.threads}"
    )
    print(f"{'model':16} {'stage':10} {'R@10':>7} {'R@50':>7} {'R@200':>7} {'N@10':>7} {'N@50':>7}")
    for name, result in results.items():
        metrics = result["metrics"]
        assert isinstance(metrics, dict)
        for stage in ("generator", "rank"):
            row = metrics.get(f"{stage}/filtered")
            if row is None:
                continue
            cells = [
                row.get(k, float("nan"))
                for k in ("recall@10", "recall@50", "recall@200", "ndcg@10", "ndcg@50")
            ]
            print(f"{name:16} {stage:10} " + " ".join(f"{v:7.4f}" for v in cells))


if __name__ == "__main__":
    main()
