"""The /recommend pipeline over one loaded snapshot: lookup → Generator → flat MIPS → Ranker.

A whole micro-batch is scored against the single snapshot reference it picked up at
its start, so a hot swap in the middle of a batch cannot mix vectors of two models.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from serving.bundle import LoadedSnapshot
from serving.encoding import encode_users, user_columns
from serving.sequences import UserHistory, UserSource
from training.inputs import seen_items


@dataclass(frozen=True)
class RecRequest:
    """One validated request."""

    user_id: int
    k: int


@dataclass
class RecResult:
    """Top-k item ids with scores (None for a fallback), the version and stage timings.

    ``fallback`` names why the answer is the popularity list, or is None for a
    personalised answer.
    """

    user_id: int
    items: list[int]
    scores: list[float | None]
    version: str
    fallback: str | None
    timings_ms: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1


UNKNOWN_USER = "unknown user: the most popular items"
NO_MODEL = "no model has passed the quality gate yet: the most popular items"


class NotReadyError(Exception):
    """No verified snapshot is loaded yet."""


class Recommender:
    """Scores batches of requests; ``current`` returns the snapshot to use (hot-swappable)."""

    def __init__(
        self,
        current: Callable[[], LoadedSnapshot | None],
        source: UserSource,
        k1: int,
        filter_seen: bool,
    ) -> None:
        self._current = current
        self._source = source
        self._k1 = k1
        self._filter_seen = filter_seen

    def recommend_batch(self, requests: Sequence[RecRequest]) -> list[RecResult]:
        """Score all ``requests`` against one snapshot; unknown users get popular items."""
        snap = self._current()
        if snap is None:
            raise NotReadyError("no verified snapshot loaded yet")
        started = time.perf_counter()
        columns = () if snap.model is None else user_columns(snap.model.config)
        histories = self._source.get([r.user_id for r in requests], columns)
        t_lookup = time.perf_counter()
        known = [r for r in requests if histories.get(r.user_id) is not None]
        ranked: dict[int, tuple[list[int], list[float]]] = {}
        t_gen = t_mips = t_lookup
        if known and snap.model is not None:
            seqs = [histories[r.user_id] for r in known]
            ranked, t_gen, t_mips = self._score(snap, known, seqs)  # type: ignore[arg-type]
        done = time.perf_counter()
        timings = {
            "lookup": (t_lookup - started) * 1e3,
            "generator": (t_gen - t_lookup) * 1e3,
            "mips": (t_mips - t_gen) * 1e3,
            "ranker": (done - t_mips) * 1e3 if ranked else 0.0,
        }
        results = []
        for request in requests:
            if request.user_id in ranked:
                items, scores = ranked[request.user_id]
                results.append(
                    RecResult(
                        request.user_id,
                        items[: request.k],
                        list(scores[: request.k]),
                        snap.version,
                        None,
                        timings,
                        len(requests),
                    )
                )
                continue
            history = histories.get(request.user_id)
            seen = set() if history is None or not self._filter_seen else set(history.long)
            popular = [int(i) for i in snap.popular_items if int(i) not in seen][: request.k]
            results.append(
                RecResult(
                    request.user_id,
                    popular,
                    [None] * len(popular),
                    snap.version,
                    NO_MODEL if snap.model is None else UNKNOWN_USER,
                    timings,
                    len(requests),
                )
            )
        return results

    def _score(
        self, snap: LoadedSnapshot, requests: Sequence[RecRequest], seqs: Sequence[UserHistory]
    ) -> tuple[dict[int, tuple[list[int], list[float]]], float, float]:
        """Generator → MIPS (top k1 unseen) → Ranker for users that have a history."""
        model, mips = snap.model, snap.mips
        assert model is not None and mips is not None
        cfg = model.config
        with torch.inference_mode():
            short, user = encode_users(cfg, seqs)
            queries = model.user_vectors(short, user).float().cpu().numpy()
            t_gen = time.perf_counter()
            # the seen filter: the online long sequence's items, the rule evaluation applies
            seen = [
                {int(i) for i in seen_items(np.array(s.long, dtype=np.int64), None)}
                if self._filter_seen
                else set()
                for s in seqs
            ]
            # headroom: seen items and rows outside the catalogue (padding, retired) drop out
            unservable = mips.size - snap.n_servable
            fetch = min(self._k1 + max(len(s) for s in seen) + unservable, mips.size)
            _, rows = mips.search(queries, fetch)
            width = min(self._k1, snap.n_servable)
            candidates = np.zeros((len(seqs), width), dtype=np.int64)
            for b, row in enumerate(rows):
                row = row[row >= 0]
                ids = [int(i) for i in row[snap.servable[row]] if int(i) not in seen[b]]
                candidates[b, : min(width, len(ids))] = ids[:width]
            t_mips = time.perf_counter()
            cand = torch.from_numpy(candidates)
            scores = model.generator_scores(torch.from_numpy(queries), cand)
            if cfg.use_ranker:
                item_features = None if snap.item_features is None else snap.item_features[cand]
                assert user.long_seq is not None
                scores = model.rank_scores(user.long_seq, cand, scores, item_features)
            scores = scores.float().masked_fill(cand == 0, float("-inf"))
            order = torch.argsort(scores, dim=1, descending=True)
        ranked: dict[int, tuple[list[int], list[float]]] = {}
        for b, request in enumerate(requests):
            keep = [int(j) for j in order[b] if candidates[b, int(j)] != 0]
            ranked[request.user_id] = (
                [int(candidates[b, j]) for j in keep],
                [float(scores[b, j]) for j in keep],
            )
        return ranked, t_gen, t_mips
