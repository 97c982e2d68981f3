"""Full-catalogue evaluation (seen items filtered and unfiltered), the publish gate, the chart.

Stage 1 ("generator") ranks every item by ``user · item`` and keeps the top k1; stage 2
("rank") re-orders those k1 by the Ranker, exactly what serving does before it returns
the first k.
The gate compares a candidate model with the published one on the same queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch

from common.atomic import atomic_write_bytes
from common.errors import UserFacingError
from training.baselines import RecentPopularity
from training.config import EvalConfig
from training.data import Queries, Timelines, query_histories
from training.features import FeatureHistory
from training.inputs import seen_items
from training.metrics import per_query_metrics, ranking_metrics
from training.model import GRank, UserContext

RECALL_KS = (10, 50, 200)
NDCG_KS = (10, 50)
GATE_METRICS = ("recall@10", "recall@50", "ndcg@10")  # what each evaluation records per query


class VectorScorer(Protocol):
    """Anything with MIPS vectors: GRank, the DSSM, all-time popularity."""

    def user_vectors(self, short_seq: torch.Tensor) -> torch.Tensor: ...

    def item_vectors(self) -> torch.Tensor: ...


Scorer = VectorScorer | RecentPopularity


@dataclass(frozen=True)
class EvalInputs:
    """What a ranking needs besides the model: point-in-time features, behaviour flags
    per timeline position, and which item rows may be recommended (None: every row)."""

    features: FeatureHistory | None = None
    codes: np.ndarray | None = None
    servable: np.ndarray | None = None


NO_INPUTS = EvalInputs()  # a sequence-only model over every item row


def _excluded(
    timelines: Timelines,
    queries: Queries,
    rows: slice,
    n_rows: int,
    spec: EvalConfig,
    servable: np.ndarray | None,
    device: torch.device,
) -> torch.Tensor:
    """[B, n_rows]: padding, rows outside the catalogue and each query's seen items.

    Built on the host and moved in one copy: a copy per query costs a device round trip
    each, which on a GPU made an evaluation of 100k queries take minutes.
    """
    mask = np.zeros((rows.stop - rows.start, n_rows), dtype=bool)
    mask[:, 0] = True
    if servable is not None:
        mask[:, ~servable[:n_rows]] = True
    for i, q in enumerate(range(rows.start, rows.stop)):
        seen = seen_items(
            timelines.sequence(int(queries.users[q]))[: int(queries.cuts[q])], spec.seen_len
        )
        mask[i, seen[seen < n_rows]] = True
    return torch.from_numpy(mask).to(device)


def _all_scores(
    scorer: Scorer,
    short: torch.Tensor,
    user: UserContext | None,
    days: np.ndarray,
) -> torch.Tensor:
    """[B, n_rows] Stage-1 scores of every item row."""
    if isinstance(scorer, RecentPopularity):
        return scorer.scores(days)
    if isinstance(scorer, GRank):
        return scorer.user_vectors(short, user) @ scorer.item_vectors().T
    return scorer.user_vectors(short) @ scorer.item_vectors().T


def _stages(
    scorer: Scorer,
    scores: torch.Tensor,
    excluded: torch.Tensor,
    long: torch.Tensor,
    days: np.ndarray,
    features: FeatureHistory | None,
    k1: int,
    with_ranker: bool,
) -> dict[str, torch.Tensor]:
    """One batch's Stage-1 top items (``excluded`` masked) and, ``with_ranker``, the
    Ranker's order of the first ``k1`` of them."""
    depth = min(max(RECALL_KS), scores.shape[1] - 1)
    masked = scores.masked_fill(excluded, float("-inf"))
    top = masked.topk(depth, dim=1).indices
    if not with_ranker:
        return {"generator": top}
    assert isinstance(scorer, GRank)
    candidates = top[:, : min(k1, depth)]
    item_features = None if features is None else features.item_features(days, candidates)
    rank = scorer.rank_scores(long, candidates, masked.gather(1, candidates), item_features)
    order = rank.argsort(dim=1, descending=True)
    return {"generator": top, "rank": candidates.gather(1, order)}


@torch.no_grad()
def rankings_by_filter(
    scorer: Scorer,
    timelines: Timelines,
    queries: Queries,
    specs: Sequence[EvalConfig],
    device: torch.device,
    inputs: EvalInputs = NO_INPUTS,
    with_rank: bool = True,
) -> list[dict[str, np.ndarray]]:
    """:func:`rankings` under each of ``specs``, which may differ in ``seen_len`` only.

    Serving's seen filter and the literature's are two masks over the same scores, so
    the model scores each batch once; a query whose masks agree (its history is no
    longer than either filter reaches) takes the first spec's rankings.
    """
    if len(queries) == 0:
        raise UserFacingError("no evaluation queries (every user has too few events)")
    if not specs or any(replace(s, seen_len=specs[0].seen_len) != specs[0] for s in specs):
        raise ValueError("evaluation specs scored together may differ in seen_len only")
    spec = specs[0]
    was_training = isinstance(scorer, torch.nn.Module) and scorer.training
    if isinstance(scorer, torch.nn.Module):
        scorer.eval()
    short, long, long_codes = query_histories(
        timelines, queries, spec.short_len, spec.long_len, inputs.codes
    )
    features = inputs.features
    with_ranker = with_rank and isinstance(scorer, GRank) and scorer.config.use_ranker
    ranked: list[dict[str, list[np.ndarray]]] = [{} for _ in specs]
    for start in range(0, len(queries), spec.batch_size):
        rows = slice(start, min(start + spec.batch_size, len(queries)))
        days = queries.days[rows]
        user = None
        if features is not None:
            user = features.user_context(
                long[rows],
                None if long_codes is None else long_codes[rows],
                timelines.user_ids[queries.users[rows]],
                days,
                device,
            )
        scores = _all_scores(scorer, torch.as_tensor(short[rows], device=device), user, days)
        long_b = torch.as_tensor(long[rows], device=device)
        masks = [
            _excluded(timelines, queries, rows, scores.shape[1], each, inputs.servable, device)
            for each in specs
        ]
        first = _stages(scorer, scores, masks[0], long_b, days, features, spec.k1, with_ranker)
        for i, mask in enumerate(masks):
            staged = first
            differ = (mask != masks[0]).any(dim=1).nonzero().squeeze(1)
            if len(differ):
                own = _stages(
                    scorer,
                    scores[differ],
                    mask[differ],
                    long_b[differ],
                    days[differ.cpu().numpy()],
                    features,
                    spec.k1,
                    with_ranker,
                )
                staged = {
                    stage: top.index_copy(0, differ, own[stage]) for stage, top in first.items()
                }
            for stage, top in staged.items():
                ranked[i].setdefault(stage, []).append(top.cpu().numpy())
    if was_training and isinstance(scorer, torch.nn.Module):
        scorer.train()
    return [{stage: np.concatenate(parts) for stage, parts in each.items()} for each in ranked]


def rankings(
    scorer: Scorer,
    timelines: Timelines,
    queries: Queries,
    spec: EvalConfig,
    device: torch.device,
    inputs: EvalInputs = NO_INPUTS,
    with_rank: bool = True,
) -> dict[str, np.ndarray]:
    """Top items per query and stage: ``generator`` (MIPS top, seen filtered) and, for a
    GRank with a Ranker, ``rank`` (its order of the top ``k1``)."""
    return rankings_by_filter(scorer, timelines, queries, [spec], device, inputs, with_rank)[0]


def _stage_metrics(
    ranked: dict[str, np.ndarray], queries: Queries, intervals: bool = False
) -> dict[str, dict[str, float]]:
    return {
        f"{stage}/filtered": ranking_metrics(
            top,
            queries.relevant_offsets,
            queries.relevant_items,
            RECALL_KS,
            NDCG_KS,
            queries.weights,
            queries.users if intervals else None,
        )
        for stage, top in ranked.items()
    }


def evaluate(
    scorer: Scorer,
    timelines: Timelines,
    queries: Queries,
    spec: EvalConfig,
    device: torch.device,
    inputs: EvalInputs = NO_INPUTS,
    with_rank: bool = True,
) -> dict[str, dict[str, float]]:
    """Mean metrics per stage, e.g. ``out["generator/filtered"]["recall@10"]`` (weighted by
    ``queries.weights`` when set). ``with_rank=False`` skips stage 2 (early stopping
    watches the Generator only)."""
    ranked = rankings(scorer, timelines, queries, spec, device, inputs, with_rank)
    return _stage_metrics(ranked, queries)


def evaluate_by_filter(
    scorer: Scorer,
    timelines: Timelines,
    queries: Queries,
    specs: Sequence[EvalConfig],
    device: torch.device,
    inputs: EvalInputs = NO_INPUTS,
    intervals: bool = False,
) -> list[dict[str, dict[str, float]]]:
    """:func:`evaluate` under each of ``specs`` (differing in ``seen_len`` only), from one
    pass of the model (:func:`rankings_by_filter`); ``intervals`` adds each metric's 95%
    bootstrap interval over the queries' users (``training.metrics.ranking_metrics``)."""
    ranked = rankings_by_filter(scorer, timelines, queries, specs, device, inputs)
    return [_stage_metrics(each, queries, intervals) for each in ranked]


def headline(metrics: dict[str, dict[str, float]], metric: str) -> float:
    """``metric`` of the final stage (rank if present), seen filtered."""
    stage = "rank/filtered" if "rank/filtered" in metrics else "generator/filtered"
    if metric not in metrics[stage]:
        stage = "generator/filtered"
    return metrics[stage][metric]


def final_stage(ranked: dict[str, np.ndarray]) -> np.ndarray:
    """What a user is served: the Ranker's order where there is one, else the Generator's."""
    return ranked.get("rank", ranked["generator"])


def query_records(
    scorers: dict[str, Scorer | None],
    timelines: Timelines,
    queries: Queries,
    spec: EvalConfig,
    device: torch.device,
    inputs: dict[str, EvalInputs],
) -> pa.Table:
    """Per query: ``day``, ``user_id`` and ``<name>.<metric>`` of each scorer's final stage.

    A scorer given as None (no published model yet) gets NaN columns, so evidence tables
    of different days share one schema. This is what the gate pools over days.
    """
    columns: dict[str, np.ndarray] = {
        "day": queries.days.astype(np.int64),
        "user_id": timelines.user_ids[queries.users].astype(np.int64),
    }
    for name, scorer in scorers.items():
        if scorer is None:
            for metric in GATE_METRICS:
                columns[f"{name}.{metric}"] = np.full(len(queries), np.nan)
            continue
        top = final_stage(rankings(scorer, timelines, queries, spec, device, inputs[name]))
        per_query = per_query_metrics(
            top, queries.relevant_offsets, queries.relevant_items, RECALL_KS, NDCG_KS
        )
        for metric in GATE_METRICS:
            columns[f"{name}.{metric}"] = per_query[metric].astype(np.float64)
    return pa.table(columns)


def summarize(records: pa.Table) -> dict[str, dict[str, float]]:
    """Mean of every ``<model>.<metric>`` column (NaN rows skipped), by model."""
    out: dict[str, dict[str, float]] = {}
    for name in records.column_names[2:]:
        model, metric = name.split(".", 1)
        values = records[name].to_numpy(zero_copy_only=False).astype(np.float64)
        if not np.isnan(values).all():
            out.setdefault(model, {})[metric] = float(np.nanmean(values))
    return out


def write_chart(path: Path, summary: dict[str, dict[str, float]], loss_curve: list[float]) -> None:
    """PNG: R@10, R@50 and N@10 per model (seen filtered), and the training loss per epoch."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curve) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(summary), 1)
    for i, (name, metrics) in enumerate(summary.items()):
        values = [metrics.get(m, 0.0) for m in GATE_METRICS]
        bars.bar(np.arange(len(GATE_METRICS)) + i * width, values, width, label=name)
    bars.set_xticks(np.arange(len(GATE_METRICS)) + 0.4 - width / 2, list(GATE_METRICS))
    bars.set_title("next-day metrics, seen items filtered")
    bars.legend(fontsize=8)
    curve.plot(range(1, len(loss_curve) + 1), loss_curve, marker="o")
    curve.set_xlabel("epoch")
    curve.set_title("training loss")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
