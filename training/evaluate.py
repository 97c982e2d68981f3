"""Full-catalogue evaluation (seen items filtered and unfiltered), the publish gate, the chart.

Stage 1 ("generator") ranks every item by ``user · item`` and keeps the top k1; stage 2
("rank") re-orders those k1 by the Ranker and keeps k2, exactly what serving does.
The gate compares a candidate model with the published one on the same queries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from common.atomic import atomic_write_bytes, atomic_write_text, staging_dir
from common.errors import UserFacingError
from training.checkpoint import load_checkpoint, read_manifest
from training.data import Queries, Timelines, next_day, query_histories, read_timelines
from training.metrics import ranking_metrics
from training.model import GRank

RECALL_KS = (10, 50, 200)
NDCG_KS = (10, 50)
PUBLISHED_FILE = "PUBLISHED"


class Scorer(Protocol):
    """Anything with MIPS vectors: GRank, the baselines."""

    def user_vectors(self, short_seq: torch.Tensor) -> torch.Tensor: ...

    def item_vectors(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class EvalSpec:
    """Cutoffs and lengths of one evaluation run."""

    short_len: int
    long_len: int
    k1: int = 200
    k2: int = 50
    batch_size: int = 512


def _seen_mask(
    timelines: Timelines, queries: Queries, rows: slice, n_rows: int, device: torch.device
) -> torch.Tensor:
    mask = torch.zeros(rows.stop - rows.start, n_rows, dtype=torch.bool, device=device)
    for i, q in enumerate(range(rows.start, rows.stop)):
        history = timelines.sequence(int(queries.users[q]))[: int(queries.cuts[q])]
        mask[i, torch.as_tensor(history[history < n_rows], device=device)] = True
    return mask


@torch.no_grad()
def evaluate(
    scorer: Scorer,
    timelines: Timelines,
    queries: Queries,
    spec: EvalSpec,
    device: torch.device,
    with_rank: bool = True,
) -> dict[str, dict[str, float]]:
    """Metrics per stage and filter mode, e.g. ``out["generator/filtered"]["recall@10"]``.

    ``with_rank=False`` skips stage 2 (early stopping watches the Generator only).
    """
    if len(queries) == 0:
        raise UserFacingError("no evaluation queries (every user has too few events)")
    was_training = isinstance(scorer, torch.nn.Module) and scorer.training
    if isinstance(scorer, torch.nn.Module):
        scorer.eval()
    short, long = query_histories(timelines, queries, spec.short_len, spec.long_len)
    items = scorer.item_vectors()
    n_rows = items.shape[0]
    depth = min(max(RECALL_KS), n_rows - 1)
    with_ranker = with_rank and isinstance(scorer, GRank) and scorer.config.use_ranker
    ranked: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(queries), spec.batch_size):
        rows = slice(start, min(start + spec.batch_size, len(queries)))
        short_b = torch.as_tensor(short[rows], device=device)
        scores = scorer.user_vectors(short_b) @ items.T
        scores[:, 0] = float("-inf")
        seen = _seen_mask(timelines, queries, rows, n_rows, device)
        for mode, mode_scores in (
            ("unfiltered", scores),
            ("filtered", scores.masked_fill(seen, float("-inf"))),
        ):
            top = mode_scores.topk(depth, dim=1).indices
            ranked.setdefault(f"generator/{mode}", []).append(top.cpu().numpy())
            if with_ranker:
                assert isinstance(scorer, GRank)
                candidates = top[:, : min(spec.k1, depth)]
                long_b = torch.as_tensor(long[rows], device=device)
                rank = scorer.rank_scores(long_b, candidates, scores.gather(1, candidates))
                order = rank.argsort(dim=1, descending=True)
                reranked = candidates.gather(1, order)[:, : spec.k2]
                ranked.setdefault(f"rank/{mode}", []).append(reranked.cpu().numpy())
    if was_training and isinstance(scorer, torch.nn.Module):
        scorer.train()
    return {
        name: ranking_metrics(
            np.concatenate(parts),
            queries.relevant_offsets,
            queries.relevant_items,
            RECALL_KS,
            NDCG_KS,
        )
        for name, parts in ranked.items()
    }


def headline(metrics: dict[str, dict[str, float]], metric: str) -> float:
    """The gate's number: ``metric`` of the final stage (rank if present), seen filtered."""
    stage = "rank/filtered" if "rank/filtered" in metrics else "generator/filtered"
    if metric not in metrics[stage]:
        stage = "generator/filtered"
    return metrics[stage][metric]


def gate(candidate: float, published: float | None, tolerance: float) -> tuple[bool, str]:
    """Publishable unless the candidate's recall is below the published one by > tolerance."""
    if published is None:
        return True, f"no published model yet; candidate {candidate:.4f} is publishable"
    if candidate < published - tolerance:
        return False, (
            f"candidate recall {candidate:.4f} is worse than the published model's "
            f"{published:.4f} by more than the tolerance {tolerance}"
        )
    return True, f"candidate {candidate:.4f} vs published {published:.4f} (tolerance {tolerance})"


def read_published(models_dir: Path) -> str | None:
    """The published checkpoint's name (under ``models/checkpoints/``), or None when none yet.

    ``models/PUBLISHED`` is one line of text naming the checkpoint: warm start and the
    serving snapshot (grank/cli/serving.py) read it; only a passing gate rewrites it.
    """
    path = models_dir / PUBLISHED_FILE
    if not path.is_file():
        return None
    name = path.read_text(encoding="utf-8").strip()
    if not name or not (models_dir / "checkpoints" / name).is_dir():
        raise UserFacingError(f"{path} names {name!r}, which is not a checkpoint folder")
    return name


def published_before(models_dir: Path, day: date) -> str | None:
    """The model that was published when day ``day`` was first run, or None.

    Normally ``models/PUBLISHED`` itself. When it already covers ``day`` (a re-run of
    ``day`` after its model was published, or a backfill of an older day), follow the
    ``warm_start_from`` lineage back to the first model tested before ``day``: re-runs
    then warm-start from, and are gated against, what the original run saw.
    """
    name = read_published(models_dir)
    while name is not None:
        manifest = read_manifest(models_dir / "checkpoints" / name)
        if date.fromisoformat(manifest["test_day"]) < day:
            return name
        name = manifest.get("warm_start_from")
    return None


def write_published(models_dir: Path, name: str) -> None:
    """Atomically point ``models/PUBLISHED`` at checkpoint ``name`` (readers never see half)."""
    atomic_write_text(models_dir / PUBLISHED_FILE, name + "\n")


def write_chart(
    path: Path, results: dict[str, dict[str, dict[str, float]]], loss_curve: list[float]
) -> None:
    """PNG: recall@K (seen filtered) per model, and the training loss per epoch."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curve) = plt.subplots(1, 2, figsize=(11, 4))
    ks = [k for k in RECALL_KS]
    width = 0.8 / max(len(results), 1)
    for i, (name, metrics) in enumerate(results.items()):
        stage = "rank/filtered" if "rank/filtered" in metrics else "generator/filtered"
        values = [
            metrics[stage].get(f"recall@{k}", metrics["generator/filtered"].get(f"recall@{k}", 0))
            for k in ks
        ]
        bars.bar(np.arange(len(ks)) + i * width, values, width, label=name)
    bars.set_xticks(np.arange(len(ks)) + 0.4 - width / 2, [f"R@{k}" for k in ks])
    bars.set_title("recall@K, seen items filtered")
    bars.legend(fontsize=8)
    curve.plot(range(1, len(loss_curve) + 1), loss_curve, marker="o")
    curve.set_xlabel("epoch")
    curve.set_title("training loss")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def evaluate_day(
    features_dir: Path,
    models_dir: Path,
    day: date,
    spec: EvalSpec,
    gate_metric: str,
    tolerance: float,
    device: torch.device,
    landed: frozenset[date] | None = None,
) -> tuple[bool, str, Path]:
    """Next-day evaluation of the model tested on ``day`` against the published one; the gate.

    Both models rank for the same queries (each user active on ``day``, history up to the
    day before, all of the day's items relevant). Writes ``evaluations/<day>/metrics.json``
    and ``chart.png``; when the gate passes, points ``models/PUBLISHED`` at the new model.
    Returns (publishable, reason, evaluation folder).
    """
    name = day.isoformat()
    model, manifest = load_checkpoint(models_dir / "checkpoints" / name, device=str(device))
    # read from the model's first training day, as `grank train` does, so the seen filter
    # (and therefore every number) matches the one measured at training time
    first = date.fromisoformat(manifest["data_first_day"])
    timelines = read_timelines(features_dir, first, day, landed)
    _, _, queries = next_day(timelines, day)
    results = {"grank": evaluate(model, timelines, queries, spec, device)}
    published_name = published_before(models_dir, day)
    published_score = None
    if published_name is not None:
        published, _ = load_checkpoint(models_dir / "checkpoints" / published_name, str(device))
        results["published"] = evaluate(published, timelines, queries, spec, device)
        published_score = headline(results["published"], gate_metric)
    for baseline, metrics in manifest.get("metrics", {}).items():
        if baseline != "grank":
            results[baseline] = metrics  # measured by `grank train` on the same day
    score = headline(results["grank"], gate_metric)
    ok, reason = gate(score, published_score, tolerance)
    folder = models_dir / "evaluations" / day.isoformat()
    report = {
        "day": day.isoformat(),
        "checkpoint": name,
        "published_before": published_name,
        "gate": {
            "metric": gate_metric,
            "tolerance": tolerance,
            "publishable": ok,
            "reason": reason,
        },
        "n_queries": len(queries),
        "results": results,
    }
    with staging_dir(folder) as staging:
        (staging / "metrics.json").write_text(json.dumps(report, indent=2, sort_keys=True))
        write_chart(
            staging / "chart.png", results, [h["loss"] for h in manifest.get("history", [])]
        )
    if ok:
        write_published(models_dir, name)
    return ok, reason, folder
