"""``grank train`` / ``grank evaluate`` / ``grank model``: the daily model and its registry.

Day semantics (docs/model.md): the model of date D is trained on the days before D and
tested on D (next-day protocol), so the gate always judges it on data it never saw.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date
from typing import TYPE_CHECKING

import click

from common.errors import UserFacingError
from grank.cli.options import DATE
from grank.config import REPO_ROOT, Settings

if TYPE_CHECKING:
    from training.daily import DailyJob
    from training.distributed import DataParallel
    from training.offline import OfflineJob

# `grank evaluate` exits with this when the gate refused the candidate: not an error of
# the run (the DAG marks the task skipped and serving keeps what it has), but not a pass.
EXIT_REFUSED = 99
# what `offline-eval` prints per target and stage (its JSON holds every metric)
OFFLINE_SHOWN = (("N@10", "ndcg@10"), ("HR@10", "recall@10"), ("R@50", "recall@50"))


def _git_commit() -> str:
    """The checkout's commit for the manifest ('unknown' outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def daily_job(
    settings: Settings, day: date, from_scratch: bool = False, parallel: DataParallel | None = None
) -> DailyJob:
    """The daily run of ``day`` as the training layer takes it (grank/config.py composes it)."""
    import numpy as np
    import pyarrow.parquet as pq

    from features.lake import landed_days
    from grank.dataset import lake_config, model_inputs
    from training.baselines import Baselines
    from training.daily import DailyJob
    from training.distributed import SINGLE
    from training.inputs import select_groups

    t = settings.train
    bf16 = _use_bf16(t.bf16)
    items = settings.lake_layout().items_file
    catalogue = (
        pq.read_table(items, columns=["item_id"])["item_id"].to_numpy()
        if items.is_file()
        else np.zeros(0, dtype=np.int64)
    )
    inputs = select_groups(model_inputs(settings, lake_config(settings)), t.feature_groups)
    return DailyJob(
        features_dir=settings.features_dir,
        registry=settings.model_registry(),
        test_day=day,
        catalogue=catalogue,
        landed_days=frozenset(landed_days(settings.lake_dir)),
        model=settings.grank_config(inputs),
        weights=settings.loss_weights(),
        fit=settings.fit_config(bf16),
        finetune=settings.finetune_config(bf16),
        spec=settings.eval_config(),
        gate=t.gate,
        baselines=Baselines(
            {
                "popularity_all_time": "pop_total",
                t.recent_popularity_baseline: t.recent_popularity_column,
            }
        ),
        val_quantile=t.val_quantile,
        val_targets=t.val_targets,
        feature_ttl_days=settings.features.daily_ttl_days,
        train_window_days=t.train_window_days,
        from_scratch=from_scratch,
        git_commit=_git_commit(),
        parallel=parallel or SINGLE,
    )


def _use_bf16(mode: str) -> bool:
    """Resolve ``train.bf16``: "auto" means where bf16 runs natively (CUDA, or the CPU)."""
    if mode != "auto":
        return mode == "on"
    import torch

    from common.hardware import cpu_multiplies_bf16

    return torch.cuda.is_available() or cpu_multiplies_bf16()


def print_summary(summary: dict[str, dict[str, float]]) -> None:
    """One line per model: the metrics the gate records (seen items filtered)."""
    click.echo(f"{'model':24} {'R@10':>7} {'R@50':>7} {'N@10':>7}")
    for name, row in summary.items():
        cells = [row.get(k) for k in ("recall@10", "recall@50", "ndcg@10")]
        text = " ".join(f"{v:7.4f}" if v is not None else f"{'-':>7}" for v in cells)
        click.echo(f"{name:24} {text}")


@click.command()
@click.option("--date", "day", type=DATE, required=True, help="Test day D: trains on days < D.")
@click.option("--from-scratch", is_flag=True, help="Ignore the published model (no warm start).")
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=None,
    help="Data-parallel training processes on this machine (default: train.processes).",
)
@click.pass_obj
def train(settings: Settings, day: date, from_scratch: bool, processes: int | None) -> None:
    """Train the candidate model of day D (warm start from the published one) and register it.

    With more than one process, starts them with torchrun on this machine; started by
    torchrun (here or across machines, docs/model.md), joins its process group.
    """
    from training.daily import train_day
    from training.distributed import device_for, join_from_env, launched_by_torchrun, leave
    from training.train import pick_device

    if launched_by_torchrun():
        parallel = join_from_env()
        try:
            manifest = train_day(
                daily_job(settings, day, from_scratch, parallel), device_for(parallel)
            )
        finally:
            leave(parallel)
    elif (processes or settings.train.processes) > 1:
        _launch_workers(settings, processes or settings.train.processes, day, from_scratch)
        return
    else:
        manifest = train_day(daily_job(settings, day, from_scratch), pick_device())
    if manifest is None:  # a rank other than 0: rank 0 reports
        return
    origin = (
        f"warm start from {manifest['warm_start_from']}"
        if manifest["warm_start_from"]
        else "from scratch (bootstrap)"
    )
    kept = (
        ""
        if manifest["kept_epoch"] == manifest["best_epoch"]
        else f"; weights of the last epoch, {manifest['kept_epoch']}"
    )
    click.echo(
        f"trained {origin} on {manifest['data_first_day']}..{manifest['data_last_day']} "
        f"({manifest['n_train_events']:,} events, {manifest['train_seconds']}s, "
        f"{manifest['stop_reason']}; best validation {manifest['val_score']:.4f}"
        f" at epoch {manifest['best_epoch']}{kept})"
    )
    folder = settings.model_registry().checkpoint_path(manifest["checkpoint_id"])
    click.echo(f"candidate of {day}: {folder}")


def _launch_workers(settings: Settings, processes: int, day: date, from_scratch: bool) -> None:
    """Run ``grank train`` in ``processes`` workers on this machine under torchrun.

    ``--standalone`` rendezvous on a free local port (concurrent runs do not collide); the
    workers read the same settings from the inherited environment, rank 0 prints the
    summary. Each worker gets an equal share of the cores unless OMP_NUM_THREADS is set.
    """
    from training.distributed import (
        DataParallel,
        default_threads,
        per_rank_batch,
        torchrun_command,
    )

    per_rank_batch(settings.train.batch_size, DataParallel(world_size=processes))  # fail early
    command = torchrun_command(
        processes,
        *("-m", "grank", "train", "--date", day.isoformat()),
        *(["--from-scratch"] if from_scratch else []),
    )
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(default_threads(processes)))
    code = subprocess.run(command, env=env, check=False).returncode
    if code != 0:
        raise UserFacingError(
            f"data-parallel training failed: a worker exited with status {code}"
            " (its error is printed above); nothing was registered"
        )


@click.command()
@click.option("--date", "day", type=DATE, required=True, help="Test day D of the model to judge.")
@click.pass_obj
def evaluate(settings: Settings, day: date) -> None:
    """Judge the candidate of day D; PUBLISHED moves only if it clears the gate.

    Exit 0: published (or PUBLISHED already names a newer day's model); exit 99: refused
    (serving keeps what it has); exit 1: the evaluation itself failed.
    """
    from training.daily import evaluate_day
    from training.train import pick_device

    outcome = evaluate_day(daily_job(settings, day), pick_device())
    print_summary(outcome.summary)
    click.echo(f"report: {outcome.folder / 'metrics.json'}, chart: {outcome.folder / 'chart.png'}")
    if not outcome.verdict.publishable:
        click.echo(f"refused: {outcome.verdict.reason}")
        sys.exit(EXIT_REFUSED)
    click.echo(f"gate passed: {outcome.verdict.reason}")
    click.echo(outcome.note)


@click.group()
def model() -> None:
    """The model registry: list checkpoints, promote or roll back PUBLISHED (logged)."""


@model.command("list")
@click.pass_obj
def list_models(settings: Settings) -> None:
    """Checkpoints, oldest test day first (* marks PUBLISHED), then the pointer's history."""
    reg = settings.model_registry()
    published = reg.published()
    ids = reg.checkpoint_ids()
    if not ids:
        click.echo(f"no checkpoints in {reg.root}")
    for checkpoint_id in ids:
        manifest = reg.manifest(checkpoint_id)
        click.echo(
            f"{'*' if checkpoint_id == published else ' '} {checkpoint_id}"
            f"  data {manifest.get('data_first_day')}..{manifest.get('data_last_day')}"
            f"  warm start from {manifest.get('warm_start_from') or '-'}"
        )
    for move in reg.history():
        click.echo(
            f"  {move.at} {move.action}: {move.previous} -> {move.checkpoint} ({move.reason})"
        )


@model.command()
@click.argument("checkpoint_id")
@click.option("--reason", required=True, help="Why (kept in models/published.log).")
@click.pass_obj
def promote(settings: Settings, checkpoint_id: str, reason: str) -> None:
    """Point PUBLISHED at CHECKPOINT_ID, whatever its day; then publish a snapshot from it."""
    previous = settings.model_registry().promote(checkpoint_id, "promote", reason)
    click.echo(f"PUBLISHED: {previous} -> {checkpoint_id}")
    click.echo(
        "serving follows after `grank embeddings refresh` + `grank snapshot publish --force`"
    )


@model.command()
@click.option("--to", "to", help="Checkpoint id (default: what PUBLISHED named before).")
@click.option("--reason", required=True, help="Why (kept in models/published.log).")
@click.pass_obj
def rollback(settings: Settings, to: str | None, reason: str) -> None:
    """Move PUBLISHED back, and CURRENT to the newest snapshot of that model if one exists."""
    from common.errors import UserFacingError
    from serving.snapshots import list_snapshots, point_current

    reg = settings.model_registry()
    target = to or reg.previously_published()
    if target is None:
        raise UserFacingError("nothing to roll back to: PUBLISHED has no earlier value")
    previous = reg.promote(target, "rollback", reason)
    click.echo(f"PUBLISHED: {previous} -> {target}")
    snapshots = [
        s
        for s in list_snapshots(settings.snapshots_dir)
        if s.manifest.get("checkpoint_id") == target
    ]
    if snapshots:
        version = point_current(settings.snapshots_dir, snapshots[-1].version)
        click.echo(f"CURRENT -> {version}")
    else:
        click.echo(
            "no snapshot holds it yet: run `grank embeddings refresh` +"
            " `grank snapshot publish --force`"
        )


def offline_job(
    settings: Settings, quantile: float, minutes: float | None, next_day_windows: bool
) -> OfflineJob:
    """`grank offline-eval`'s job: the configured model and its training, split at the
    ``quantile`` of event times, each variant's fit budgeted to ``minutes`` (None: none)."""
    from dataclasses import replace

    from grank.dataset import lake_config, model_inputs
    from training.offline import OfflineJob

    # the setting itself, so the fit and the catch-up both follow it
    train = settings.train.model_copy(update={"next_day_windows": next_day_windows})
    settings = settings.model_copy(update={"train": train})
    job = daily_job(settings, date.max)
    return OfflineJob(
        features_dir=settings.features_dir,
        landed_days=job.landed_days,
        model=job.model,
        feature_groups=model_inputs(settings, lake_config(settings)),
        weights=job.weights,
        fit=replace(job.fit, max_seconds=minutes * 60 if minutes else None),
        catchup=job.finetune,
        catchup_epochs=settings.train.catchup_epochs,
        spec=job.spec,
        baselines=job.baselines,
        quantile=quantile,
        val_quantile=settings.train.val_quantile,
        val_targets=settings.train.val_targets,
        feature_ttl_days=settings.features.daily_ttl_days,
    )


@click.command("offline-eval")
@click.option(
    "--protocol",
    type=click.Choice(["gts", "loo"]),
    default="gts",
    show_default=True,
    help="gts: global temporal split (matches serving); loo: leave-one-out.",
)
@click.option(
    "--variants",
    default="grank,generator_only,dssm",
    show_default=True,
    help="Comma list of: grank, generator_only, dssm, and the feature ablation"
    " sequence_only, behaviors, user_profile, item_features, all_features; empty: the"
    " popularity baselines alone.",
)
@click.option(
    "--quantile",
    type=float,
    default=0.9,
    show_default=True,
    help="T_test = this quantile of all event times (gts).",
)
@click.option("--minutes", type=float, help="Training budget per variant (default: none).")
@click.option(
    "--next-day-windows/--next-item-windows",
    default=False,
    show_default=True,
    help="What the user vector learns: each window's next item, what these protocols'"
    " targets ask (each sees every earlier event; read where validation chooses), or the"
    " day after the history, at the query token, as the daily pipeline trains it"
    " (train.next_day_windows).",
)
@click.pass_obj
def offline_eval(
    settings: Settings,
    protocol: str,
    variants: str,
    quantile: float,
    minutes: float | None,
    next_day_windows: bool,
) -> None:
    """Train and score model variants next to the popularity baselines (docs/model.md).

    Reads every built training_examples partition (build the features of the last day
    first); writes one JSON per variant under offline/<protocol>/ and prints the table.
    The query token learns the protocol's task by default, not serving's: these tables
    measure the model on the literature's protocols; the daily gate measures what serves.
    """
    import json

    from common.atomic import atomic_write_text
    from common.errors import UserFacingError
    from training.offline import VARIANTS, load, run_gts, run_loo
    from training.train import pick_device

    chosen = [v.strip() for v in variants.split(",") if v.strip()]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        raise UserFacingError(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    offline = offline_job(settings, quantile, minutes, next_day_windows)
    out = settings.offline_dir / protocol
    device = pick_device()
    data = load(offline, device)
    click.echo(
        f"{protocol}: {data.timelines.n_users:,} users, {len(data.timelines.items):,} events,"
        f" {int(data.servable.sum()):,} items after the {offline.k_core}-core preprocessing;"
        f" T_test {data.split.t_test}, {len(data.split.test_last):,} test users"
    )

    def report(name: str, result: dict[str, object]) -> None:
        atomic_write_text(out / f"{name}.json", json.dumps(result, indent=2, sort_keys=True))
        rows = result["results"]
        assert isinstance(rows, dict)
        for target, stages in rows.items():
            for stage, metrics in stages.items():
                shown = "  ".join(
                    f"{label} {_with_interval(metrics, metric)}" for label, metric in OFFLINE_SHOWN
                )
                click.echo(f"{name:24} {target:26} {stage:20} {shown}")

    run = run_gts if protocol == "gts" else run_loo
    run(offline, data, chosen, device, report)
    click.echo(f"results: {out}")


def _with_interval(metrics: dict[str, float], metric: str) -> str:
    """``metric``'s mean and its 95% interval over users, as offline-eval prints them."""
    return (
        f"{metrics[metric]:.4f} [{metrics[f'{metric}.low']:.4f}, {metrics[f'{metric}.high']:.4f}]"
    )


@model.command()
@click.option("--date", "day", type=DATE, required=True, help="Last materialized day D.")
@click.option("--users", type=int, default=50, show_default=True, help="Users to sample.")
@click.option("--items", type=int, default=200, show_default=True, help="Items to sample.")
@click.pass_obj
def skew(settings: Settings, day: date, users: int, items: int) -> None:
    """Check that serving builds the inputs training saw: online store vs feature tables.

    For sampled users, the inputs of a prediction on D+1 built from the Feast online
    store (after `grank features materialize --date D`) must equal those training reads
    from the tables; exit 1 listing every difference otherwise. Uses the published
    model's inputs (the configured ones before any model is published).
    """
    from dataclasses import replace

    from common.errors import UserFacingError
    from grank.skew import check_skew
    from training.checkpoint import read_manifest
    from training.model import GRankConfig

    reg = settings.model_registry()
    published = reg.published()
    if published is not None:
        config = GRankConfig.from_dict(read_manifest(reg.checkpoint_path(published))["config"])
    else:
        job = daily_job(settings, day)
        config = replace(job.model, n_item_rows=int(job.catalogue.max(initial=1)) + 1)
    report = check_skew(
        settings.features_dir,
        settings.feast_dir,
        config,
        day,
        users,
        items,
        settings.features.daily_ttl_days,
        seed=settings.train.seed,
    )
    for line in report.mismatches[:20]:
        click.echo(f"skew: {line}")
    if report.mismatches:
        raise UserFacingError(
            f"{len(report.mismatches)} online/offline differences for {day}"
            f" ({report.users} users, {report.items} items compared)"
        )
    click.echo(
        f"no skew for {day}: {report.users} users and {report.items} items, inputs equal"
        " online and offline"
    )
