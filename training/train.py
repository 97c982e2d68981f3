"""The training loop: seeded, early-stopped on validation recall, NaN-safe, CPU or CUDA.

One loop trains GRank (any ablation) and the DSSM baseline; what differs is the
per-batch loss. Each epoch re-cuts the windows (new random phase), trains, evaluates
the validation queries and keeps the best weights in memory; ``on_improve`` lets the
caller persist a checkpoint at each improvement, so a later failure (NaN loss) leaves
the last good checkpoint on disk.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from common.errors import UserFacingError
from training.baselines import Popularity, TwoTower
from training.checkpoint import load_checkpoint, save_checkpoint
from training.data import (
    Queries,
    Timelines,
    Windows,
    item_counts,
    make_windows,
    next_day,
    partition_days,
    read_timelines,
)
from training.evaluate import EvalSpec, Scorer, evaluate, published_before
from training.losses import LossWeights, grank_batch_loss, two_tower_batch_loss
from training.model import GRank, GRankConfig

BatchLoss = Callable[
    [nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    tuple[torch.Tensor, dict[str, float]],
]


@dataclass(frozen=True)
class FitConfig:
    """Optimisation knobs (from TrainSettings; docs/model.md)."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 256
    max_epochs: int = 20
    patience: int = 2
    plateau_lr_factor: float = 1.0  # lr x this after an epoch without validation gain; 1 = off
    grad_clip: float = 10.0
    stride: int = 64
    seed: int = 42
    val_metric: str = "recall@10"
    max_seconds: float | None = None  # wall-clock budget; the epoch in progress ends early
    progress: bool = True


@dataclass
class FitResult:
    """What happened: per-epoch history, best epoch and its validation score."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = -1.0
    seconds: float = 0.0
    stop_reason: str = ""


def seed_everything(seed: int) -> None:
    """Same seed, same data, same device → same weights (CPU kernels are deterministic)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    """CUDA when present, else CPU: one code path for both."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _batches(windows: Windows, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(len(windows))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def fit(
    model: nn.Module,
    batch_loss: BatchLoss,
    timelines: Timelines,
    train_end: np.ndarray,
    validation: Queries,
    spec: EvalSpec,
    config: FitConfig,
    device: torch.device,
    on_improve: Callable[[int, float], None] | None = None,
) -> FitResult:
    """Train ``model`` in place; on return it holds the best validation weights.

    Raises UserFacingError on a non-finite loss after restoring the best weights
    (whatever ``on_improve`` saved stays the last good checkpoint).
    """
    seed_everything(config.seed)
    rng = np.random.default_rng(config.seed)
    model.to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    result = FitResult()
    best_state = copy.deepcopy(model.state_dict())
    started = time.perf_counter()
    stale = 0
    for epoch in range(1, config.max_epochs + 1):
        windows = make_windows(
            timelines, train_end, spec.short_len, spec.long_len, config.stride, rng
        )
        model.train()
        total, steps, examples = 0.0, 0, 0
        epoch_start = time.perf_counter()
        bar = tqdm(
            _batches(windows, config.batch_size, rng),
            desc=f"epoch {epoch}",
            disable=not config.progress,
            leave=False,
        )
        for rows in bar:
            if (
                config.max_seconds is not None
                and time.perf_counter() - started > config.max_seconds
            ):
                result.stop_reason = f"time budget of {config.max_seconds:.0f}s reached"
                break
            tensors = [
                torch.as_tensor(a[rows], device=device)
                for a in (windows.short, windows.long, windows.labels, windows.targets)
            ]
            loss, parts = batch_loss(model, *tensors)
            if not math.isfinite(float(loss.detach())):
                model.load_state_dict(best_state)
                result.stop_reason = f"non-finite loss at epoch {epoch} step {steps + 1}"
                raise UserFacingError(
                    f"training stopped: {result.stop_reason}; kept the last good weights "
                    f"(epoch {result.best_epoch}); lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            total += float(loss.detach())
            steps += 1
            examples += len(rows)
            rate = examples / max(time.perf_counter() - epoch_start, 1e-9)
            bar.set_postfix(
                loss=f"{total / steps:.4f}",
                ex_per_s=f"{rate:.0f}",
                **{k: f"{v:.3f}" for k, v in parts.items()},
            )
        if steps == 0:  # the budget ran out before this epoch trained: nothing to evaluate
            break
        scorer: Scorer = model  # type: ignore[assignment]
        metrics = evaluate(scorer, timelines, validation, spec, device, with_rank=False)
        score = metrics["generator/filtered"][config.val_metric]
        result.history.append(
            {
                "epoch": epoch,
                "loss": total / steps,
                "val_" + config.val_metric: score,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - epoch_start,
            }
        )
        if config.progress:
            tqdm.write(
                f"epoch {epoch}: loss {total / steps:.4f} "
                f"val {config.val_metric} {score:.4f} ({time.perf_counter() - epoch_start:.0f}s)"
            )
        if score > result.best_score:
            result.best_score, result.best_epoch, stale = score, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
            if on_improve is not None:
                on_improve(epoch, score)
        else:
            stale += 1
            for group in optimizer.param_groups:  # smaller steps to settle into the optimum
                group["lr"] *= config.plateau_lr_factor
            if stale >= config.patience:
                result.stop_reason = f"no validation gain for {config.patience} epochs"
        if result.stop_reason:
            break
    else:
        result.stop_reason = f"reached max_epochs {config.max_epochs}"
    model.load_state_dict(best_state)
    result.seconds = time.perf_counter() - started
    return result


@dataclass(frozen=True)
class DailyJob:
    """Everything ``grank train --date D`` needs, as plain values (the CLI fills it)."""

    features_dir: Path
    models_dir: Path
    test_day: date
    catalogue_max_id: int  # the item table covers the whole catalogue, rated or not
    landed_days: frozenset[date]  # raw days of the lake: a day missing here had no events
    model: GRankConfig  # architecture for a fresh model; n_item_rows is taken from the data
    weights: LossWeights
    fit: FitConfig
    finetune: FitConfig
    spec: EvalSpec
    train_window_days: int = 0
    from_scratch: bool = False
    with_dssm: bool = False
    dssm_lr: float = 3e-3
    git_commit: str = "unknown"


def checkpoint_dir(models_dir: Path, day: date) -> Path:
    """``models/checkpoints/<D>``: the model whose held-out (test) day is ``D``."""
    return models_dir / "checkpoints" / day.isoformat()


def _warm_start(job: DailyJob) -> tuple[GRank, dict[str, Any]] | None:
    """The model to fine-tune for ``test_day``, or None to train from scratch.

    Normally the published model (trained on the days before the previous test day).
    When it already covers ``test_day`` (a re-run of D after D was published, or a
    backfill of an older day), follow its ``warm_start_from`` lineage back to the first
    model tested before D: the same base the original run of D used, so a re-run
    reproduces it. A lineage that starts from scratch means D started from scratch too.
    """
    name = None if job.from_scratch else published_before(job.models_dir, job.test_day)
    return None if name is None else load_checkpoint(job.models_dir / "checkpoints" / name)


def train_daily(job: DailyJob, device: torch.device) -> dict[str, Any]:
    """Train (fresh or warm) on the days before ``test_day``; test on ``test_day``; checkpoint.

    Warm start: fine-tune the published model on the days after its last training day
    (the item table grows for new ids). From scratch: ``train_window_days`` before the
    test day (0 = every available day). Returns the manifest written.
    """
    if job.test_day not in partition_days(job.features_dir):
        raise UserFacingError(
            f"no training_examples for the test day {job.test_day}: build its features first"
        )
    warm = _warm_start(job)
    if warm is not None:
        first = date.fromisoformat(warm[1]["data_last_day"]) + timedelta(days=1)
    elif job.train_window_days > 0:
        first = job.test_day - timedelta(days=job.train_window_days)
    else:
        first = date.min
    timelines = read_timelines(job.features_dir, first, job.test_day, job.landed_days)
    if timelines.first_day >= job.test_day:
        raise UserFacingError(f"no training days before the test day {job.test_day}")
    train_end, validation, test = next_day(timelines, job.test_day)
    n_rows = max(timelines.max_item_id, job.catalogue_max_id) + 1
    seed_everything(
        job.fit.seed
    )  # new weights (fresh model, grown rows) must not depend on history
    if warm is not None:
        model, base = warm
        model.grow_items(n_rows)
        fit_config = job.finetune
    else:
        model, base = GRank(replace(job.model, n_item_rows=n_rows)), {}
        fit_config = job.fit
    n_rows = model.config.n_item_rows
    counts = item_counts(timelines, train_end, n_rows)
    if counts.sum() == 0:
        raise UserFacingError(f"no training events in {timelines.first_day}..{job.test_day}")
    log_q = torch.log(torch.as_tensor(counts, dtype=torch.float32).clamp(min=1) / counts.sum())
    log_q = log_q.to(device)
    target = checkpoint_dir(job.models_dir, job.test_day)
    manifest: dict[str, Any] = {
        "test_day": job.test_day.isoformat(),
        "data_first_day": (base.get("data_first_day") or timelines.first_day.isoformat()),
        "data_last_day": (job.test_day - timedelta(days=1)).isoformat(),
        "warm_start_from": base.get("test_day"),
        "git_commit": job.git_commit,
        "seed": fit_config.seed,
        "loss_weights": asdict(job.weights),
        "fit": {k: v for k, v in asdict(fit_config).items() if k != "progress"},
    }

    def save_best(epoch: int, score: float) -> None:
        save_checkpoint(model, target, {**manifest, "best_epoch": epoch, "val_score": score})

    result = fit(
        model,
        grank_batch_loss(job.weights, log_q),
        timelines,
        train_end,
        validation,
        job.spec,
        fit_config,
        device,
        on_improve=save_best,
    )
    results = {"grank": evaluate(model, timelines, test, job.spec, device)}
    results["popularity"] = evaluate(
        Popularity(counts).to(device), timelines, test, job.spec, device
    )
    if job.with_dssm:
        tower = TwoTower(n_rows, job.model.dim, dropout=0.1)
        dssm_config = replace(fit_config, lr=job.dssm_lr, stride=1, batch_size=1024)
        short_only = replace(job.spec, long_len=0)  # one window per event: no long copies
        fit(
            tower,
            two_tower_batch_loss(job.weights, log_q),
            timelines,
            train_end,
            validation,
            short_only,
            dssm_config,
            device,
        )
        results["dssm"] = evaluate(tower, timelines, test, short_only, device)
    # Durations are returned, not stored: the checkpoint (and the snapshot that carries it)
    # must be the same bytes when a day is re-run.
    manifest.update(
        best_epoch=result.best_epoch,
        val_score=result.best_score,
        stop_reason=result.stop_reason,
        history=[{k: v for k, v in h.items() if k != "seconds"} for h in result.history],
        n_train_events=int(counts.sum()),
        metrics=results,
    )
    return {**save_checkpoint(model, target, manifest), "train_seconds": round(result.seconds, 1)}
