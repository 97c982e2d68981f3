"""Offline evaluation: the global temporal split (headline) and leave-one-out (secondary).

``grank offline-eval`` reads the same feature tables the daily pipeline reads, trains
every variant the way the daily bootstrap trains (training/train.py ``fit_to_cutoff``:
early stopping on the split's own validation), catches it up to T_test for as many
epochs as the split repeated inside the catch-up's period prefers (``choose_catch_up``)
and scores it on the events after T_test, next to the popularity baselines. The model
is frozen at T_test; features are read as of the day before each prediction, as
serving reads them.

Variants: ``grank`` (the configured model), ``generator_only`` (no auxiliary path, no
Ranker), ``dssm`` (the two-tower baseline), and the feature ablation: ``sequence_only``,
each group alone on top of it (``behaviors``, ``user_profile``, ``item_features``) and
``all_features``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import UserFacingError
from features.lake import US_PER_DAY
from training.baselines import Baselines, Popularity, TwoTower
from training.config import EvalConfig, FitConfig, GRankConfig, LossWeights
from training.data import Timelines, item_counts, leave_last_out, read_timelines
from training.evaluate import EvalInputs, Scorer, evaluate_by_filter
from training.features import read_feature_history
from training.inputs import FEATURE_GROUPS, InputSpec, event_codes, select_groups
from training.losses import grank_batch_loss, log_q, two_tower_batch_loss
from training.model import GRank
from training.temporal import TemporalSplit, global_temporal_split, preprocess, quantile_time
from training.train import (
    FitResult,
    catch_up,
    choose_catch_up,
    fit,
    fit_to_cutoff,
    seed_everything,
)

PROTOCOLS = ("gts", "loo")
# the feature ablation: the sequence alone, each group alone on top of it, all of them
ABLATION = ("sequence_only", "behaviors", "user_profile", "item_features", "all_features")
VARIANTS = ("grank", "generator_only", "dssm", *ABLATION)


@dataclass(frozen=True)
class OfflineJob:
    """What an offline evaluation needs, as plain values (the CLI fills it)."""

    features_dir: Path
    landed_days: frozenset[date]
    model: GRankConfig  # the configured GRank; variants switch parts of it off
    feature_groups: InputSpec  # every group's definition (the ablation picks among them)
    weights: LossWeights
    fit: FitConfig
    catchup: FitConfig  # the catch-up's optimiser (its epochs: one of catchup_epochs)
    catchup_epochs: tuple[int, ...]  # validation chooses among these (train.choose_catch_up)
    spec: EvalConfig
    baselines: Baselines
    quantile: float = 0.9
    val_quantile: float = 0.9
    val_targets: int = 1  # validation targets per user (temporal.py)
    k_core: int = 5
    feature_ttl_days: int = 2
    dssm_lr: float = 3e-3


@dataclass(frozen=True)
class OfflineData:
    """The preprocessed timelines, their split and the point-in-time features."""

    timelines: Timelines
    split: TemporalSplit
    servable: np.ndarray
    features_of: Callable[[InputSpec], EvalInputs]


def variant_config(base: GRankConfig, groups: InputSpec, variant: str) -> GRankConfig:
    """The GRank configuration of a variant (``dssm`` has none: it is not a GRank).

    ``base`` is the configured model; ``groups`` defines every feature group, of which
    the ablation variants pick theirs (training/inputs.py ``select_groups``).
    """
    if variant == "grank":
        return base
    if variant == "generator_only":
        return replace(base, use_aux=False, use_ranker=False)
    chosen = {"sequence_only": (), "all_features": FEATURE_GROUPS}.get(variant, (variant,))
    return replace(base, inputs=select_groups(groups, chosen))


def load(job: OfflineJob, device: torch.device) -> OfflineData:
    """Every training example up to the last built day, preprocessed and split at T_test."""
    raw = read_timelines(job.features_dir, None, date.max, job.landed_days)
    timelines = preprocess(raw, job.k_core)
    if timelines.n_users == 0:
        raise UserFacingError(f"nothing left after the {job.k_core}-core preprocessing")
    t_test = quantile_time(timelines.times, job.quantile)
    split = global_temporal_split(timelines, t_test, job.val_quantile, job.val_targets)
    n_rows = max(timelines.max_item_id, job.model.n_item_rows - 1) + 1
    servable = np.zeros(n_rows, dtype=bool)
    servable[np.unique(timelines.items)] = True  # the preprocessed catalogue is what ranks
    histories: dict[InputSpec, EvalInputs] = {}

    def features_of(spec: InputSpec) -> EvalInputs:
        if spec not in histories:
            history = read_feature_history(
                job.features_dir,
                spec,
                timelines.first_day,
                timelines.last_day,
                n_rows,
                job.feature_ttl_days,
                device,
            )
            codes = event_codes(
                spec, timelines.event_types(), timelines.event_values(), timelines.times
            )
            histories[spec] = EvalInputs(history, codes, servable)
        return histories[spec]

    return OfflineData(timelines, split, servable, features_of)


# A target's suffix for the literature's seen filter: every item of the input history,
# where serving (the unsuffixed target) filters the last ``seen_len`` events only. The
# published baselines (SASRec+ in "Time to Split") are measured with the literature's.
HISTORY_FILTER = "_history_filter"


def _scores(
    scorer: Scorer,
    data: OfflineData,
    spec: EvalConfig,
    inputs: EvalInputs,
    device: torch.device,
    protocol_queries: dict[str, Any],
) -> dict[str, dict[str, dict[str, float]]]:
    """Each target scored under serving's seen filter and under the literature's, each
    metric with its 95% bootstrap interval over the test users.

    A deployment that filters the whole history (``seen_len`` None) already serves the
    literature's filter, so its scores are reused rather than computed twice.
    """
    literature = replace(spec, seen_len=None)
    specs = [spec] if literature == spec else [spec, literature]
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for target, queries in protocol_queries.items():
        by_filter = evaluate_by_filter(
            scorer, data.timelines, queries, specs, device, inputs, intervals=True
        )
        scores[target] = by_filter[0]
        scores[target + HISTORY_FILTER] = by_filter[-1]
    return scores


def gts_scores(
    scorer: Scorer, data: OfflineData, spec: EvalConfig, inputs: EvalInputs, device: torch.device
) -> dict[str, dict[str, dict[str, float]]]:
    """The split's "last" and "successive" targets, each under both seen filters."""
    targets = {"last": data.split.test_last, "successive": data.split.test_successive}
    return _scores(scorer, data, spec, inputs, device, targets)


def gts_variant(
    job: OfflineJob, data: OfflineData, variant: str, device: torch.device
) -> tuple[GRank | TwoTower, Callable[[np.ndarray], Any], EvalConfig, FitConfig, EvalInputs]:
    """A fresh, untrained ``variant`` for the global temporal split: the model, its loss
    (given the phase's item counts), evaluation spec, fit config and inputs."""
    n_rows = len(data.servable)
    if variant == "dssm":
        model = TwoTower(n_rows, job.model.dim, dropout=0.1)

        def two_tower_loss(counts: np.ndarray) -> Any:
            return two_tower_batch_loss(job.weights, log_q(counts, device))

        spec = replace(job.spec, long_len=0)
        config = replace(job.fit, lr=job.dssm_lr, stride=1, batch_size=1024)
        return model, two_tower_loss, spec, config, EvalInputs(servable=data.servable)
    grank_config = replace(
        variant_config(job.model, job.feature_groups, variant), n_item_rows=n_rows
    )
    grank = GRank(grank_config)
    inputs = data.features_of(grank_config.inputs)
    _fit_ranges(grank, inputs, data.split.t_test)

    def grank_loss(counts: np.ndarray) -> Any:
        return grank_batch_loss(job.weights, log_q(counts, device))

    return grank, grank_loss, job.spec, job.fit, inputs


def run_gts(
    job: OfflineJob,
    data: OfflineData,
    variants: list[str],
    device: torch.device,
    report: Callable[[str, dict[str, Any]], None],
) -> None:
    """Train and score each variant (and the baselines) on the global temporal split."""
    split = data.split
    baseline_inputs = data.features_of(InputSpec(item_numeric=job.baselines.item_columns))
    history = baseline_inputs.features
    assert history is not None
    for name, scorer in job.baselines.scorers(history).items():
        report(
            name,
            {
                "protocol": "gts",
                "results": gts_scores(scorer, data, job.spec, baseline_inputs, device),
            },
        )
    for variant in variants:
        started = time.perf_counter()
        seed_everything(job.fit.seed)
        model, make_loss, spec, config, inputs = gts_variant(job, data, variant, device)
        result = fit_to_cutoff(
            model, make_loss, data.timelines, split, spec, config, device, inputs
        )
        epochs, trial_scores = choose_catch_up(
            model,
            make_loss,
            data.timelines,
            split,
            spec,
            job.catchup,
            job.catchup_epochs,
            device,
            inputs,
        )
        catchup = replace(job.catchup, max_epochs=epochs)
        catch_up(model, make_loss, data.timelines, split, spec, catchup, device, inputs)
        report(
            variant,
            {
                "protocol": "gts",
                "results": gts_scores(model, data, spec, inputs, device),
                **_training_summary(job, model, result, started),
                "catchup_epochs": epochs,
                "catchup_trial_scores": trial_scores,
            },
        )


def run_loo(
    job: OfflineJob,
    data: OfflineData,
    variants: list[str],
    device: torch.device,
    report: Callable[[str, dict[str, Any]], None],
) -> None:
    """Leave-one-out: each user's last event tests, the one before validates (literature)."""
    timelines = data.timelines
    train_end, validation, test = leave_last_out(timelines)
    n_rows = len(data.servable)
    counts = item_counts(timelines, train_end, n_rows)
    targets = {"last": test}
    inputs_all = EvalInputs(servable=data.servable)
    report(
        "popularity_all_time",
        {
            "protocol": "loo",
            "results": _scores(
                Popularity(counts).to(device), data, job.spec, inputs_all, device, targets
            ),
        },
    )
    for variant in variants:
        if variant == "dssm":
            raise UserFacingError("the leave-one-out table covers GRank variants only")
        started = time.perf_counter()
        seed_everything(job.fit.seed)
        config = replace(variant_config(job.model, job.feature_groups, variant), n_item_rows=n_rows)
        model = GRank(config)
        inputs = data.features_of(config.inputs)
        _fit_ranges(model, inputs, int(timelines.times.max()))
        result = fit(
            model,
            grank_batch_loss(job.weights, log_q(counts, device)),
            timelines,
            train_end,
            validation,
            job.spec,
            job.fit,
            device,
            inputs,
        )
        report(
            variant,
            {
                "protocol": "loo",
                "results": _scores(model, data, job.spec, inputs, device, targets),
                **_training_summary(job, model, result, started),
            },
        )


def _training_summary(
    job: OfflineJob, model: GRank | TwoTower, result: FitResult, started: float
) -> dict[str, Any]:
    """How a variant trained, beside its scores: a table row is read with its budget."""
    return {
        "user_vector": model.config.user_vector if isinstance(model, GRank) else None,
        "best_epoch": result.best_epoch,
        "val_score": result.best_score,
        "stop_reason": result.stop_reason,
        "user_vector_scores": result.user_vector_scores,
        "ranker_weight_scores": result.ranker_weight_scores,
        "prior_weight_scores": result.prior_weight_scores,
        "next_day_windows": job.fit.next_day_windows,
        "train_seconds": round(time.perf_counter() - started, 1),
    }


def _fit_ranges(model: GRank, inputs: EvalInputs, until_us: int) -> None:
    """The profile features' training range: predictions up to ``until_us``."""
    if model.config.inputs.user_numeric and inputs.features is not None:
        model.fit_feature_ranges(*inputs.features.user_ranges(until_us // US_PER_DAY))
