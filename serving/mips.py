"""Exact maximum-inner-product search over the whole item matrix, with no index to build.

Both backends scan every item: faiss' flat inner-product kNN on CPU (BLAS over the full
matrix, in place) and torch ``matmul`` + ``topk`` on a CUDA device. There is nothing to
build: a new snapshot is searchable as soon as its matrix is in memory, and recall is
exact by construction. Structured indexes (HNSW, IVF, PQ, trees) are deliberately absent: their
build time is what this design removes (docs/serving.md).
"""

from __future__ import annotations

from typing import Literal, Protocol

import numpy as np

from common.errors import UserFacingError

Device = Literal["auto", "cpu", "cuda"]


class ExactMIPS(Protocol):
    """Top-k inner products of queries against every row of the item matrix."""

    @property
    def size(self) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries float32 [B, d] -> (scores float32 [B, k], row indices int64 [B, k])."""
        ...


class FaissFlatMIPS:
    """CPU path: faiss' exact inner-product kNN (``IndexFlatIP``'s kernel) over the matrix.

    ``faiss.knn`` runs the same blocked BLAS scan as ``IndexFlatIP.search`` but reads the
    caller's array in place: an ``IndexFlatIP.add`` would copy the whole matrix, which at
    1M x 64 costs more than reading and hashing it (docs/benchmarks.md). The scan
    releases the GIL.
    """

    def __init__(self, matrix: np.ndarray) -> None:
        import faiss

        self._faiss = faiss
        self._matrix = np.ascontiguousarray(matrix, dtype=np.float32)  # no copy if it is

    @property
    def size(self) -> int:
        return int(self._matrix.shape[0])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.size)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        return self._faiss.knn(queries, self._matrix, k, metric=self._faiss.METRIC_INNER_PRODUCT)


class TorchMIPS:
    """GPU path (also runs on CPU for tests): one matmul plus ``topk`` per batch."""

    def __init__(self, matrix: np.ndarray, device: str, dtype: str = "float32") -> None:
        import torch

        self._torch = torch
        self._device = torch.device(device)
        self._dtype = getattr(torch, dtype)
        self._matrix = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32)).to(
            self._device, self._dtype
        )

    @property
    def size(self) -> int:
        return int(self._matrix.shape[0])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        k = min(k, self.size)
        with torch.inference_mode():
            q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
            scores = q.to(self._device, self._dtype) @ self._matrix.T
            top = torch.topk(scores.float(), k, dim=1)
        return top.values.cpu().numpy(), top.indices.cpu().numpy().astype(np.int64)


def build_mips(matrix: np.ndarray, device: Device = "auto") -> ExactMIPS:
    """The flat searcher for ``matrix``: CUDA when asked or available (``auto``), else faiss."""
    if device == "cpu":
        return FaissFlatMIPS(matrix)
    import torch

    if torch.cuda.is_available():
        return TorchMIPS(matrix, "cuda")
    if device == "cuda":
        raise UserFacingError("serving device 'cuda' requested but torch sees no CUDA device")
    return FaissFlatMIPS(matrix)
