"""``grank train`` / ``grank evaluate``: daily (re)training and the recall gate before publishing.

Day semantics (docs/model.md): the model of date D is trained on the days before D and
tested on D (next-day protocol), so the gate always judges it on data it never saw.
"""

from __future__ import annotations

import subprocess
from datetime import date
from typing import TYPE_CHECKING

import click

from grank.cli.options import DATE
from grank.config import REPO_ROOT, Settings

if TYPE_CHECKING:
    from training.evaluate import EvalSpec
    from training.train import DailyJob


def _git_commit() -> str:
    """The checkout's commit for the manifest ('unknown' outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def eval_spec(settings: Settings) -> EvalSpec:
    from training.evaluate import EvalSpec

    return EvalSpec(
        short_len=settings.features.short_seq_len,
        long_len=settings.features.long_seq_len,
        k1=settings.train.k1,
        k2=settings.train.k2,
    )


def daily_job(settings: Settings, day: date, from_scratch: bool, with_dssm: bool) -> DailyJob:
    """Turn Settings into the plain values the training layer takes."""
    from features.lake import landed_days
    from training.data import catalogue_max_id
    from training.losses import LossWeights
    from training.model import GRankConfig
    from training.train import DailyJob, FitConfig

    t = settings.train
    fit = FitConfig(
        lr=t.lr,
        weight_decay=t.weight_decay,
        batch_size=t.batch_size,
        max_epochs=t.max_epochs,
        patience=t.patience,
        plateau_lr_factor=t.plateau_lr_factor,
        grad_clip=t.grad_clip,
        stride=settings.features.short_seq_len,
        seed=t.seed,
        max_seconds=t.max_minutes * 60 or None,
    )
    return DailyJob(
        features_dir=settings.features_dir,
        models_dir=settings.models_dir,
        test_day=day,
        catalogue_max_id=catalogue_max_id(settings.lake_dir),
        landed_days=frozenset(landed_days(settings.lake_dir)),
        model=GRankConfig(
            n_item_rows=2,
            dim=t.dim,
            n_layers=t.n_layers,
            n_heads=t.n_heads,
            short_seq_len=settings.features.short_seq_len,
            long_seq_len=settings.features.long_seq_len,
            dropout=t.dropout,
            use_aux=t.use_aux,
            use_ranker=t.use_ranker,
            ranker_residual=t.ranker_residual,
        ),
        weights=LossWeights(
            ntp=t.lambda_ntp,
            sa=t.lambda_sa,
            ca=t.lambda_ca,
            temperature=t.temperature,
            ntp_negatives=t.ntp_negatives,
            logq=t.logq_correction,
            candidates=t.candidates_per_row,
            hard_negatives=t.ranker_hard_negatives,
            hard_pool=t.k1,
        ),
        fit=fit,
        finetune=FitConfig(
            **{
                **fit.__dict__,
                "lr": t.finetune_lr,
                "max_epochs": t.finetune_max_epochs,
                "max_seconds": t.finetune_max_minutes * 60 or None,
            }
        ),
        spec=eval_spec(settings),
        train_window_days=t.train_window_days,
        from_scratch=from_scratch,
        with_dssm=with_dssm,
        dssm_lr=t.dssm_lr,
        git_commit=_git_commit(),
    )


def _print_table(results: dict[str, dict[str, dict[str, float]]]) -> None:
    click.echo(f"{'model':12} {'stage':10} {'R@10':>7} {'R@50':>7} {'R@200':>7} {'N@10':>7}")
    for name, metrics in results.items():
        for stage in ("generator", "rank"):
            row = metrics.get(f"{stage}/filtered")
            if row is not None:
                cells = [row.get(k) for k in ("recall@10", "recall@50", "recall@200", "ndcg@10")]
                text = " ".join(f"{v:7.4f}" if v is not None else f"{'-':>7}" for v in cells)
                click.echo(f"{name:12} {stage:10} {text}")


@click.command()
@click.option("--date", "day", type=DATE, required=True, help="Test day D: trains on days < D.")
@click.option("--from-scratch", is_flag=True, help="Ignore the published model (no warm start).")
@click.option("--with-dssm", is_flag=True, help="Also train the two-tower baseline.")
@click.pass_obj
def train(settings: Settings, day: date, from_scratch: bool, with_dssm: bool) -> None:
    """Train GRank (warm start from the published model) and checkpoint it for day D."""
    from training.train import checkpoint_dir, pick_device, train_daily

    manifest = train_daily(daily_job(settings, day, from_scratch, with_dssm), pick_device())
    origin = (
        f"warm start from {manifest['warm_start_from']}"
        if manifest["warm_start_from"]
        else ("from scratch")
    )
    click.echo(
        f"trained {origin} on {manifest['data_first_day']}..{manifest['data_last_day']} "
        f"({manifest['n_train_events']:,} events, {manifest['train_seconds']}s, "
        f"{manifest['stop_reason']}); next-day test on {day} (seen items filtered):"
    )
    _print_table(manifest["metrics"])
    click.echo(f"checkpoint: {checkpoint_dir(settings.models_dir, day)}")


@click.command()
@click.option("--date", "day", type=DATE, required=True, help="Test day D of the model to judge.")
@click.pass_obj
def evaluate(settings: Settings, day: date) -> None:
    """Evaluate the model of day D vs the published one; publish it only if the gate passes."""
    import json

    from common.errors import UserFacingError
    from features.lake import landed_days
    from training.evaluate import evaluate_day
    from training.train import pick_device

    ok, reason, folder = evaluate_day(
        settings.features_dir,
        settings.models_dir,
        day,
        eval_spec(settings),
        settings.train.gate_metric,
        settings.train.gate_tolerance,
        pick_device(),
        frozenset(landed_days(settings.lake_dir)),
    )
    _print_table(json.loads((folder / "metrics.json").read_text())["results"])
    click.echo(f"metrics: {folder / 'metrics.json'}, chart: {folder / 'chart.png'}")
    if not ok:
        raise UserFacingError(f"gate refused the model of {day}: {reason}")
    click.echo(f"published: {reason}")
