"""Ranking metrics over full-catalogue top-K lists (no sampled negatives).

Recall@K = |top-K ∩ relevant| / |relevant| (with one relevant item this is HR@K);
NDCG@K = DCG of the hits / the best DCG reachable with min(K, |relevant|) hits.
"""

from __future__ import annotations

import numpy as np


def hit_matrix(
    ranked: np.ndarray, relevant_offsets: np.ndarray, relevant_items: np.ndarray
) -> np.ndarray:
    """[N, K] booleans: whether the item at each rank of each query is relevant."""
    hits = np.zeros(ranked.shape, dtype=bool)
    for row in range(len(ranked)):
        relevant = relevant_items[relevant_offsets[row] : relevant_offsets[row + 1]]
        hits[row] = np.isin(ranked[row], relevant)
    return hits


def recall_at(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Per query: the share of relevant items found in the top ``k``."""
    return hits[:, :k].sum(axis=1) / np.maximum(n_relevant, 1)


def ndcg_at(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Per query: normalised discounted cumulative gain at ``k``."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (hits[:, :k] * discounts[: hits[:, :k].shape[1]]).sum(axis=1)
    ideal_cum = np.cumsum(discounts)
    ideal = ideal_cum[np.clip(np.minimum(n_relevant, k) - 1, 0, k - 1)]
    return np.where(n_relevant > 0, dcg / ideal, 0.0)


def per_query_metrics(
    ranked: np.ndarray,
    relevant_offsets: np.ndarray,
    relevant_items: np.ndarray,
    recall_ks: tuple[int, ...],
    ndcg_ks: tuple[int, ...],
) -> dict[str, np.ndarray]:
    """``{"recall@K": [Q], "ndcg@K": [Q]}`` for every K not longer than the ranked lists."""
    hits = hit_matrix(ranked, relevant_offsets, relevant_items)
    n_relevant = np.diff(relevant_offsets)
    depth = ranked.shape[1]
    out = {f"recall@{k}": recall_at(hits, n_relevant, k) for k in recall_ks if k <= depth}
    out.update({f"ndcg@{k}": ndcg_at(hits, n_relevant, k) for k in ndcg_ks if k <= depth})
    return out


def ranking_metrics(
    ranked: np.ndarray,
    relevant_offsets: np.ndarray,
    relevant_items: np.ndarray,
    recall_ks: tuple[int, ...],
    ndcg_ks: tuple[int, ...],
    weights: np.ndarray | None = None,
) -> dict[str, float]:
    """Means of :func:`per_query_metrics`, weighted by ``weights`` when given."""
    per_query = per_query_metrics(ranked, relevant_offsets, relevant_items, recall_ks, ndcg_ks)
    return {name: float(np.average(v, weights=weights)) for name, v in per_query.items()}
