"""A snapshot's files, written and read in one place: what a refresh writes, what serving loads.

A bundle is one folder (``embeddings/dt=D/`` after a refresh, :func:`bundle_dir`; each
snapshot version holds a copy of one, plus its manifest)::

    item_embeddings.npy       float32 [table rows, dim]: the model's item table,
                              row i = item i (row 0 = padding, all zeros)
    item_ids.npy              int64: the servable catalogue (what MIPS may return)
    popular_items.npy         int64, most popular first (fallback for unknown users)
    network.safetensors       every other weight of the model that made the table
    network.json              that model's config (vectors and weights are one unit)
    source.json               which checkpoint that was, and its evaluation metrics

While no model has passed the gate, a bundle holds only the last three (the catalogue,
its popularity order and a source naming no checkpoint): serving then answers everyone
from popularity instead of answering nothing.

The matrix *is* the model's item table (row i = item i, row 0 = padding), and the
network file holds every other weight. Storing the table once halves what a snapshot
swap must read and hash at 1M items (docs/serving.md), and serving uses the matrix
bytes directly as both the MIPS corpus and the Generator/Ranker's embedding table.
A refresh copies rows in batches into a memory-mapped ``.npy`` (never a second full
copy in memory), with a progress bar.
"""

from __future__ import annotations

import io
import json
import mmap
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load, save_file
from tqdm import tqdm

from common.atomic import staging_dir
from common.errors import UserFacingError
from serving.config import REFRESH_BATCH_ROWS, MipsConfig
from serving.encoding import item_feature_table
from serving.manifest import SnapshotError, read_verified
from serving.mips import ExactMIPS, build_mips
from serving.sequences import ItemSource
from training.checkpoint import load_checkpoint
from training.model import ITEM_TABLE_KEY, GRank, GRankConfig

EMBEDDINGS_FILE = "item_embeddings.npy"
ITEM_IDS_FILE = "item_ids.npy"
POPULAR_FILE = "popular_items.npy"
NETWORK_FILE = "network.safetensors"
NETWORK_CONFIG_FILE = "network.json"
SOURCE_FILE = "source.json"
CATALOGUE_FILES = frozenset({ITEM_IDS_FILE, POPULAR_FILE, SOURCE_FILE})
MODEL_FILES = frozenset({EMBEDDINGS_FILE, NETWORK_FILE, NETWORK_CONFIG_FILE})


def bundle_dir(embeddings_dir: Path, day: date) -> Path:
    """The folder of ``day``'s bundle: the refresh writes it, publishing reads it."""
    return embeddings_dir / f"dt={day.isoformat()}"


# --- writing: the embedding refresh ----------------------------------------------------


@dataclass(frozen=True)
class RefreshReport:
    """What a refresh wrote: where, how many items, their dimension and the checkpoint used."""

    out_dir: Path
    item_count: int
    dim: int
    checkpoint_manifest: dict[str, object]


def refresh_embeddings(
    checkpoint_dir: Path,
    out_dir: Path,
    item_ids: Sequence[int] | np.ndarray,
    popular_items: Sequence[int] | np.ndarray,
    batch_size: int = REFRESH_BATCH_ROWS,
    progress: bool = True,
    metrics: dict[str, Any] | None = None,
) -> RefreshReport:
    """Write the checkpoint's item table and network, and the servable ids, to ``out_dir``.

    ``item_ids`` are the catalogue to serve (MIPS only ever returns these); ids the model
    has no row for are refused (a model older than the catalogue must be retrained
    first, not served with gaps). Rows outside the catalogue stay in the table: users'
    histories may still name retired items. ``popular_items`` (most popular first) are
    kept only where they are in the catalogue. ``metrics`` (the gate's evaluation of
    the checkpoint) travel into the snapshot manifest; without them the checkpoint
    manifest's own metrics are used.
    """
    model, manifest = load_checkpoint(checkpoint_dir)
    ids = np.unique(np.asarray(item_ids, dtype=np.int64))
    if ids.size == 0:
        raise UserFacingError("no items to refresh: the item catalogue is empty")
    n_rows = model.config.n_item_rows
    if ids[0] < 1 or ids[-1] >= n_rows:
        raise UserFacingError(
            f"item ids {ids[0]}..{ids[-1]} fall outside the model's table (1..{n_rows - 1});"
            " retrain on the new catalogue first"
        )
    popular = _servable_popular(popular_items, ids)
    dim = model.config.dim
    network = {name: t for name, t in model.cpu_state().items() if name != ITEM_TABLE_KEY}
    with staging_dir(out_dir) as staging:
        matrix = np.lib.format.open_memmap(
            staging / EMBEDDINGS_FILE, mode="w+", dtype=np.float32, shape=(n_rows, dim)
        )
        with torch.inference_mode():
            table = model.item_vectors()
            for start in tqdm(
                range(0, n_rows, batch_size),
                desc="item vectors",
                unit="batch",
                disable=not progress,
            ):
                matrix[start : start + batch_size] = table[start : start + batch_size].float()
        matrix.flush()
        del matrix
        save_file(network, str(staging / NETWORK_FILE))
        config = {"config": model.config.to_dict(), "checkpoint_id": checkpoint_dir.name}
        (staging / NETWORK_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        _write_catalogue(
            staging,
            ids,
            popular,
            checkpoint_dir.name,
            metrics if metrics is not None else manifest.get("metrics", {}),
        )
    return RefreshReport(out_dir, int(ids.size), dim, manifest)


def write_popularity_bundle(
    out_dir: Path, item_ids: Sequence[int] | np.ndarray, popular_items: Sequence[int] | np.ndarray
) -> RefreshReport:
    """The bundle of a model-less day: the catalogue and its popularity order.

    While no model has passed the gate, serving answers everyone from ``popular_items``
    (and says so in each response) instead of answering nothing.
    """
    ids = np.unique(np.asarray(item_ids, dtype=np.int64))
    if ids.size == 0:
        raise UserFacingError("no items to serve: the item catalogue is empty")
    with staging_dir(out_dir) as staging:
        _write_catalogue(staging, ids, _servable_popular(popular_items, ids), None, {})
    return RefreshReport(out_dir, int(ids.size), 0, {})


def _servable_popular(popular_items: Sequence[int] | np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The popularity order (most popular first) restricted to the servable catalogue."""
    popular = np.asarray(popular_items, dtype=np.int64)
    return popular[np.isin(popular, ids)]


def _write_catalogue(
    staging: Path,
    ids: np.ndarray,
    popular: np.ndarray,
    checkpoint_id: str | None,
    metrics: dict[str, Any],
) -> None:
    np.save(staging / ITEM_IDS_FILE, ids)
    np.save(staging / POPULAR_FILE, popular)
    source = {"checkpoint_id": checkpoint_id, "metrics": metrics}
    (staging / SOURCE_FILE).write_text(json.dumps(source, indent=2, sort_keys=True))


# --- what publishing needs to know of a bundle -----------------------------------------


def describe_bundle(folder: Path, names: Collection[str]) -> dict[str, Any]:
    """Shape, dtype and checkpoint id of the bundle in ``folder`` holding the files ``names``.

    Read from the files themselves (never trusted input), for the snapshot manifest. A
    folder that is no complete bundle is refused. A popularity-only bundle (no model has
    passed the gate yet) has no matrix: its ``checkpoint_id`` is None and serving answers
    every user from ``popular_items``.
    """
    if not CATALOGUE_FILES.issubset(names):
        raise SnapshotError(
            f"{folder} holds no refreshed embeddings; run `grank embeddings refresh`"
        )
    model_part = MODEL_FILES.intersection(names)
    if model_part and model_part != MODEL_FILES:
        raise SnapshotError(f"{folder} holds part of a model: {sorted(model_part)}")
    item_ids = np.load(folder / ITEM_IDS_FILE, mmap_mode="r")
    if not (folder / EMBEDDINGS_FILE).is_file():
        return {
            "item_count": int(item_ids.shape[0]),
            "table_rows": None,
            "dim": None,
            "dtype": None,
            "checkpoint_id": None,
            "metrics": {},
        }
    matrix = np.load(folder / EMBEDDINGS_FILE, mmap_mode="r")
    try:
        source = json.loads((folder / SOURCE_FILE).read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{folder} holds no readable {SOURCE_FILE}") from exc
    return {
        "item_count": int(item_ids.shape[0]),
        "table_rows": int(matrix.shape[0]),
        "dim": int(matrix.shape[1]),
        "dtype": str(matrix.dtype),
        "checkpoint_id": source.get("checkpoint_id"),
        "metrics": source.get("metrics", {}),
    }


def bundle_checkpoint_id(folder: Path) -> str | None:
    """The checkpoint the bundle in ``folder`` was refreshed from (None: popularity only)."""
    source = json.loads((folder / SOURCE_FILE).read_text("utf-8"))
    checkpoint: str | None = source.get("checkpoint_id")
    return checkpoint


# --- reading: a verified snapshot in memory --------------------------------------------


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
    folder: Path, mips_config: MipsConfig | None = None, items: ItemSource | None = None
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
        mips=build_mips(matrix, mips_config),
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
    """[table rows, Fi] encoded features of every item row, when the Ranker reads any
    (its own or its popularity prior's)."""
    if not model.config.reads_item_features:
        return None
    if items is None:
        raise SnapshotError(f"snapshot {version}: its Ranker reads item features, no source given")
    return item_feature_table(model.config, items)


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
