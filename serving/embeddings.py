"""Embedding refresh: every item's vector from a checkpoint, plus ids and popularity, on disk.

The output folder is exactly what a snapshot holds (minus the manifest): the float32
item matrix, the servable item ids, the popularity order for the unknown-user fallback
and the rest of the network that produced the vectors, so that vectors and weights can
only travel together.

The matrix *is* the model's item table (row i = item i, row 0 = padding), and the
network file holds every other weight. Storing the table once halves what a snapshot
swap must read and hash at 1M items (docs/serving.md), and serving uses the matrix
bytes directly as both the MIPS corpus and the Generator/Ranker's embedding table.
Rows are copied in batches into a memory-mapped ``.npy`` (never a second full copy in
memory), with a progress bar.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from common.atomic import staging_dir
from common.errors import UserFacingError
from serving.snapshots import (
    EMBEDDINGS_FILE,
    ITEM_IDS_FILE,
    NETWORK_CONFIG_FILE,
    NETWORK_FILE,
    POPULAR_FILE,
    SOURCE_FILE,
)
from training.checkpoint import load_checkpoint
from training.model import ITEM_TABLE_KEY


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
    batch_size: int = 65_536,
    progress: bool = True,
    metrics: dict[str, Any] | None = None,
) -> RefreshReport:
    """Write the checkpoint's item table and network, and the servable ids, to ``out_dir``.

    ``item_ids`` are the catalogue to serve (MIPS only ever returns these); ids the model
    has no row for are refused (a model older than the catalogue must be retrained
    first, not served with gaps). Rows outside the catalogue stay in the table: users'
    histories may still name retired items. ``popular_items`` (most popular first) are
    kept only where they are in the catalogue. ``metrics`` (the evaluation that
    published the checkpoint) travel into the snapshot manifest; without them the
    checkpoint manifest's own metrics are used.
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
    """The snapshot files of a model-less day: the catalogue and its popularity order.

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
