"""Exact maximum-inner-product search over the whole item matrix, with no index to build.

Both backends scan every item: on CPU, tiles of the score matrix computed by MKL's sgemm
(through torch) and fed to faiss' top-k heaps (the selection code of ``IndexFlatIP``);
on a CUDA device, torch ``matmul`` + ``topk``. There is nothing to build: a new snapshot
is searchable as soon as its matrix is in memory, and recall is exact by construction.
Structured indexes (HNSW, IVF, PQ, trees) are deliberately absent: their build time is
what this design removes (docs/serving.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Literal, Protocol

import numpy as np
import torch

# isort: split
# faiss after torch, always: when faiss' bundled OpenMP runtime loads first, the two
# runtimes' idle threads spin against each other on every tile and the scan runs ~3x
# slower (docs/benchmarks.md). serving.mips is where both meet, so the order lives here.
import faiss

from common.errors import UserFacingError

Device = Literal["auto", "cpu", "cuda"]


class ExactMIPS(Protocol):
    """Top-k inner products of queries against every row of the item matrix."""

    @property
    def size(self) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries float32 [B, d] -> (scores float32 [B, k], row indices int64 [B, k])."""
        ...


class TiledFlatMIPS:
    """CPU path: exact flat scan, one cache-sized tile of scores at a time.

    ``faiss.knn`` (``IndexFlatIP``'s search) multiplies through the OpenBLAS bundled in
    the faiss-cpu wheel, whose sgemm runs ~5x slower here than MKL's (docs/benchmarks.md):
    at 1M x 64 it spent nearly all its time in the matrix product, whatever k. So the
    product runs in torch (MKL), one tile of about ``TILE_SCORES`` floats at a time (it
    stays in cache and is never materialised for the whole catalogue), and each tile goes
    to faiss' per-query min-heaps, which keep the k largest scores with their row ids.
    Same scores, same order as ``IndexFlatIP`` (tested). The matrix is read in place (a
    read-only mmap from the snapshot is fine: nothing writes to it). Both the product and
    the heap update release the GIL.
    """

    TILE_SCORES = 1 << 21  # 8 MB of float32 scores per tile
    MAX_QUERY_ROWS = 2048
    MIN_ITEM_ROWS, MAX_ITEM_ROWS = 1024, 1 << 16

    def __init__(self, matrix: np.ndarray) -> None:
        array = np.ascontiguousarray(matrix, dtype=np.float32)  # no copy if it is
        with warnings.catch_warnings():  # a read-only mapping: torch warns, we never write
            warnings.simplefilter("ignore", UserWarning)
            self._matrix = torch.from_numpy(array)

    @property
    def size(self) -> int:
        return int(self._matrix.shape[0])

    def _tile(self, batch: int) -> tuple[int, int]:
        """(query rows, item rows) of one tile: small batches take wide tiles (fewer calls)."""
        rows = max(1, min(batch, self.MAX_QUERY_ROWS))
        items = self.TILE_SCORES // rows
        return rows, int(np.clip(items, self.MIN_ITEM_ROWS, self.MAX_ITEM_ROWS))

    def score_tiles(self, queries: np.ndarray) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(first query, first item, scores) of each tile, computed into one reused buffer.

        A tile's scores are only valid until the next one is computed.
        """
        query_rows, item_rows = self._tile(len(queries))
        tile = torch.empty(query_rows * item_rows)
        for first_query in range(0, len(queries), query_rows):
            block = torch.from_numpy(queries[first_query : first_query + query_rows])
            for first_item in range(0, self.size, item_rows):
                items = self._matrix[first_item : first_item + item_rows]
                out = tile[: len(block) * len(items)].view(len(block), len(items))
                torch.mm(block, items.T, out=out)
                yield first_query, first_item, out

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.size)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        batch = len(queries)
        scores = np.empty((batch, k), dtype=np.float32)
        rows = np.empty((batch, k), dtype=np.int64)
        if batch == 0 or k == 0:  # a heap of size 0 has no root to compare against
            return scores, rows
        heaps = faiss.float_minheap_array_t()  # min-heap of the k largest: root = k-th best
        heaps.nh, heaps.k = batch, k
        heaps.val, heaps.ids = faiss.swig_ptr(scores), faiss.swig_ptr(rows)
        heaps.heapify()
        for first_query, first_item, out in self.score_tiles(queries):
            # rows first_query.. of the heaps see ids first_item..; faiss' .pyi omits
            # addn's (j0, i0, ni) arguments, swigfaiss.py has them
            heaps.addn(  # type: ignore[call-arg]
                out.shape[1], faiss.swig_ptr(out.numpy()), first_item, first_query, out.shape[0]
            )
        heaps.reorder()  # heap order -> best first
        return scores, rows


class TorchMIPS:
    """GPU path (also runs on CPU for tests): one matmul plus ``topk`` per batch."""

    def __init__(self, matrix: np.ndarray, device: str, dtype: str = "float32") -> None:
        self._device = torch.device(device)
        self._dtype = getattr(torch, dtype)
        self._matrix = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32)).to(
            self._device, self._dtype
        )

    @property
    def size(self) -> int:
        return int(self._matrix.shape[0])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.size)
        with torch.inference_mode():
            q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
            scores = q.to(self._device, self._dtype) @ self._matrix.T
            top = torch.topk(scores.float(), k, dim=1)
        return top.values.cpu().numpy(), top.indices.cpu().numpy().astype(np.int64)


def build_mips(matrix: np.ndarray, device: Device = "auto") -> ExactMIPS:
    """The flat searcher for ``matrix``: CUDA when asked or available (``auto``), else CPU."""
    if device == "cpu":
        return TiledFlatMIPS(matrix)
    if torch.cuda.is_available():
        return TorchMIPS(matrix, "cuda")
    if device == "cuda":
        raise UserFacingError("serving device 'cuda' requested but torch sees no CUDA device")
    return TiledFlatMIPS(matrix)
