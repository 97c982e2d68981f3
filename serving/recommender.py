"""The /recommend pipeline over one loaded snapshot: lookup → Generator → flat MIPS → Ranker.

A whole micro-batch is scored against the single snapshot reference it picked up at
its start, so a hot swap in the middle of a batch cannot mix vectors of two models.
"""

from __future__ import annotations

import io
import json
import mmap
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load

from serving.mips import ExactMIPS, MipsOptions, build_mips
from serving.sequences import SequenceSource, UserSequences
from serving.snapshots import (
    EMBEDDINGS_FILE,
    ITEM_IDS_FILE,
    NETWORK_CONFIG_FILE,
    NETWORK_FILE,
    POPULAR_FILE,
    SnapshotError,
    read_verified,
)
from training.model import ITEM_TABLE_KEY, GRank, GRankConfig


@dataclass(frozen=True)
class LoadedSnapshot:
    """A verified snapshot in memory: its searcher, catalogue, fallback list and model.

    MIPS rows are item ids (the matrix is the model's item table).
    """

    version: str
    manifest: dict[str, Any]
    created_at: float
    servable: np.ndarray  # bool per table row: may MIPS return it (the catalogue)
    popular_items: np.ndarray
    model: GRank
    mips: ExactMIPS

    @cached_property
    def n_servable(self) -> int:
        return int(self.servable.sum())


def load_snapshot(folder: Path, mips: MipsOptions | None = None) -> LoadedSnapshot:
    """Verify ``folder`` (checksums) and load it; raises :class:`SnapshotError` if unusable.

    The matrix bytes read for verification become the model's item table and the MIPS
    corpus at once (no copy), so a swap costs one read and one hash of the matrix.
    """
    manifest, files = read_verified(folder)
    try:
        matrix = _npy(files[EMBEDDINGS_FILE])
        item_ids = _npy(files[ITEM_IDS_FILE])
        popular = _npy(files[POPULAR_FILE])
        config = GRankConfig.from_dict(json.loads(bytes(files[NETWORK_CONFIG_FILE]))["config"])
        with torch.device("meta"):  # no random init of weights that are overwritten next
            model = GRank(config)
        missing, unexpected = model.load_state_dict(
            load(bytes(files[NETWORK_FILE])), strict=False, assign=True
        )
        if missing != [ITEM_TABLE_KEY] or unexpected:
            raise ValueError(f"network weights: missing {missing}, unexpected {unexpected}")
        if matrix.dtype != np.float32:
            raise ValueError(f"item matrix has dtype {matrix.dtype}, expected float32")
        with warnings.catch_warnings():  # the mapping is read-only, and inference never writes
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            model.share_item_table(torch.from_numpy(matrix))
    except (KeyError, ValueError, RuntimeError) as exc:
        raise SnapshotError(f"snapshot {folder.name} cannot be loaded: {exc}") from exc
    if item_ids.ndim != 1 or (item_ids.size and not 0 < item_ids.min() <= item_ids.max()):
        raise SnapshotError(f"snapshot {folder.name}: item ids must be positive")
    if item_ids.size and item_ids.max() >= matrix.shape[0]:
        raise SnapshotError(f"snapshot {folder.name}: item ids exceed the {len(matrix)}-row table")
    if manifest.get("item_count") != item_ids.size or manifest.get("dim") != matrix.shape[1]:
        raise SnapshotError(f"snapshot {folder.name}: matrix shape disagrees with its manifest")
    servable = np.zeros(matrix.shape[0], dtype=bool)
    servable[item_ids] = True
    created = datetime.fromisoformat(manifest["created_at"]).timestamp()
    return LoadedSnapshot(
        version=folder.name,
        manifest=manifest,
        created_at=created,
        servable=servable,
        popular_items=popular,
        model=model.eval(),
        mips=build_mips(matrix, mips),
    )


def _npy(data: bytes | mmap.mmap) -> np.ndarray:
    """An ``.npy`` file's array viewing ``data`` (no copy; pickled object arrays refused)."""
    stream = io.BytesIO(data[: 1 << 16])  # the header only
    major, _ = np.lib.format.read_magic(stream)
    read_header = (
        np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = read_header(stream)
    if dtype.hasobject or fortran:
        raise ValueError("snapshot arrays must be C-ordered plain numbers")
    return np.frombuffer(data, dtype=dtype, offset=stream.tell()).reshape(shape)


@dataclass(frozen=True)
class RecRequest:
    """One validated request."""

    user_id: int
    k: int


@dataclass
class RecResult:
    """Top-k item ids with scores (None for the fallback), the version and stage timings."""

    user_id: int
    items: list[int]
    scores: list[float | None]
    version: str
    fallback: bool
    timings_ms: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1


class NotReadyError(Exception):
    """No verified snapshot is loaded yet."""


class Recommender:
    """Scores batches of requests; ``current`` returns the snapshot to use (hot-swappable)."""

    def __init__(
        self,
        current: Callable[[], LoadedSnapshot | None],
        source: SequenceSource,
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
        histories = self._source.get([r.user_id for r in requests])
        t_lookup = time.perf_counter()
        known = [r for r in requests if histories.get(r.user_id) is not None]
        ranked: dict[int, tuple[list[int], list[float]]] = {}
        t_gen = t_mips = t_lookup
        if known:
            seqs = [histories[r.user_id] for r in known]
            ranked, t_gen, t_mips = self._score(snap, known, seqs)  # type: ignore[arg-type]
        done = time.perf_counter()
        timings = {
            "lookup": (t_lookup - started) * 1e3,
            "generator": (t_gen - t_lookup) * 1e3,
            "mips": (t_mips - t_gen) * 1e3,
            "ranker": (done - t_mips) * 1e3 if known else 0.0,
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
                        False,
                        timings,
                        len(requests),
                    )
                )
            else:
                popular = [int(i) for i in snap.popular_items[: request.k]]
                results.append(
                    RecResult(
                        request.user_id,
                        popular,
                        [None] * len(popular),
                        snap.version,
                        True,
                        timings,
                        len(requests),
                    )
                )
        return results

    def _score(
        self, snap: LoadedSnapshot, requests: Sequence[RecRequest], seqs: Sequence[UserSequences]
    ) -> tuple[dict[int, tuple[list[int], list[float]]], float, float]:
        """Generator → MIPS (top k1 unseen) → Ranker for users that have a history."""
        model = snap.model
        cfg = model.config
        with torch.inference_mode():
            short = _left_pad([s.short for s in seqs], cfg.short_seq_len)
            queries = model.user_vectors(short).float().cpu().numpy()
            t_gen = time.perf_counter()
            seen = [set(s.long) | set(s.short) if self._filter_seen else set() for s in seqs]
            # headroom: seen items and rows outside the catalogue (padding, retired) drop out
            unservable = snap.mips.size - snap.n_servable
            fetch = min(self._k1 + max(len(s) for s in seen) + unservable, snap.mips.size)
            _, rows = snap.mips.search(queries, fetch)
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
                long = _left_pad([s.long for s in seqs], cfg.long_seq_len)
                scores = model.rank_scores(long, cand, scores)
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


def _left_pad(sequences: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    """[B, length] LongTensor of the newest ``length`` ids of each sequence, left-padded with 0."""
    out = np.zeros((len(sequences), length), dtype=np.int64)
    for b, seq in enumerate(sequences):
        tail = list(seq)[-length:]
        if tail:
            out[b, length - len(tail) :] = tail
    return torch.from_numpy(out)
