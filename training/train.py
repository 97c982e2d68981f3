"""The training loop: seeded, early-stopped on a validation metric, NaN-safe, CPU or CUDA.

One loop trains GRank (any ablation) and the DSSM baseline; what differs is the
per-batch loss. Each epoch re-cuts the windows (new random phase) and trains (the epoch
step), then evaluates the validation queries and keeps the best weights in memory (the
validation step); a non-finite loss puts the last good weights back before it raises.

Data parallel (``training/distributed.py``): with several processes each trains on its
share of every global batch under DistributedDataParallel; rank 0 alone scores the
validation and every rank follows its early-stopping decision.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from common.errors import UserFacingError
from training.config import EvalConfig, FitConfig
from training.data import Queries, Timelines, Windows, from_day_start, item_counts, make_windows
from training.distributed import (
    SINGLE,
    DataParallel,
    any_rank,
    from_main,
    mean_over_ranks,
    rank_batches,
    require_same_weights,
    wrap,
)
from training.evaluate import NO_INPUTS, EvalInputs, Scorer, evaluate
from training.losses import BatchLoss, TrainBatch
from training.model import GRank
from training.temporal import TemporalSplit, catch_up_trial


@dataclass
class FitResult:
    """What happened: per-epoch history, best epoch and its validation score, and the
    epoch whose weights the model holds at the end (the best, or the last one trained)."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = -1.0
    kept_epoch: int = 0
    seconds: float = 0.0
    stop_reason: str = ""
    # validation's Generator metric by candidate user-vector readout (empty: none chosen)
    user_vector_scores: dict[str, float] = field(default_factory=dict)
    # validation's served metric by candidate Ranker weight (empty: none was chosen)
    ranker_weight_scores: dict[str, float] = field(default_factory=dict)
    # ...and by candidate weight of the popularity prior, on the chosen Ranker weight
    prior_weight_scores: dict[str, float] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    """Same seed, same data, same device → same weights (CPU kernels are deterministic)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    """CUDA when present, else CPU: one code path for both."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class StepLoss(nn.Module):
    """The model and its per-batch loss as one module, so one forward call computes the loss.

    DistributedDataParallel averages gradients of what runs inside its wrapper's forward:
    the loss calls several methods of the model, so the wrapper must wrap the loss.
    """

    def __init__(self, model: nn.Module, batch_loss: BatchLoss) -> None:
        super().__init__()
        self.model = model
        self.batch_loss = batch_loss

    def forward(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, float]]:
        return self.batch_loss(self.model, batch)


def train_batch(
    timelines: Timelines,
    windows: Windows,
    rows: np.ndarray,
    inputs: EvalInputs,
    device: torch.device,
) -> TrainBatch:
    """The windows at ``rows`` as tensors, with their features as of each target's day."""
    short, long, labels, targets = (
        torch.as_tensor(a[rows], device=device)
        for a in (windows.short, windows.long, windows.labels, windows.targets)
    )
    features = inputs.features
    query = (
        None
        if windows.query_labels is None
        else torch.as_tensor(windows.query_labels[rows], device=device)
    )
    if features is None:
        return TrainBatch(short, long, labels, targets, query_labels=query)
    days = windows.days[rows]
    user = features.user_context(
        windows.long[rows],
        None if windows.long_codes is None else windows.long_codes[rows],
        timelines.user_ids[windows.users[rows]],
        days,
        device,
    )
    return TrainBatch(
        short, long, labels, targets, user, lambda c: features.item_features(days, c), query
    )


def train_epoch(
    step_loss: nn.Module,
    optimizer: torch.optim.Optimizer,
    timelines: Timelines,
    windows: Windows,
    inputs: EvalInputs,
    config: FitConfig,
    rng: np.random.Generator,
    deadline: float | None,
    label: str,
    parallel: DataParallel,
) -> tuple[float, int, str]:
    """One pass over ``windows``: (mean loss, steps, why it stopped early or "").

    ``step_loss`` is a :class:`StepLoss` (under DistributedDataParallel when several
    processes train). A non-finite loss raises (the caller restores the best weights);
    the deadline ends the epoch early, keeping what it trained. The loss reported is the
    mean over the ranks, and both decisions are taken by all ranks at the same step.
    """
    step_loss.train()
    parameters = list(step_loss.parameters())
    total, steps, examples = 0.0, 0, 0
    started = time.perf_counter()
    device = parameters[0].device
    bar = tqdm(
        rank_batches(len(windows), config.batch_size, rng, parallel),
        desc=label,
        disable=not config.progress,
        leave=False,
    )
    for rows in bar:
        late = deadline is not None and time.perf_counter() > deadline
        if any_rank(late, parallel):
            return total / max(steps, 1), steps, f"time budget of {config.max_seconds:.0f}s reached"
        batch = train_batch(timelines, windows, rows, inputs, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            loss, parts = step_loss(batch)
        value = mean_over_ranks(float(loss.detach()), parallel)
        if not math.isfinite(value):
            raise _NonFinite(f"non-finite loss at {label} step {steps + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(parameters, config.grad_clip)
        optimizer.step()
        total += value
        steps += 1
        examples += len(rows) * parallel.world_size
        rate = examples / max(time.perf_counter() - started, 1e-9)
        bar.set_postfix(
            loss=f"{total / steps:.4f}",
            ex_per_s=f"{rate:.0f}",
            **{k: f"{v:.3f}" for k, v in parts.items()},
        )
    return total / max(steps, 1), steps, ""


class _NonFinite(Exception):
    """A training step produced a NaN or infinite loss."""


def fit(
    model: nn.Module,
    batch_loss: BatchLoss,
    timelines: Timelines,
    train_end: np.ndarray,
    validation: Queries,
    spec: EvalConfig,
    config: FitConfig,
    device: torch.device,
    inputs: EvalInputs = NO_INPUTS,
    parallel: DataParallel = SINGLE,
) -> FitResult:
    """Train ``model`` in place; on return it holds the best validation weights.

    Each epoch re-cuts the windows, trains (:meth:`_Fit.epoch_step`), and scores the
    validation queries (:meth:`_Fit.validation_step`); the best weights are kept in
    memory. With ``config.weight_average_decay`` those are the weight average's: it is
    what validation scores, and what the model ends on. A non-finite loss restores them
    and raises a UserFacingError naming the epoch and step. With ``parallel`` active,
    this runs on every rank; the result's scores are rank 0's, broadcast.
    """
    if config.next_day_windows:  # the query token learns, and is judged, as it serves
        validation = from_day_start(timelines, validation)
        if len(validation) == 0:
            raise UserFacingError(
                "no validation user has an event before their target's day: train without"
                " next-day windows (GRANK_TRAIN__NEXT_DAY_WINDOWS=false) or on more history"
            )
    seed_everything(config.seed)
    rng = np.random.default_rng(config.seed)  # the same windows and batches on every rank
    model.to(device)
    step_loss = wrap(StepLoss(model, batch_loss), parallel)
    if parallel.active:  # own dropout masks and hard-negative draws per rank; rank 0 = one process
        torch.manual_seed(config.seed + parallel.rank)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    average = weight_average(model, optimizer, config.weight_average_decay)
    started = time.perf_counter()
    run = _Fit(
        model=model,
        scored=model if average is None else average,
        step_loss=step_loss,
        optimizer=optimizer,
        timelines=timelines,
        train_end=train_end,
        validation=validation,
        spec=spec,
        config=config,
        inputs=inputs,
        parallel=parallel,
        rng=rng,
        deadline=None if config.max_seconds is None else started + config.max_seconds,
        best_state=copy.deepcopy(model.state_dict()),
    )
    for epoch in range(1, config.max_epochs + 1):
        loss, steps = run.epoch_step(epoch)
        if steps == 0:  # the budget ran out before this epoch trained: nothing to evaluate
            break
        run.validation_step(epoch, loss)
        if run.result.stop_reason:
            break
    else:
        run.result.stop_reason = f"reached max_epochs {config.max_epochs}"
    if config.keep_best:
        model.load_state_dict(run.best_state)
    elif average is not None:
        model.load_state_dict(average.state_dict())
    run.result.kept_epoch = run.result.best_epoch if config.keep_best else len(run.result.history)
    if config.keep_best:  # a validation fit to choose weights by also chooses what serves
        result = run.result
        result.user_vector_scores, result.ranker_weight_scores, result.prior_weight_scores = (
            calibrate_served_order(model, timelines, validation, spec, config, inputs, parallel)
        )
    require_same_weights(model, parallel)
    run.result.seconds = time.perf_counter() - started
    return run.result


def weight_average(
    model: nn.Module, optimizer: torch.optim.Optimizer, decay: float
) -> nn.Module | None:
    """A copy of ``model`` that follows its weights' exponential moving average after
    every optimizer step (None when ``decay`` is 0): what validation scores and keeps.

    The average is bias-corrected, as Adam's moments are: after step t it weighs the
    weights after steps 1..t by ``decay ** (t - i)``, normalised, and the untrained
    initial weights not at all. Without that a slow decay (a memory of several epochs)
    would keep a share ``decay ** t`` of random weights for the first thousands of steps,
    which is all a short time budget trains.

    Buffers are not averaged: the model's are constants set before training (the user
    features' ranges), copied once with the model.
    """
    if not decay:
        return None
    average = copy.deepcopy(model).requires_grad_(False)
    averaged: list[torch.Tensor] = list(average.parameters())
    trained: list[torch.Tensor] = list(model.parameters())
    kept = 1.0  # decay ** steps: the initial weights' share before the correction

    @torch.no_grad()
    def follow(*_: object) -> None:
        nonlocal kept
        kept *= decay
        torch._foreach_lerp_(averaged, trained, (1.0 - decay) / (1.0 - kept))

    optimizer.register_step_post_hook(follow)
    return average


@dataclass
class _Fit:
    """One :func:`fit` call's state across epochs: what it trains, and the best so far."""

    model: nn.Module
    scored: nn.Module  # what validation scores and keeps: the model, or its weight average
    step_loss: nn.Module
    optimizer: torch.optim.Optimizer
    timelines: Timelines
    train_end: np.ndarray
    validation: Queries
    spec: EvalConfig
    config: FitConfig
    inputs: EvalInputs
    parallel: DataParallel
    rng: np.random.Generator
    deadline: float | None
    best_state: dict[str, torch.Tensor]
    stale: int = 0  # epochs since the validation score last improved
    epoch_started: float = 0.0  # when the running epoch's training began
    result: FitResult = field(default_factory=FitResult)

    def epoch_step(self, epoch: int) -> tuple[float, int]:
        """Re-cut the windows and train one pass over them: (mean loss, steps).

        A non-finite loss restores the best weights and raises a UserFacingError.
        """
        spec, config = self.spec, self.config
        windows = make_windows(
            self.timelines,
            self.train_end,
            spec.short_len,
            spec.long_len,
            config.stride,
            self.rng,
            self.inputs.codes,
            config.next_day_windows,
            config.next_day_targets,
        )
        self.epoch_started = time.perf_counter()
        try:
            loss, steps, self.result.stop_reason = train_epoch(
                self.step_loss,
                self.optimizer,
                self.timelines,
                windows,
                self.inputs,
                config,
                self.rng,
                self.deadline,
                f"epoch {epoch}",
                self.parallel,
            )
        except _NonFinite as exc:
            self.model.load_state_dict(self.best_state)
            self.result.stop_reason = str(exc)
            raise UserFacingError(
                f"training stopped: {exc}; kept the last good weights "
                f"(epoch {self.result.best_epoch}); lower the learning rate"
            ) from exc
        return loss, steps

    def validation_step(self, epoch: int, loss: float) -> None:
        """Score the validation queries, record the epoch, keep its weights if best.

        Rank 0 scores and every rank takes its score. Without a gain the learning rate
        shrinks by ``plateau_lr_factor``, and after ``patience`` such epochs the result
        gets its stop reason.
        """
        config, parallel, result = self.config, self.parallel, self.result
        epoch_start = self.epoch_started
        score = (
            validation_score(
                self.scored,
                self.timelines,
                self.validation,
                self.spec,
                config.val_metric,
                self.inputs,
            )
            if parallel.is_main
            else 0.0
        )
        score = from_main(score, parallel)
        result.history.append(
            {
                "epoch": epoch,
                "loss": loss,
                "val_" + config.val_metric: score,
                "lr": self.optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - epoch_start,
            }
        )
        if config.progress and parallel.is_main:
            tqdm.write(
                f"epoch {epoch}: loss {loss:.4f} val {config.val_metric} {score:.4f}"
                f" ({time.perf_counter() - epoch_start:.0f}s)"
            )
        if score > result.best_score:
            result.best_score, result.best_epoch, self.stale = score, epoch, 0
            self.best_state = copy.deepcopy(self.scored.state_dict())
            return
        self.stale += 1
        for group in self.optimizer.param_groups:  # smaller steps to settle into the optimum
            group["lr"] *= config.plateau_lr_factor
        if self.stale >= config.patience:
            result.stop_reason = f"no validation gain for {config.patience} epochs"


def fit_to_cutoff(
    model: nn.Module,
    make_loss: Callable[[np.ndarray], BatchLoss],
    timelines: Timelines,
    split: TemporalSplit,
    spec: EvalConfig,
    config: FitConfig,
    device: torch.device,
    inputs: EvalInputs = NO_INPUTS,
    parallel: DataParallel = SINGLE,
) -> FitResult:
    """Train from scratch as the global temporal split prescribes: on the events up to
    T_val, with early stopping on the split's validation. ``make_loss(item_counts)`` builds
    the loss (its logQ correction follows the phase's targets). What follows up to T_test
    differs: ``grank offline-eval`` catches up (:func:`catch_up`), the daily bootstrap walks
    forward day by day (training/daily.py)."""
    n_rows = int(model.item_vectors().shape[0])  # type: ignore[operator]
    return fit(
        model,
        make_loss(item_counts(timelines, split.fit_end, n_rows)),
        timelines,
        split.fit_end,
        split.validation,
        spec,
        config,
        device,
        inputs,
        parallel,
    )


def catch_up(
    model: nn.Module,
    make_loss: Callable[[np.ndarray], BatchLoss],
    timelines: Timelines,
    split: TemporalSplit,
    spec: EvalConfig,
    catchup: FitConfig,
    device: torch.device,
    inputs: EvalInputs = NO_INPUTS,
    parallel: DataParallel = SINGLE,
) -> None:
    """Train ``catchup.max_epochs`` epochs on the windows whose targets fall between T_val
    and T_test, ending on the last epoch (no early stopping: the validation targets are
    training data here), so the model is frozen at T_test having seen the freshest events."""
    n_rows = int(model.item_vectors().shape[0])  # type: ignore[operator]
    recent = replace(timelines, first_target=np.minimum(split.fit_end, split.train_end))
    if catchup.max_epochs and (split.train_end > split.fit_end).any():
        fit(
            model,
            make_loss(item_counts(recent, split.train_end, n_rows)),
            recent,
            split.train_end,
            split.validation,
            spec,
            replace(catchup.fixed_epochs(catchup.max_epochs), max_seconds=None),
            device,
            inputs,
            parallel,
        )


def choose_catch_up(
    model: nn.Module,
    make_loss: Callable[[np.ndarray], BatchLoss],
    timelines: Timelines,
    split: TemporalSplit,
    spec: EvalConfig,
    catchup: FitConfig,
    choices: tuple[int, ...],
    device: torch.device,
    inputs: EvalInputs = NO_INPUTS,
) -> tuple[int, dict[str, float]]:
    """How many epochs to catch up (one of ``choices``), and the score of each.

    The catch-up trains on the validation targets, so no later validation can judge it,
    and the test targets must not. Instead the split is repeated inside its period
    (temporal.py ``catch_up_trial``): from the fitted weights, catch up to T_mid for each
    choice and score the Generator (early stopping's metric) on every event between T_mid
    and T_test in turn. Ties take fewer epochs; with a single choice, or no event after
    T_mid, the fewest is taken unscored. The model ends with the weights it came with.
    """
    trial, queries = catch_up_trial(timelines, split)
    if len(choices) == 1 or len(queries) == 0:
        return min(choices), {}
    fitted = copy.deepcopy(model.state_dict())
    scores: dict[str, float] = {}
    for epochs in sorted(choices):
        catch_up(
            model,
            make_loss,
            timelines,
            trial,
            spec,
            replace(catchup, max_epochs=epochs),
            device,
            inputs,
        )
        scores[str(epochs)] = validation_score(
            model, timelines, queries, spec, catchup.val_metric, inputs
        )
        model.load_state_dict(fitted)
    best = max(sorted(choices), key=lambda epochs: scores[str(epochs)])  # first of ties
    return best, scores


def validation_score(
    model: nn.Module,
    timelines: Timelines,
    validation: Queries,
    spec: EvalConfig,
    metric: str,
    inputs: EvalInputs,
) -> float:
    """The Generator's ``metric`` on the validation queries (early stopping's signal)."""
    device = next(model.parameters()).device
    scorer: Scorer = model  # type: ignore[assignment]
    metrics = evaluate(scorer, timelines, validation, spec, device, inputs, with_rank=False)
    return metrics["generator/filtered"][metric]


# what validation chooses after a fit (GRankConfig's fields), and how ties among the
# best-scoring values are broken
Knob = Literal["user_vector", "ranker_weight", "prior_weight"]
TieBreak = Callable[[list[Any]], Any]


def calibrate_served_order(
    model: nn.Module,
    timelines: Timelines,
    validation: Queries,
    spec: EvalConfig,
    config: FitConfig,
    inputs: EvalInputs,
    parallel: DataParallel = SINGLE,
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Choose on the validation queries how what serves is formed; returns the score of
    each choice tried: where the user vector is read, the Ranker's weight, the prior's
    ({} where there is nothing to choose). Rank 0 scores; every rank takes its choice.

    First where the user vector is read (``GRankConfig.user_vector``) among
    ``config.user_vectors``, on the Generator's order (ties keep the earlier). Training
    fixes none of them as the best: without next-day windows U is one next-token slot of
    many, the newest slot is trained by every window, and which reads a user better (or
    their mean) depends on the model's size and the data (docs/model.md).

    Then a residual Ranker's ``ranker_weight`` among ``config.ranker_weights`` (ties keep
    the larger). The Ranker is trained to reorder the Generator's top, but nothing
    promises that its correction helps on every protocol and dataset: where it does not,
    serving the Generator's order (weight 0) or a damped correction beats it, and
    validation is the evidence that tells.

    Then, on that choice, a popularity prior's ``prior_weight`` among
    ``config.prior_weights`` (ties keep the smaller: no evidence, no prior).
    """
    if not isinstance(model, GRank):
        return {}, {}, {}

    def choose(knob: Knob, values: tuple[Any, ...], tie_break: TieBreak) -> dict[str, float]:
        return _choose(
            model, knob, values, tie_break, timelines, validation, spec, config, inputs, parallel
        )

    readouts = choose("user_vector", config.user_vectors, _first) if config.user_vectors else {}
    knobs = model.config
    if not knobs.use_ranker:
        return readouts, {}, {}
    with_ranker = knobs.ranker_residual and config.ranker_weights
    ranker = choose("ranker_weight", config.ranker_weights, max) if with_ranker else {}
    with_prior = knobs.inputs.popularity_prior is not None and config.prior_weights
    prior = choose("prior_weight", config.prior_weights, min) if with_prior else {}
    return readouts, ranker, prior


def _first(tied: list[Any]) -> Any:
    return tied[0]


def _choose(
    model: GRank,
    knob: Knob,
    values: tuple[Any, ...],
    tie_break: TieBreak,
    timelines: Timelines,
    validation: Queries,
    spec: EvalConfig,
    config: FitConfig,
    inputs: EvalInputs,
    parallel: DataParallel,
) -> dict[str, float]:
    """Set ``knob`` to the value whose order scores best on validation (``tie_break``
    among equals): the Generator's order for where the user vector is read, the served
    order for the weights. Every rank takes rank 0's choice (only rank 0 scores)."""
    stage = "generator" if knob == "user_vector" else "rank"
    scores: list[float] = []
    chosen = 0
    if parallel.is_main:
        device = next(model.parameters()).device
        for value in values:
            model.config = replace(model.config, **{knob: value})
            metrics = evaluate(
                model, timelines, validation, spec, device, inputs, with_rank=stage == "rank"
            )
            scores.append(metrics[f"{stage}/filtered"][config.val_metric])
        best = max(scores)
        tied = [value for value, score in zip(values, scores, strict=True) if score == best]
        chosen = values.index(tie_break(tied))
    value = values[int(from_main(chosen, parallel))]
    model.config = replace(model.config, **{knob: value})
    # rank 0's scores by value; other ranks scored nothing
    tried = {_label(value): score for value, score in zip(values, scores, strict=False)}
    if config.progress and parallel.is_main:
        listed = ", ".join(f"{label}: {score:.4f}" for label, score in tried.items())
        tqdm.write(f"{knob.replace('_', ' ')} {_label(value)} (val {config.val_metric} {listed})")
    return tried


def _label(value: float | str) -> str:
    """A choice as reports name it: weights in their shortest form ("0.25"), places as is."""
    return f"{value:g}" if isinstance(value, float) else value
