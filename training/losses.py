"""The joint objective ``λ0·L_NTP + λ1·L_SA + λ2·L_CA`` (all InfoNCE-style softmax losses).

- L_NTP: next-token prediction of the Generator: every supervised short-sequence slot and
  the user query token U score their label against the negatives, either the full
  catalogue (exact softmax: affordable below ~100k items, what SASRec-CE uses) or the
  distinct items of the batch with a logQ correction (the paper's in-batch setting).
- L_SA: the auxiliary candidate tokens' scores, target vs in-batch negatives.
- L_CA: the Ranker's cross-attention scores, target vs in-batch negatives, plus
  optionally "hard" negatives drawn from the Generator's own top candidates: at serving
  the Ranker only ever reorders the Generator's top k1, items the in-batch negatives
  (mostly popular, mostly easy) rarely resemble.

In-batch negatives are drawn in proportion to popularity, which biases the softmax
towards penalising popular items; subtracting ``log q(item)`` (q = training frequency)
removes that sampling bias (Yi et al., RecSys 2019). A negative equal to the row's
target is masked, not counted as a negative.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from training.baselines import TwoTower
from training.config import LossWeights
from training.distributed import sum_over_ranks
from training.model import GRank, UserContext


def _no_item_features(candidates: torch.Tensor) -> torch.Tensor | None:
    return None


@dataclass(frozen=True)
class TrainBatch:
    """One step's windows as tensors: sequences, NTP labels, targets and the features.

    ``item_features(candidates)`` returns the [B, K, Fi] features of ``candidates`` [B, K]
    as of each row's prediction day (None for a model that reads none).
    """

    short: torch.Tensor
    long: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor
    user: UserContext | None = None
    item_features: Callable[[torch.Tensor], torch.Tensor | None] = _no_item_features
    # [B, M]: what U predicts per row (0: nothing) as a loss term of its own; None: the
    # target, as one more next-token slot
    query_labels: torch.Tensor | None = None


BatchLoss = Callable[[torch.nn.Module, TrainBatch], tuple[torch.Tensor, dict[str, float]]]


def log_q(counts: np.ndarray, device: torch.device) -> torch.Tensor:
    """log of each item's share of the training targets: the logQ correction's input."""
    share = torch.as_tensor(counts, dtype=torch.float32).clamp(min=1) / max(int(counts.sum()), 1)
    return torch.log(share).to(device)


def in_batch_candidates(targets: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C] candidates per row (column 0 = the row's own target) and the collision mask.

    Row b takes the targets of rows b, b+1, ... (cyclic), so every row gets C-1 other
    in-batch targets as negatives at O(B·C) cost; duplicates of the positive are masked.
    """
    batch = targets.shape[0]
    count = min(count, batch)
    shift = torch.arange(count, device=targets.device)
    index = (torch.arange(batch, device=targets.device)[:, None] + shift[None, :]) % batch
    candidates = targets[index]
    collides = candidates == candidates[:, :1]
    collides[:, 0] = False
    return candidates, collides


def generator_hard_negatives(
    user_vectors: torch.Tensor,
    item_table: torch.Tensor,
    positives: torch.Tensor,
    weights: LossWeights,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, hard_negatives] items drawn uniformly from each row's Generator top ``hard_pool``
    other than its ``positives`` [B, P] (0: none), and [B, P] whether each positive is
    itself in the top ``hard_pool``: whether serving would hand it to the Ranker.

    Padding is never drawn; no gradient flows into the draw. Costs one [B, n_items] score
    matrix per step: cheap for ML-1M's 3.9k items, to be sampled for catalogues of millions.
    """
    with torch.no_grad():
        scores = user_vectors @ item_table.T
        scores[:, 0] = float("-inf")
        width = min(weights.hard_pool, scores.shape[1] - 1 - positives.shape[1])
        cutoff = scores.topk(width, dim=1).values[:, -1:]
        reaches_ranker = (scores.gather(1, positives) >= cutoff) & (positives > 0)
        scores.scatter_(1, positives, float("-inf"))
        pool_scores, pool = scores.topk(width, dim=1)
        # the top holds width items with the positives in it: draw from its other ones
        in_top = (pool_scores >= cutoff).sum(1, keepdim=True).clamp(min=1)
        pick = (torch.rand(len(pool), weights.hard_negatives) * in_top.cpu()).long()
        return pool.gather(1, pick.to(pool.device)), reaches_ranker


def softmax_first(
    logits: torch.Tensor, masked: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy with the positive in column 0 and ``masked`` columns removed."""
    logits = logits.masked_fill(masked, float("-inf"))
    positive = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, positive, reduction=reduction)


def ntp_loss(
    states: torch.Tensor,
    labels: torch.Tensor,
    item_table: torch.Tensor,
    negatives: torch.Tensor,
    weights: LossWeights,
    log_q: torch.Tensor | None,
    later: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token InfoNCE: ``states`` [N, d] score their ``labels`` [N] (> 0).

    ``full``: against every item (exact softmax). ``in_batch``: against ``negatives`` [M]
    (the batch's targets; N·M·d instead of N·n_items·d), logQ-corrected, collisions masked.
    No slot (N = 0: a batch of next-day windows with nothing before their day) is a loss of
    0 that stays in the graph, not an empty mean's NaN.

    ``later`` [N, W - 1] (full softmax only): the items after each label (0: none), scored
    by the same softmax; their mean cross-entropy adds ``weights.future_weight`` times.
    """
    if len(labels) == 0:
        return states.sum() * 0.0
    # the temperature divides the [N, d] states, not the [N, items] logits: the same
    # scores, and dividing the logits (forward and backward) was a tenth of a CPU step
    queries = states / weights.temperature
    if weights.ntp_negatives == "full":
        logits = queries @ item_table.T
        logits[:, 0] = float("-inf")  # padding is never an answer
        if later is None or not bool((known := later > 0).any()):
            return F.cross_entropy(logits, labels)
        log_p = F.log_softmax(logits, dim=1)
        next_loss = -log_p.gather(1, labels[:, None]).mean()
        # padding's column is -inf: read a real one there and drop it by the mask
        later_log_p = log_p.gather(1, torch.where(known, later, labels[:, None]))
        later_loss = -later_log_p[known].mean()
        return next_loss + weights.future_weight * later_loss
    positive = (queries * item_table[labels]).sum(-1, keepdim=True)
    logits = torch.cat([positive, queries @ item_table[negatives].T], dim=1)
    if weights.logq and log_q is not None:
        logits = logits - torch.cat(
            [log_q[labels][:, None], log_q[negatives][None, :].expand(len(labels), -1)], 1
        )
    collides = torch.cat(
        [
            torch.zeros_like(labels[:, None], dtype=torch.bool),
            labels[:, None] == negatives[None, :],
        ],
        1,
    )
    return softmax_first(logits, collides)


def later_labels(labels: torch.Tensor, window: int) -> torch.Tensor | None:
    """[B, L, window - 1]: the items 2..window events after each slot (0: outside the
    window's training events), read from the window's own next-item ``labels`` [B, L]."""
    if window <= 1:
        return None
    shifted = [F.pad(labels[:, ahead:], (0, ahead)) for ahead in range(1, window)]
    return torch.stack(shifted, dim=-1)


def joint_loss(
    model: GRank, batch: TrainBatch, weights: LossWeights, log_q: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss of one batch and its parts (for logging); paths off in the config are skipped."""
    config = model.config
    targets = batch.targets
    candidates, collides = in_batch_candidates(targets, weights.candidates)
    correction = log_q[candidates] if weights.logq and log_q is not None else None
    states, aux_scores = model.generator(
        batch.short, candidates if config.use_aux else None, user=batch.user
    )
    later = later_labels(batch.labels, weights.future_window)
    if batch.query_labels is None:
        slot_labels = torch.cat([batch.labels, targets[:, None]], dim=1)  # U predicts the target
        supervised = slot_labels > 0
        if later is not None:  # U's slot has its target only
            later = torch.cat([later, torch.zeros_like(later[:, :1])], dim=1)
        total = weights.ntp * ntp_loss(
            states[supervised],
            slot_labels[supervised],
            model.item_vectors(),
            targets,
            weights,
            log_q,
            None if later is None else later[supervised],
        )
        parts = {"ntp": float(total.detach())}
    else:
        # U's few serving-situation targets weigh as much as every history slot together
        history, query = states[:, :-1], states[:, -1]
        supervised, served = batch.labels > 0, batch.query_labels > 0
        total = weights.ntp * ntp_loss(
            history[supervised],
            batch.labels[supervised],
            model.item_vectors(),
            targets,
            weights,
            log_q,
            None if later is None else later[supervised],
        )
        parts = {"ntp": float(total.detach())}
        # U's term is the mean over the global batch's (row, label) pairs: a process whose
        # share has few or none must not weigh its pairs as a whole batch's (data parallel)
        served_here = served.sum().double()
        served_all, ranks = sum_over_ranks(served_here)
        if served.any():
            rows, _ = served.nonzero(as_tuple=True)  # U scores each of its day's items
            query_loss = ntp_loss(
                query[rows],
                batch.query_labels[served],
                model.item_vectors(),
                targets,
                weights,
                log_q,
            )
            share = (served_here * ranks / served_all).to(query_loss.dtype)
            total = total + weights.ntp * query_loss * share
            parts["ntp_u"] = float(query_loss.detach())
    if aux_scores is not None:
        logits = aux_scores if correction is None else aux_scores - correction
        sa = softmax_first(logits, collides)
        total = total + weights.sa * sa
        parts["sa"] = float(sa.detach())
    if config.use_ranker:
        user_vectors = model.user_vector_of(states)  # the Ranker reorders what these retrieve
        if weights.ranker_in_batch:
            ca = in_batch_ranker_loss(
                model, user_vectors, batch, candidates, collides, correction, weights
            )
        else:
            ca = top_ranker_loss(model, user_vectors, batch, weights)
        total = total + weights.ca * ca
        parts["ca"] = float(ca.detach())
    return total, parts


def _ranker_scores(
    model: GRank, user_vectors: torch.Tensor, batch: TrainBatch, ranked: torch.Tensor
) -> torch.Tensor:
    """[B, K] Ranker scores of ``ranked``: a residual Ranker learns a correction to the
    Generator's score (detached), not the score, and learns all of it whatever weight
    serving gives it; the popularity prior, chosen after training, is left out."""
    base = model.generator_scores(user_vectors, ranked).detach()
    return model.rank_scores(
        batch.long,
        ranked,
        base,
        batch.item_features(ranked),
        correction_weight=1.0,
        prior_weight=0.0,
    )


def _global_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The ``weight``-ed mean of ``values`` over the global batch (data parallel): a
    process whose share holds few or none must not weigh them as a whole batch's. Every
    value stays in the graph (weight 0), so each process' Ranker gets a gradient."""
    weight = weight.to(values.dtype)
    weight_all, ranks = sum_over_ranks(weight.sum().double())
    return (values * weight).sum() * (ranks / weight_all.clamp(min=1)).to(values.dtype)


def top_ranker_loss(
    model: GRank, user_vectors: torch.Tensor, batch: TrainBatch, weights: LossWeights
) -> torch.Tensor:
    """L_CA as serving uses the Ranker: it reorders the Generator's top ``hard_pool``.

    Each positive (with ``ranker_on_served`` and next-day windows: every served label of
    U's rows, as U's own term; else each row's target) is scored against
    ``hard_negatives`` items drawn uniformly from that top's other items: the row's
    positives are never drawn (the same day's items are not negatives). The uniform draw
    from the list serving shows needs no logQ term. Only a positive inside the top
    teaches: one outside never reaches the Ranker, and learning from it teaches the Ranker
    to lift what the Generator scores low. The loss is the mean over the global batch's
    teaching pairs.
    """
    served = weights.ranker_on_served and batch.query_labels is not None
    positives = batch.query_labels if served else batch.targets[:, None]
    assert positives is not None
    hard, reaches_ranker = generator_hard_negatives(
        user_vectors, model.item_vectors(), positives, weights
    )
    scores = _ranker_scores(model, user_vectors, batch, torch.cat([positives, hard], dim=1))
    n_positives = positives.shape[1]
    negatives = scores[:, n_positives:]
    pairs = torch.cat(
        [scores[:, :n_positives, None], negatives[:, None, :].expand(-1, n_positives, -1)], -1
    )
    per_pair = torch.logsumexp(pairs, dim=-1) - scores[:, :n_positives]
    return _global_mean(per_pair, reaches_ranker)


def in_batch_ranker_loss(
    model: GRank,
    user_vectors: torch.Tensor,
    batch: TrainBatch,
    candidates: torch.Tensor,
    collides: torch.Tensor,
    correction: torch.Tensor | None,
    weights: LossWeights,
) -> torch.Tensor:
    """L_CA over each row's in-batch ``candidates`` (logQ-corrected), plus hard negatives.

    Hard negatives come from the Generator's top ``hard_pool`` uniformly, so they get no
    correction. With ``ranker_on_served`` and next-day windows, the loss is over U's
    served rows only: serving hands the Ranker the top ``k1`` of U at a day's start; the
    regular windows ask it to reorder for the same visit's next item, from a query token
    that never learned them.
    """
    ranked, masked, ranked_q = candidates, collides, correction
    if weights.hard_negatives:
        hard, _ = generator_hard_negatives(
            user_vectors, model.item_vectors(), batch.targets[:, None], weights
        )
        ranked = torch.cat([candidates, hard], dim=1)
        masked = torch.cat([collides, torch.zeros_like(hard, dtype=torch.bool)], dim=1)
        if correction is not None:
            ranked_q = torch.cat([correction, torch.zeros_like(hard, dtype=correction.dtype)], 1)
    scores = _ranker_scores(model, user_vectors, batch, ranked)
    logits = scores if ranked_q is None else scores - ranked_q
    if not (weights.ranker_on_served and batch.query_labels is not None):
        return softmax_first(logits, masked)
    per_row = softmax_first(logits, masked, reduction="none")
    return _global_mean(per_row, (batch.query_labels > 0).any(-1))


def grank_batch_loss(weights: LossWeights, log_q: torch.Tensor | None) -> BatchLoss:
    """The training loop's per-batch loss for GRank (any ablation)."""

    def batch_loss(
        model: torch.nn.Module, batch: TrainBatch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        assert isinstance(model, GRank)
        return joint_loss(model, batch, weights, log_q)

    return batch_loss


def two_tower_batch_loss(weights: LossWeights, log_q: torch.Tensor | None) -> BatchLoss:
    """The DSSM baseline's loss: its user vector scores the target, same negatives as L_NTP."""

    def batch_loss(
        model: torch.nn.Module, batch: TrainBatch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        assert isinstance(model, TwoTower)
        vectors = model.user_vectors(batch.short)
        loss = ntp_loss(vectors, batch.targets, model.item_vectors(), batch.targets, weights, log_q)
        return loss, {"ntp": float(loss.detach())}

    return batch_loss
