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
    users: np.ndarray | None = None,
) -> dict[str, float]:
    """Means of :func:`per_query_metrics`, weighted by ``weights`` when given; with the
    queries' ``users``, each mean's 95% interval too, as ``<metric>.low`` / ``.high``
    (:func:`user_bootstrap_interval`)."""
    per_query = per_query_metrics(ranked, relevant_offsets, relevant_items, recall_ks, ndcg_ks)
    out = {name: float(np.average(v, weights=weights)) for name, v in per_query.items()}
    if users is not None:
        for name, values in per_query.items():
            out[f"{name}.low"], out[f"{name}.high"] = user_bootstrap_interval(
                values, users, weights
            )
    return out


def user_bootstrap_interval(
    values: np.ndarray,
    users: np.ndarray,
    weights: np.ndarray | None = None,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap interval of the (``weights``-weighted) mean of ``values``, resampling
    whole users with replacement.

    A user's queries are drawn together: many targets of one user are one unit of
    evidence, so the interval is as wide as that many users make it, not that many queries.
    """
    unique, index = np.unique(users, return_inverse=True)
    weight = np.ones(len(values)) if weights is None else weights
    sums = np.bincount(index, weights=weight * values, minlength=len(unique))
    totals = np.bincount(index, weights=weight, minlength=len(unique))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(unique), size=(resamples, len(unique)))
    means = sums[draws].sum(axis=1) / totals[draws].sum(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)
