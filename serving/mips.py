"""Exact maximum-inner-product search over the whole item matrix, with no index to build.

Both backends scan every item: on CPU, tiles of the score matrix computed by MKL's sgemm
(through torch) and fed to faiss' top-k heaps (the selection code of ``IndexFlatIP``);
on a CUDA device, torch ``matmul`` + ``topk``. There is nothing to build: a new snapshot
is searchable as soon as its matrix is in memory, and recall is exact by construction.
Structured indexes (HNSW, IVF, PQ, trees) are deliberately absent: their build time is
what this design removes (docs/serving.md).

On CPUs that multiply bfloat16 in hardware, small batches are screened first: a bf16
scan (about 4x cheaper than sgemm here) keeps a few k candidates per query, a rigorous
bound on bf16's rounding error proves that they contain the exact top k, and only they
are rescored in float32. A query whose proof fails is rescanned in float32, so results
are the same as the plain scan's either way (docs/serving.md, "Exact bf16 screening").
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
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
Bf16Screen = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class MipsOptions:
    """Where the scan runs, and whether the CPU scan screens in bf16 first (exact either way).

    ``auto`` screens where the CPU has bf16 dot-product instructions (AVX512-BF16, AMX);
    elsewhere bf16 products are emulated and would cost more than they save.
    """

    device: Device = "auto"
    bf16_screen: Bf16Screen = "auto"


class ExactMIPS(Protocol):
    """Top-k inner products of queries against every row of the item matrix."""

    # queries the bf16 screen could not prove exact and rescanned in float32 (0 without one)
    screen_rescans: int

    @property
    def size(self) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries float32 [B, d] -> (scores float32 [B, k], row indices int64 [B, k])."""
        ...


Tiles = Iterator[tuple[int, int, torch.Tensor]]


def heap_top_k(tiles: Tiles, batch: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest scores of each query row (best first) and their item rows.

    ``tiles`` yields (first query, first item, float32 scores) blocks covering the whole
    [batch, items] score matrix; faiss' per-query min-heaps (root = the k-th best so far)
    keep the k largest, as ``IndexFlatIP`` does.
    """
    scores = np.empty((batch, k), dtype=np.float32)
    rows = np.empty((batch, k), dtype=np.int64)
    if batch == 0 or k == 0:  # a heap of size 0 has no root to compare against
        return scores, rows
    heaps = faiss.float_minheap_array_t()
    heaps.nh, heaps.k = batch, k
    heaps.val, heaps.ids = faiss.swig_ptr(scores), faiss.swig_ptr(rows)
    heaps.heapify()
    for first_query, first_item, out in tiles:
        # rows first_query.. of the heaps see ids first_item..; faiss' .pyi omits
        # addn's (j0, i0, ni) arguments, swigfaiss.py has them
        heaps.addn(  # type: ignore[call-arg]
            out.shape[1], faiss.swig_ptr(out.numpy()), first_item, first_query, out.shape[0]
        )
    heaps.reorder()  # heap order -> best first
    return scores, rows


class Bf16ErrorBound:
    """How far a bf16 score can be from the float32 one, so screening can prove exactness.

    A bf16 score is ``bf16(sum_i bf16(q_i) * bf16(x_i))``, accumulated in float32. With
    ``q = bf16(q) - r_q`` and ``x = bf16(x) - r_x`` (residuals known exactly), the inputs'
    rounding moves a score by at most ``|q| R + |r_q| (X + R)``, where X and R are the
    largest item norm and residual norm (Cauchy-Schwarz); float32 accumulation of d terms
    adds ``gamma_d |bf16(q)| |bf16(x)|``; rounding the result to bf16 moves it by at most
    ``u / (1 - u)`` of its own magnitude (round to nearest, unit roundoff u = 2^-8).
    """

    UNIT = 2.0**-8  # bf16's unit roundoff (8 significant bits, round to nearest)
    SLACK = 1.001  # norms are summed in float32: a little headroom on their rounding

    def __init__(self, items: torch.Tensor, items_bf16: torch.Tensor) -> None:
        max_norm = max_residual = 0.0
        for rows in range(0, len(items), 8192):  # cache-sized chunks, no full-size temporaries
            chunk = items[rows : rows + 8192]
            residual = chunk - items_bf16[rows : rows + 8192].float()
            max_norm = max(max_norm, float(torch.linalg.vector_norm(chunk, dim=1).max()))
            max_residual = max(max_residual, float(torch.linalg.vector_norm(residual, dim=1).max()))
        self._max_norm, self._max_residual = max_norm * self.SLACK, max_residual * self.SLACK
        terms = items.shape[1]
        self._gamma = terms * 2.0**-24 / (1 - terms * 2.0**-24)  # float32 sum of d products
        self._underflow = terms * 2.0**-125  # products flushed to zero below float32's range

    def ceiling(
        self, queries: torch.Tensor, queries_bf16: torch.Tensor, bf16: np.ndarray
    ) -> np.ndarray:
        """Per query, the highest float32 score an item whose bf16 score is ``bf16`` can have."""
        norm = torch.linalg.vector_norm(queries.double(), dim=1).numpy() * self.SLACK
        residual = torch.linalg.vector_norm((queries - queries_bf16.float()).double(), dim=1)
        r_q = residual.numpy() * self.SLACK
        x, r_x = self._max_norm, self._max_residual
        # gamma twice: the bf16 products' float32 sums, and the rescoring's
        inputs = norm * r_x + r_q * (x + r_x) + 2 * self._gamma * (norm + r_q) * (x + r_x)
        bf16 = bf16.astype(np.float64)
        rounding = self.UNIT / (1 - self.UNIT) * np.abs(bf16)  # of the result, to bf16
        return bf16 + rounding + inputs + self._underflow


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

    With ``bf16_screen``, searches go through the exact bf16 screen (module docstring),
    ``SCREEN_BLOCK`` queries at a time; it keeps a bf16 copy of the matrix (half its size).
    """

    TILE_SCORES = 1 << 21  # 8 MB of float32 scores per tile
    MAX_QUERY_ROWS = 2048
    MIN_ITEM_ROWS, MAX_ITEM_ROWS = 1024, 1 << 16
    SCREEN_BLOCK = 128  # queries screened together: bounds the rescoring's gather (27 MB)

    def __init__(self, matrix: np.ndarray, bf16_screen: bool = False) -> None:
        array = np.ascontiguousarray(matrix, dtype=np.float32)  # no copy if it is
        with warnings.catch_warnings():  # a read-only mapping: torch warns, we never write
            warnings.simplefilter("ignore", UserWarning)
            self._matrix = torch.from_numpy(array)
        self._matrix_bf16: torch.Tensor | None = None
        self._bound: Bf16ErrorBound | None = None
        self.screen_rescans = 0
        if bf16_screen:
            self._matrix_bf16 = self._matrix.bfloat16()
            self._bound = Bf16ErrorBound(self._matrix, self._matrix_bf16)

    @property
    def size(self) -> int:
        return int(self._matrix.shape[0])

    def _tile(self, batch: int) -> tuple[int, int]:
        """(query rows, item rows) of one tile: small batches take wide tiles (fewer calls)."""
        rows = max(1, min(batch, self.MAX_QUERY_ROWS))
        items = self.TILE_SCORES // rows
        return rows, int(np.clip(items, self.MIN_ITEM_ROWS, self.MAX_ITEM_ROWS))

    def score_tiles(self, queries: torch.Tensor, matrix: torch.Tensor | None = None) -> Tiles:
        """(first query, first item, float32 scores) of each tile, into one reused buffer.

        ``matrix`` defaults to the float32 one; with the bf16 copy (and bf16 queries) the
        products run in bf16 and each tile is widened to float32 for faiss' heaps. A
        tile's scores are only valid until the next one is computed.
        """
        matrix = self._matrix if matrix is None else matrix
        query_rows, item_rows = self._tile(len(queries))
        tile = torch.empty(query_rows * item_rows)
        product = tile if matrix.dtype == torch.float32 else tile.to(matrix.dtype)
        for first_query in range(0, len(queries), query_rows):
            block = queries[first_query : first_query + query_rows]
            for first_item in range(0, self.size, item_rows):
                items = matrix[first_item : first_item + item_rows]
                shape = (len(block), len(items))
                out = tile[: shape[0] * shape[1]].view(shape)
                products = product[: shape[0] * shape[1]].view(shape)
                torch.mm(block, items.T, out=products)
                if products is not out:
                    out.copy_(products)
                yield first_query, first_item, out

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.size)
        as_tensor = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        if len(as_tensor) == 0 or not self._screens(k):
            return heap_top_k(self.score_tiles(as_tensor), len(as_tensor), k)
        blocks = [
            self._screened_search(as_tensor[first : first + self.SCREEN_BLOCK], k)
            for first in range(0, len(as_tensor), self.SCREEN_BLOCK)
        ]
        return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])

    def screen_width(self, k: int) -> int:
        """bf16 candidates kept per query: ~1.5k fall within the error bound at 1M x 64."""
        return 2 * k + 32

    def _screens(self, k: int) -> bool:
        """Whether searches for the top k go through the bf16 screen."""
        return self._bound is not None and k > 0 and self.screen_width(k) < self.size

    def _screened_search(self, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top k through the bf16 screen; queries whose proof fails are rescanned exactly."""
        assert self._matrix_bf16 is not None and self._bound is not None
        queries_bf16 = queries.bfloat16()
        tiles = self.score_tiles(queries_bf16, self._matrix_bf16)
        approx, rows = heap_top_k(tiles, len(queries), self.screen_width(k))
        exact = torch.bmm(self._matrix[torch.from_numpy(rows)], queries.unsqueeze(2)).squeeze(2)
        best = torch.topk(exact, k, dim=1)
        scores = best.values.numpy()
        top_rows = np.take_along_axis(rows, best.indices.numpy(), axis=1)
        # every item outside the heap has a bf16 score <= the heap's last one, so a float32
        # score <= its ceiling: under the k-th exact score, none of them can be in the top k
        proven = self._bound.ceiling(queries, queries_bf16, approx[:, -1]) < scores[:, -1]
        unproven = np.flatnonzero(~proven)
        if unproven.size:
            self.screen_rescans += unproven.size
            rescan = queries[torch.from_numpy(unproven)]
            scores[unproven], top_rows[unproven] = heap_top_k(
                self.score_tiles(rescan), len(unproven), k
            )
        return scores, top_rows


class TorchMIPS:
    """GPU path (also runs on CPU for tests): one matmul plus ``topk`` per batch."""

    screen_rescans = 0  # no screen

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


def cpu_multiplies_bf16() -> bool:
    """True where the CPU has bf16 dot-product instructions (Linux: /proc/cpuinfo flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def build_mips(matrix: np.ndarray, options: MipsOptions | None = None) -> ExactMIPS:
    """The flat searcher for ``matrix``: CUDA when asked or available (``auto``), else CPU."""
    options = options or MipsOptions()
    if options.device != "cpu" and torch.cuda.is_available():
        return TorchMIPS(matrix, "cuda")
    if options.device == "cuda":
        raise UserFacingError("serving device 'cuda' requested but torch sees no CUDA device")
    screen = options.bf16_screen == "on" or (
        options.bf16_screen == "auto" and cpu_multiplies_bf16()
    )
    return TiledFlatMIPS(matrix, bf16_screen=screen)
