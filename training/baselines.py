"""Baselines on the same data path and evaluation: popularity and a two-tower DSSM.

(The third baseline, Generator-only, is :class:`training.model.GRank` with the auxiliary
path and the Ranker switched off in its config.) Both expose the scorer interface the
evaluation uses: ``user_vectors(short_seq)`` and ``item_vectors()``.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    the popularity a team would serve from this feature store.

    Items with the same count are ordered by ``tie_break`` (the all-time count), then by
    item id: the order serving's popularity fallback answers with. Left to ``topk``, ties
    fall in whatever order the device's kernel picks, and on ML-1M's global temporal
    split that moved the last-week baseline's N@10 by 4% between a CPU and a GPU.
    """

    def __init__(self, history: FeatureHistory, column: str, tie_break: str) -> None:
        for name in (column, tie_break):
            if name not in history.spec.item_columns:
                raise ValueError(f"the feature history holds no item column {name!r}")
        self._history = history
        self._column = history.spec.item_columns.index(column)
        self._tie_break = history.spec.item_columns.index(tie_break)

    def scores(self, days: np.ndarray) -> torch.Tensor:
        """[B, item rows] scores for predictions made on ``days``: each row's place in the
        day's order, n_rows for the first down to 1 (exact in float32 below 2^24 rows)."""
        unique, inverse = np.unique(np.asarray(days), return_inverse=True)
        table = self._history.item_table
        n_rows = table.shape[1]
        rows = torch.arange(n_rows, device=table.device)
        features = self._history.item_features(unique, rows.expand(len(unique), -1))
        assert features is not None
        # two stable sorts: by the tie-break, then by the count (equal counts keep that order)
        by_tie = features[..., self._tie_break].sort(dim=1, descending=True, stable=True).indices
        counts = features[..., self._column].gather(1, by_tie)
        order = by_tie.gather(1, counts.sort(dim=1, descending=True, stable=True).indices)
        places = torch.arange(n_rows, 0, -1, dtype=torch.float32, device=table.device)
        scores = torch.empty(len(unique), n_rows, device=table.device)
        scores.scatter_(1, order, places.expand(len(unique), -1))
        return scores[torch.as_tensor(inverse.reshape(-1), device=table.device)]


@dataclass(frozen=True)
class Baselines:
    """The popularity baselines every candidate must beat: name -> ``item_features`` column.

    ``pop_total`` as of the day before is all-time popularity; ``pop_7d`` the last week's
    (the window is ``train.recent_popularity_days``). Equal counts are ordered by
    ``tie_break``, as serving's popularity fallback orders them.
    """

    columns: dict[str, str]
    tie_break: str = "pop_total"

    @property
    def item_columns(self) -> tuple[str, ...]:
        """The ``item_features`` columns the baselines read, each once."""
        return tuple(dict.fromkeys([*self.columns.values(), self.tie_break]))

    def scorers(self, history: FeatureHistory) -> dict[str, RecentPopularity]:
        """One scorer per baseline over ``history`` (which holds :attr:`item_columns`)."""
        return {
            name: RecentPopularity(history, column, self.tie_break)
            for name, column in self.columns.items()
        }


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
