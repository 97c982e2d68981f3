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
from serving.sequences import ItemSource, UserHistory, UserSource
from serving.snapshots import (
    EMBEDDINGS_FILE,
    ITEM_IDS_FILE,
    NETWORK_CONFIG_FILE,
    NETWORK_FILE,
    POPULAR_FILE,
    SnapshotError,
    read_verified,
)
from training.inputs import (
    behavior_flags,
    encode_categorical,
    scale_numeric,
    seen_items,
    standardize_items,
)
from training.model import ITEM_TABLE_KEY, GRank, GRankConfig, UserContext


@dataclass(frozen=True)
class LoadedSnapshot:
    """A verified snapshot in memory: its searcher, catalogue, fallback list and model.

    MIPS rows are item ids (the matrix is the model's item table). A popularity-only
    snapshot (no model has passed the gate yet) has no model and no searcher. When the
    model's Ranker reads item features, ``item_features`` holds them for every table row
    (scaled, read from the online store when the snapshot was loaded).
    """

    version: str
    manifest: dict[str, Any]
    created_at: float
    servable: np.ndarray  # bool per table row: may MIPS return it (the catalogue)
    popular_items: np.ndarray
    model: GRank | None
    mips: ExactMIPS | None
    item_features: torch.Tensor | None = None

    @cached_property
    def n_servable(self) -> int:
        return int(self.servable.sum())


def load_snapshot(
    folder: Path, mips: MipsOptions | None = None, items: ItemSource | None = None
) -> LoadedSnapshot:
    """Verify ``folder`` (checksums) and load it; raises :class:`SnapshotError` if unusable.

    The matrix bytes read for verification become the model's item table and the MIPS
    corpus at once (no copy), so a swap costs one read and one hash of the matrix.
    ``items`` provides the item features a Ranker reads (looked up once per load).
    """
    manifest, files = read_verified(folder)
    try:
        item_ids = _npy(files[ITEM_IDS_FILE])
        popular = _npy(files[POPULAR_FILE])
    except (KeyError, ValueError) as exc:
        raise SnapshotError(f"snapshot {folder.name} cannot be loaded: {exc}") from exc
    created = datetime.fromisoformat(manifest["created_at"]).timestamp()
    if EMBEDDINGS_FILE not in files:  # popularity only: no model has passed the gate yet
        return LoadedSnapshot(
            folder.name, manifest, created, np.zeros(0, bool), popular, None, None
        )
    model, matrix = _load_model(folder, files)
    if item_ids.ndim != 1 or (item_ids.size and not 0 < item_ids.min() <= item_ids.max()):
        raise SnapshotError(f"snapshot {folder.name}: item ids must be positive")
    if item_ids.size and item_ids.max() >= matrix.shape[0]:
        raise SnapshotError(f"snapshot {folder.name}: item ids exceed the {len(matrix)}-row table")
    if manifest.get("item_count") != item_ids.size or manifest.get("dim") != matrix.shape[1]:
        raise SnapshotError(f"snapshot {folder.name}: matrix shape disagrees with its manifest")
    servable = np.zeros(matrix.shape[0], dtype=bool)
    servable[item_ids] = True
    return LoadedSnapshot(
        version=folder.name,
        manifest=manifest,
        created_at=created,
        servable=servable,
        popular_items=popular,
        model=model,
        mips=build_mips(matrix, mips),
        item_features=_item_features(model, items, folder.name),
    )


def _load_model(folder: Path, files: dict[str, bytes | mmap.mmap]) -> tuple[GRank, np.ndarray]:
    """The snapshot's network with the item matrix as its (shared, read-only) item table."""
    try:
        matrix = _npy(files[EMBEDDINGS_FILE])
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
    return model.eval(), matrix


def _item_features(model: GRank, items: ItemSource | None, version: str) -> torch.Tensor | None:
    """[table rows, Fi] encoded features of every item row, when the Ranker reads any."""
    if not model.config.inputs.item_numeric or not model.config.use_ranker:
        return None
    if items is None:
        raise SnapshotError(f"snapshot {version}: its Ranker reads item features, no source given")
    return item_feature_table(model.config, items)


def item_feature_table(config: GRankConfig, items: ItemSource) -> torch.Tensor:
    """[table rows, Fi]: every item row's features from the store, encoded as training does
    (scaled, then standardized across the day's items)."""
    columns = config.inputs.item_numeric
    rows = np.arange(1, config.n_item_rows, dtype=np.int64)
    table = np.zeros((config.n_item_rows, len(columns)), dtype=np.float32)
    table[1:] = encode_items(items, columns, rows)
    return torch.from_numpy(standardize_items(table))


def encode_items(items: ItemSource, columns: Sequence[str], item_ids: np.ndarray) -> np.ndarray:
    """[len(item_ids), len(columns)] item features from the store, scaled as training does."""
    values = items.item_features(item_ids, columns)
    raw = np.array(
        [[np.nan if v is None else float(v) for v in values[column]] for column in columns]
    )
    return scale_numeric(raw.T.reshape(len(item_ids), len(columns)))


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


def user_columns(config: GRankConfig) -> tuple[str, ...]:
    """The profile columns a model reads from the online store."""
    return (*config.inputs.user_numeric, *config.inputs.user_categorical)


def encode_users(
    config: GRankConfig, histories: Sequence[UserHistory]
) -> tuple[torch.Tensor, UserContext]:
    """The Generator's inputs for these users, encoded exactly as training encodes them.

    Sequences are left-padded to the model's lengths; behaviour flags come from the long
    sequence's event types and values; profile columns are scaled or hashed
    (training/inputs.py, the one definition both sides share).
    """
    spec = config.inputs
    short = _left_pad([h.short for h in histories], config.short_seq_len)
    long = _left_pad([h.long for h in histories], config.long_seq_len)
    flags = None
    if spec.behaviors:
        rows = []
        for h in histories:
            kinds = np.array(h.event_types or [""] * len(h.long), dtype=object)
            values = np.array(h.values or [np.nan] * len(h.long), dtype=np.float64)
            rows.append(behavior_flags(spec.behaviors, kinds, values))
        flags = _left_pad(rows, config.long_seq_len)
    numeric = categorical = None
    if spec.user_numeric:
        raw = np.array([[_number(h.features.get(c)) for c in spec.user_numeric] for h in histories])
        numeric = torch.from_numpy(scale_numeric(raw).reshape(len(histories), -1))
    if spec.user_categorical:
        categorical = torch.from_numpy(
            encode_categorical(
                spec.user_categorical,
                [[h.features.get(c) for c in spec.user_categorical] for h in histories],
                spec.categorical_buckets,
            )
        )
    return short, UserContext(long, flags, numeric, categorical)


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


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


def _left_pad(
    sequences: Sequence[Sequence[int]] | Sequence[np.ndarray], length: int
) -> torch.Tensor:
    """[B, length] LongTensor of the newest ``length`` ids of each sequence, left-padded with 0."""
    out = np.zeros((len(sequences), length), dtype=np.int64)
    for b, seq in enumerate(sequences):
        tail = list(seq)[-length:]
        if tail:
            out[b, length - len(tail) :] = tail
    return torch.from_numpy(out)
