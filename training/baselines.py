"""Baselines on the same data path and evaluation: popularity and a two-tower DSSM.

(The third baseline, Generator-only, is :class:`training.model.GRank` with the auxiliary
path and the Ranker switched off in its config.) Both expose the scorer interface the
evaluation uses: ``user_vectors(short_seq)`` and ``item_vectors()``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from training.features import FeatureHistory


class Popularity(nn.Module):
    """Everyone gets the items most frequent among the training targets."""

    def __init__(self, counts: np.ndarray) -> None:
        super().__init__()
        # log counts keep the scores finite and the order identical
        self.scores: torch.Tensor
        self.register_buffer("scores", torch.log1p(torch.as_tensor(counts, dtype=torch.float32)))

    def user_vectors(self, short_seq: torch.Tensor) -> torch.Tensor:
        return torch.ones(short_seq.shape[0], 1, device=short_seq.device)

    def item_vectors(self) -> torch.Tensor:
        return self.scores[:, None]


class RecentPopularity:
    """Everyone gets the items with the most events in a trailing window, as of the day
    before the prediction: ranked by an ``item_features`` count column (e.g. ``pop_7d``),
    the popularity a team would serve from this feature store."""

    def __init__(self, history: FeatureHistory, column: str) -> None:
        if column not in history.spec.item_columns:
            raise ValueError(f"the feature history holds no item column {column!r}")
        self._history = history
        self._column = history.spec.item_columns.index(column)

    def scores(self, days: np.ndarray) -> torch.Tensor:
        """[B, item rows] scores for predictions made on ``days`` (monotone in the count)."""
        table = self._history.item_numeric
        rows = torch.arange(table.shape[1], device=table.device)
        features = self._history.item_features(days, rows.expand(len(days), -1))
        assert features is not None
        return features[..., self._column]


class TwoTower(nn.Module):
    """DSSM: mean-pooled history → MLP (user tower), item embedding → MLP (item tower)."""

    def __init__(self, n_item_rows: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.item_embedding = nn.Embedding(n_item_rows, dim, padding_idx=0)
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
        self.user_tower = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
        )
        self.item_tower = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def user_vectors(self, short_seq: torch.Tensor) -> torch.Tensor:
        present = (short_seq > 0).unsqueeze(-1).float()
        pooled = (self.item_embedding(short_seq) * present).sum(1) / present.sum(1).clamp(min=1.0)
        return self.user_tower(pooled)

    def item_vectors(self) -> torch.Tensor:
        return self.item_tower(self.item_embedding.weight)
