"""Embedding refresh: every item's vector from a checkpoint, plus ids and popularity, on disk.

The output folder is exactly what a snapshot holds (minus the manifest): the float32
item matrix, the id of each row, the popularity order for the unknown-user fallback and
a copy of the checkpoint that produced the vectors, so that vectors and weights can
only travel together. Rows are copied in batches into a memory-mapped ``.npy`` so the
float32 matrix never needs a second full copy in memory, with a progress bar.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from common.atomic import staging_dir
from common.errors import UserFacingError
from serving.snapshots import (
    EMBEDDINGS_FILE,
    ITEM_IDS_FILE,
    MODEL_DIR,
    POPULAR_FILE,
    SOURCE_FILE,
    link_or_copy,
)
from training.checkpoint import load_checkpoint


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
    """Write the vectors of ``item_ids`` from the checkpoint to ``out_dir`` (atomically).

    ``item_ids`` are the catalogue to serve; ids the model has no row for are refused
    (a model older than the catalogue must be retrained first, not served with gaps).
    ``popular_items`` (most popular first) are kept only where they are in the catalogue.
    ``metrics`` (the evaluation that published the checkpoint) travel into the snapshot
    manifest; without them the checkpoint manifest's own metrics are used.
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
    popular = np.asarray(popular_items, dtype=np.int64)
    popular = popular[np.isin(popular, ids)]
    dim = model.config.dim
    with staging_dir(out_dir) as staging:
        matrix = np.lib.format.open_memmap(
            staging / EMBEDDINGS_FILE, mode="w+", dtype=np.float32, shape=(ids.size, dim)
        )
        with torch.inference_mode():
            table = model.item_vectors()
            for start in tqdm(
                range(0, ids.size, batch_size),
                desc="item vectors",
                unit="batch",
                disable=not progress,
            ):
                rows = torch.from_numpy(ids[start : start + batch_size])
                matrix[start : start + rows.numel()] = table[rows].float().cpu().numpy()
        matrix.flush()
        del matrix
        np.save(staging / ITEM_IDS_FILE, ids)
        np.save(staging / POPULAR_FILE, popular)
        shutil.copytree(checkpoint_dir, staging / MODEL_DIR, copy_function=link_or_copy)
        source = {
            "checkpoint_id": checkpoint_dir.name,
            "metrics": metrics if metrics is not None else manifest.get("metrics", {}),
        }
        (staging / SOURCE_FILE).write_text(json.dumps(source, indent=2, sort_keys=True))
    return RefreshReport(out_dir, int(ids.size), dim, manifest)
