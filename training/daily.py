"""The daily model stages: ``grank train --date D`` and ``grank evaluate --date D``.

Day semantics: the model of D trains on the days before D and is judged on D (next-day
protocol: each user active on D, history up to the end of D-1, all of D's items relevant),
so the gate always judges it on data it never saw.

- **Bootstrap** (no published model, or ``--from-scratch``): the global temporal split at
  the start of D (training/temporal.py) gives a validation inside the training period.
  The model trains on events up to T_val with early stopping on that validation (under
  the time budget), then walks forward day by day to D as the daily runs would have:
  each day between T_val and D is scored next-day by the model trained through the day
  before (evidence for the gate), then trained on; what it serves tomorrow has seen
  yesterday.
- **Warm start**: fine-tune the published model on the days after its last training day;
  while no model has passed the gate yet, the latest refused candidate instead
  (``ModelRegistry.warm_start_base``): training accumulates until one passes.

Data parallel (``training/distributed.py``): with several processes every rank reads the
run's data and trains; rank 0 alone backtests, writes the checkpoint and returns the
manifest, the same checkpoint format as one process writes.

Evaluation pools per-query evidence over a trailing window of days (training/gate.py)
and moves PUBLISHED only when the candidate clears the gate (training/registry.py).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from common.atomic import staging_dir
from common.errors import UserFacingError
from features.feature_tables import TRAINING_EXAMPLES, FeatureTables
from features.lake import EPOCH, US_PER_DAY
from training.baselines import Baselines
from training.checkpoint import load_checkpoint
from training.config import EvalConfig, FitConfig, GRankConfig, LossWeights
from training.data import (
    Timelines,
    day_number,
    events_before,
    item_counts,
    next_day,
    read_timelines,
)
from training.distributed import SINGLE, DataParallel
from training.evaluate import EvalInputs, Scorer, query_records, summarize, write_chart
from training.features import FeatureHistory, read_feature_history
from training.gate import (
    CANDIDATE,
    PUBLISHED,
    GatePolicy,
    Verdict,
    decide,
    read_evidence,
    write_evidence,
)
from training.inputs import InputSpec, event_codes
from training.losses import BatchLoss, grank_batch_loss, log_q
from training.model import GRank
from training.registry import ModelRegistry
from training.temporal import TemporalSplit, global_temporal_split
from training.train import FitResult, fit, fit_to_cutoff, seed_everything


@dataclass(frozen=True)
class DailyJob:
    """Everything the daily model stages need, as plain values (the CLI fills it)."""

    features_dir: Path
    registry: ModelRegistry
    test_day: date
    catalogue: np.ndarray  # item ids serving may recommend (the lake's item dimension)
    landed_days: frozenset[date]  # raw days of the lake: a day missing here had no events
    model: GRankConfig  # architecture of a fresh model; n_item_rows is taken from the data
    weights: LossWeights
    fit: FitConfig
    finetune: FitConfig
    spec: EvalConfig
    gate: GatePolicy
    baselines: Baselines
    val_quantile: float  # bootstrap: T_val = this quantile of the training events
    val_targets: int  # bootstrap: validation targets per user (temporal.py)
    feature_ttl_days: int  # as Feast serves the daily views (features/feast_repo)
    train_window_days: int  # bootstrap: days before D to train on; 0 = all
    from_scratch: bool = False
    git_commit: str = "unknown"
    parallel: DataParallel = SINGLE  # this process' place among the training processes


@dataclass(frozen=True)
class DayData:
    """The timelines of a run and the model's and the baselines' point-in-time features."""

    timelines: Timelines
    model_inputs: EvalInputs
    baseline_inputs: EvalInputs


def _servable(catalogue: np.ndarray, n_rows: int) -> np.ndarray:
    servable = np.zeros(n_rows, dtype=bool)
    ids = catalogue[(catalogue > 0) & (catalogue < n_rows)]
    servable[ids] = True
    return servable


def read_day_data(
    job: DailyJob,
    first: date | None,
    spec: InputSpec,
    n_rows: int,
    device: torch.device,
    predictions_from: date | None = None,
) -> DayData:
    """Timelines of ``first..test_day`` and the features for predictions made on the days
    ``predictions_from..test_day`` (default: every day of the timelines)."""
    timelines = read_timelines(job.features_dir, first, job.test_day, job.landed_days)
    codes = event_codes(spec, timelines.event_types(), timelines.event_values(), timelines.times)
    servable = _servable(job.catalogue, n_rows)
    first_day = predictions_from or timelines.first_day

    def history(item_spec: InputSpec) -> FeatureHistory:
        return read_feature_history(
            job.features_dir,
            item_spec,
            first_day,
            job.test_day,
            n_rows,
            job.feature_ttl_days,
            device,
        )

    baseline_spec = InputSpec(item_numeric=job.baselines.item_columns)
    return DayData(
        timelines=timelines,
        model_inputs=EvalInputs(history(spec), codes, servable),
        baseline_inputs=EvalInputs(history(baseline_spec), None, servable),
    )


def _baseline_scorers(job: DailyJob, data: DayData) -> dict[str, Scorer | None]:
    history = data.baseline_inputs.features
    assert history is not None
    return dict(job.baselines.scorers(history))


def _records(
    job: DailyJob,
    data: DayData,
    day: date,
    candidate: GRank,
    published: GRank | None,
    device: torch.device,
) -> pa.Table:
    """Next-day per-query evidence of ``day`` for the candidate, published and baselines."""
    timelines = data.timelines
    _, _, queries = next_day(timelines, day)
    scorers: dict[str, Scorer | None] = {CANDIDATE: candidate, PUBLISHED: published}
    inputs = {CANDIDATE: data.model_inputs, PUBLISHED: data.model_inputs}
    if published is not None and published.config.inputs != candidate.config.inputs:
        raise UserFacingError(
            "the published model reads other features than the candidate: evaluate it with"
            " its own inputs (promote or retrain it)"
        )
    for name, scorer in _baseline_scorers(job, data).items():
        scorers[name] = scorer
        inputs[name] = data.baseline_inputs
    return query_records(scorers, timelines, queries, job.spec, device, inputs)


# ---------------------------------------------------------------------------- train
def train_day(job: DailyJob, device: torch.device) -> dict[str, Any] | None:
    """Train the candidate of ``test_day`` and commit it; returns its manifest (+ id).

    Under data parallelism only rank 0 commits and returns it; the other ranks get None.
    """
    day = job.test_day
    if not FeatureTables(job.features_dir).partition(TRAINING_EXAMPLES, day).is_dir():
        raise UserFacingError(
            f"no {TRAINING_EXAMPLES} for the test day {day}: build its features first"
        )
    base = None if job.from_scratch else job.registry.warm_start_base(day)
    if base is not None:
        return _warm_start(job, base, device)
    return _bootstrap(job, device)


def _n_rows(job: DailyJob, timelines_max: int) -> int:
    return max(timelines_max, int(job.catalogue.max(initial=0))) + 1


def _bootstrap(job: DailyJob, device: torch.device) -> dict[str, Any] | None:
    """From scratch: fit up to T_val (early stopping), walk forward to D, commit."""
    day = job.test_day
    spec = job.model.inputs
    data, split, n_rows = _bootstrap_data(job, device)
    timelines = data.timelines
    seed_everything(job.fit.seed)
    model = GRank(replace(job.model, n_item_rows=n_rows))
    if spec.user_numeric:
        assert data.model_inputs.features is not None
        model.fit_feature_ranges(*data.model_inputs.features.user_ranges(day_number(day)))

    def make_loss(counts: np.ndarray) -> BatchLoss:
        return grank_batch_loss(job.weights, log_q(counts, device))

    result = fit_to_cutoff(
        model,
        make_loss,
        timelines,
        split,
        job.spec,
        job.fit,
        device,
        data.model_inputs,
        parallel=job.parallel,
    )
    backtest, walked = _walk_forward(job, data, model, split, make_loss, device)
    manifest = _manifest(job, timelines.first_day, None, result, job.fit)
    manifest.update(
        bootstrap={
            "t_val": split.t_val,
            "walk_forward_epochs": walked,
            "validation_queries": len(split.validation),
        },
        backtest=backtest,
        n_train_events=int(item_counts(timelines, split.train_end, n_rows).sum()),
    )
    return _commit(job, model, manifest, result)


def _bootstrap_data(job: DailyJob, device: torch.device) -> tuple[DayData, TemporalSplit, int]:
    """The bootstrap's days (the window before D), their global temporal split, table rows."""
    day = job.test_day
    first = date.min if job.train_window_days <= 0 else day - timedelta(job.train_window_days)
    probe = read_timelines(job.features_dir, first, day, job.landed_days)
    if probe.first_day >= day:
        raise UserFacingError(f"no training days before the test day {day}")
    n_rows = _n_rows(job, probe.max_item_id)
    data = read_day_data(job, first, job.model.inputs, n_rows, device)
    split = global_temporal_split(
        data.timelines, day_number(day) * US_PER_DAY - 1, job.val_quantile, job.val_targets
    )
    if len(split.validation) == 0:
        raise UserFacingError(f"no validation events between T_val and {day}: too little history")
    return data, split, n_rows


def _walk_forward(
    job: DailyJob,
    data: DayData,
    model: GRank,
    split: TemporalSplit,
    make_loss: Callable[[np.ndarray], BatchLoss],
    device: torch.device,
) -> tuple[dict[str, list[Any]], list[int]]:
    """Walk the days between T_val and D as the daily runs would have; return the evidence
    and the epochs each day's fine-tune trained.

    Each day is scored next-day by the model trained through the day before (the gate's
    evidence, against popularity as fresh as the day's), then the model trains on that
    day exactly as a warm start does (``job.finetune``: its learning rate, epochs and
    time budget). A model frozen at T_val would be scored days after its training ended
    against a popularity refreshed daily, and one fine-tuned more lightly than the daily
    runs fine-tune understates the model they serve: either is evidence about a model no
    daily run serves. The model that comes out has seen every event before D.
    """
    timelines = data.timelines
    n_rows = int(model.item_vectors().shape[0])
    trained = np.minimum(split.fit_end, split.train_end)  # per user: events trained on
    tables = []
    walked: list[int] = []
    day = EPOCH + timedelta(days=split.t_val // US_PER_DAY + 1)
    while day <= job.test_day:
        before = events_before(timelines, day)
        if job.finetune.max_epochs and (before > trained).any():
            recent = replace(timelines, first_target=np.maximum(timelines.first_target, trained))
            result = fit(
                model,
                make_loss(item_counts(recent, before, n_rows)),
                recent,
                before,
                split.validation,
                job.spec,
                job.finetune,
                device,
                data.model_inputs,
                job.parallel,
            )
            walked.append(len(result.history))
            trained = np.maximum(trained, before)
        if day < job.test_day and job.parallel.is_main:  # evidence is rank 0's to write
            with contextlib.suppress(UserFacingError):  # a day without queries: no evidence
                tables.append(_records(job, data, day, model, None, device))
        day += timedelta(days=1)
    if not tables:
        return {}, walked
    return pa.concat_tables(tables).to_pydict(), walked


def _warm_start(job: DailyJob, base: str, device: torch.device) -> dict[str, Any] | None:
    """Fine-tune the published lineage's model on the days after its last training day."""
    day = job.test_day
    model, base_manifest = load_checkpoint(job.registry.checkpoint_path(base), str(device))
    first = date.fromisoformat(base_manifest["data_last_day"]) + timedelta(days=1)
    probe = read_timelines(job.features_dir, first, day, job.landed_days)
    if probe.first_day >= day:
        raise UserFacingError(
            f"the published model {base} already covers {probe.first_day - timedelta(1)};"
            f" nothing new to train on before {day}"
        )
    n_rows = _n_rows(job, probe.max_item_id)
    seed_everything(job.fit.seed)  # grown rows must not depend on history
    model.grow_items(n_rows)
    n_rows = model.config.n_item_rows
    data = read_day_data(job, first, model.config.inputs, n_rows, device)
    train_end, validation, _ = next_day(data.timelines, day)
    counts = item_counts(data.timelines, train_end, n_rows)
    if counts.sum() == 0:
        raise UserFacingError(f"no training events in {data.timelines.first_day}..{day}")
    result = fit(
        model,
        grank_batch_loss(job.weights, log_q(counts, device)),
        data.timelines,
        train_end,
        validation,
        job.spec,
        job.finetune,
        device,
        data.model_inputs,
        job.parallel,
    )
    manifest = _manifest(
        job, date.fromisoformat(base_manifest["data_first_day"]), base, result, job.finetune
    )
    manifest["n_train_events"] = int(counts.sum())
    return _commit(job, model, manifest, result)


def _manifest(
    job: DailyJob, first_day: date, base: str | None, result: FitResult, config: FitConfig
) -> dict[str, Any]:
    # Durations are left out: a re-run of a day must write the same checkpoint bytes.
    return {
        "test_day": job.test_day.isoformat(),
        "data_first_day": first_day.isoformat(),
        "data_last_day": (job.test_day - timedelta(days=1)).isoformat(),
        "warm_start_from": base,
        "git_commit": job.git_commit,
        "seed": config.seed,
        "processes": job.parallel.world_size,
        "loss_weights": asdict(job.weights),
        "fit": {k: v for k, v in asdict(config).items() if k != "progress"},
        "best_epoch": result.best_epoch,
        "val_score": result.best_score,
        "kept_epoch": result.kept_epoch,
        "stop_reason": result.stop_reason,
        "user_vector_scores": result.user_vector_scores,
        "ranker_weight_scores": result.ranker_weight_scores,
        "prior_weight_scores": result.prior_weight_scores,
        "history": [{k: v for k, v in h.items() if k != "seconds"} for h in result.history],
    }


def _commit(
    job: DailyJob, model: GRank, manifest: dict[str, Any], result: FitResult
) -> dict[str, Any] | None:
    if not job.parallel.is_main:
        return None
    checkpoint_id = job.registry.commit(model, manifest, job.test_day)
    return {**manifest, "checkpoint_id": checkpoint_id, "train_seconds": round(result.seconds, 1)}


# ------------------------------------------------------------------------- evaluate
@dataclass(frozen=True)
class Evaluation:
    """What ``grank evaluate`` reports: the verdict, whether PUBLISHED moved, the files."""

    verdict: Verdict
    published: bool
    note: str
    folder: Path
    summary: dict[str, dict[str, float]]


def evaluate_day(job: DailyJob, device: torch.device) -> Evaluation:
    """Judge the candidate of ``test_day``: next-day evidence, pooled gate, PUBLISHED move.

    Writes ``evaluations/<D>/{metrics.json, queries.parquet, chart.png}`` (the report is
    complete before PUBLISHED can move).
    """
    day, registry = job.test_day, job.registry
    name = registry.candidate(day)
    evidence = _candidate_evidence(job, name, device)
    verdict = gate_verdict(job, evidence.all)
    will_move, note = registry.would_publish(name) if verdict.publishable else (False, "")
    summary = summarize(evidence.today)
    folder = registry.evaluation_dir(day)
    _write_report(folder, job, name, evidence, verdict, summary)
    moved = False
    if will_move:
        moved, note = registry.publish_if_newer(name, verdict.reason)
    return Evaluation(verdict, moved, note, folder, summary)


@dataclass(frozen=True)
class _Evidence:
    """Per-query records of a candidate: its test day's, and with its backtest's (``all``)."""

    today: pa.Table
    all: pa.Table
    base: str | None  # the model the candidate was compared with (None: none published)
    losses: list[float]  # the candidate's training loss per epoch, for the chart


def _candidate_evidence(job: DailyJob, name: str, device: torch.device) -> _Evidence:
    """Score the candidate ``name``, the model it would replace and the baselines on D."""
    day, registry = job.test_day, job.registry
    candidate, manifest = load_checkpoint(registry.checkpoint_path(name), str(device))
    first = date.fromisoformat(manifest["data_first_day"])
    n_rows = candidate.config.n_item_rows
    data = read_day_data(job, first, candidate.config.inputs, n_rows, device, day)
    base = registry.base_for(day)
    published = None
    if base is not None:
        published, _ = load_checkpoint(registry.checkpoint_path(base), str(device))
        published.grow_items(n_rows)  # rows for items newer than it score ~0, as served
    today = _records(job, data, day, candidate, published, device)
    backtest = manifest.get("backtest") or {}
    # the manifest stores the backtest as JSON with sorted keys: match columns by name
    evidence = (
        pa.concat_tables([pa.table(backtest), today], promote_options="permissive")
        if backtest
        else today
    )
    return _Evidence(today, evidence, base, [h["loss"] for h in manifest["history"]])


def gate_verdict(job: DailyJob, evidence: pa.Table) -> Verdict:
    """The gate's decision on a candidate's ``evidence`` (its test day's records and its
    walk-forward's), pooled with the earlier evaluations in ``job.gate``'s window."""
    return decide(_pooled_evidence(job, evidence), list(job.baselines.columns), job.gate)


def _pooled_evidence(job: DailyJob, evidence: pa.Table) -> pa.Table:
    """The gate's window: ``evidence`` in it, and the earlier days' reports in it."""
    day = job.test_day
    window_first = day - timedelta(days=job.gate.window_days - 1)
    pooled_folders = [
        job.registry.evaluation_dir(window_first + timedelta(days=i))
        for i in range(job.gate.window_days - 1)
    ]
    earlier = read_evidence(pooled_folders, day_number(window_first), day_number(day))
    return pool_evidence(earlier, _in_window(evidence, day_number(window_first)))


def _write_report(
    folder: Path,
    job: DailyJob,
    name: str,
    evidence: _Evidence,
    verdict: Verdict,
    summary: dict[str, dict[str, float]],
) -> None:
    """``metrics.json``, the per-query evidence and the chart, as one atomic folder."""
    report = {
        "day": job.test_day.isoformat(),
        "checkpoint": name,
        "published_before": evidence.base,
        "n_queries": evidence.today.num_rows,
        "gate": {
            **asdict(job.gate),
            "publishable": verdict.publishable,
            "reason": verdict.reason,
            "pooled_queries": verdict.n_queries,
            "pooled_users": verdict.n_users,
            "best_baseline": verdict.best_baseline,
            "pooled_means": verdict.means,
        },
        "results": summary,
    }
    with staging_dir(folder) as staging:
        write_evidence(staging, evidence.all)
        (staging / "metrics.json").write_text(json.dumps(report, indent=2, sort_keys=True))
        write_chart(staging / "chart.png", summary, evidence.losses)


def pool_evidence(earlier: pa.Table | None, current: pa.Table) -> pa.Table:
    """The gate's window: ``current`` (this candidate's own records, its bootstrap's
    walk-forward included) plus the earlier evaluations' records of the days it lacks.

    A day the candidate scored itself is never counted twice: a bootstrap (``--from-scratch``
    after a refused one, or a re-run) walks forward over days an earlier candidate scored,
    and that candidate's records of them would both double the queries (an interval
    tighter than the evidence) and mix another model into the candidate's column.
    """
    if earlier is None:
        return current
    covered = np.isin(earlier["day"].to_numpy(), np.unique(current["day"].to_numpy()))
    rest = earlier.filter(pa.array(~covered)).select(current.column_names).cast(current.schema)
    return pa.concat_tables([rest, current])


def _in_window(records: pa.Table, first_day: int) -> pa.Table:
    days = records["day"].to_numpy()
    return records.filter(pa.array(days >= first_day))
