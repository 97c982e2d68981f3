"""Exact maximum-inner-product search over the whole item matrix, with no index to build.

Both backends scan every item: on CPU, tiles of the score matrix computed by MKL's sgemm
(through torch) and fed to faiss' top-k heaps (the selection code of ``IndexFlatIP``);
on a CUDA device, torch ``matmul`` + ``topk``. There is nothing to build: a new snapshot
is searchable as soon as its matrix is in memory, and recall is exact by construction.
Structured indexes (HNSW, IVF, PQ, trees) are deliberately absent: their build time is
what this design removes (docs/serving.md).

On CPUs that multiply bfloat16 in hardware the scan is screened first: a bf16 scan
(about 4x cheaper than sgemm here) yields, per item, a rigorous upper bound on its float32
score; the 2k + 32 highest bounds are rescored in float32, and the bounds prove that no
item left out can be in the top k. A query whose proof fails is rescanned in float32, so
results are the plain scan's either way (docs/serving.md, "Exact bf16 screening").
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

# isort: split
# faiss after torch, always: when faiss' bundled OpenMP runtime loads first, the two
# runtimes' idle threads spin against each other on every tile and the scan runs ~3x
# slower (docs/benchmarks.md). serving.mips is where both meet, so the order lives here.
import faiss

from common.errors import UserFacingError
from common.hardware import cpu_multiplies_bf16
from serving.config import MipsConfig


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


def bf16_at_least(values: torch.Tensor) -> torch.Tensor:
    """``values`` (float32, >= 0) rounded up to bf16: never below the value it stands for."""
    rounded = values.bfloat16()
    below = rounded.float() < values
    rounded.view(torch.int16)[below] += 1  # next bf16 up: bit patterns of >= 0 floats ascend
    return rounded


class Bf16Screen:
    """The item matrix in bf16 with one more column, so the bf16 product of a query is an
    upper bound on every item's float32 score, computed by the product itself.

    Row j holds ``bf16(x_j)`` and ``n_j``, its norm rounded up; a query is ``bf16(q)`` and
    ``e_q``, also rounded up. So the product is ``bf16(q) . bf16(x_j) + e_q n_j``, and
    ``e_q`` is large enough for the second term to cover everything bf16 can get wrong
    about ``q . x_j``: the rounding of the inputs (``|bf16(v) - v| <= u |v|``, unit
    roundoff u = 2^-8: at most ``u n_j`` for the item, measured for the query), float32
    accumulation of d + 1 products (``gamma``), and the rounding of the result to bf16 (u
    of its size). Every error is at most a multiple of ``n_j``, so an item's slack scales
    with its own norm: long and short vectors are bounded equally tightly. Only values
    flushed to zero below float32's normal range (absolute, tiny) are left to the proof
    (``proof_margin``).
    """

    UNIT = 2.0**-8  # bf16's unit roundoff (8 significant bits, round to nearest)
    CHUNK = 8192  # rows converted at a time: cache-sized, no full-size temporaries

    def __init__(self, items: torch.Tensor) -> None:
        count, dim = items.shape
        self.norms = torch.empty(count)
        self.matrix = torch.empty((count, dim + 1), dtype=torch.bfloat16)
        for rows in range(0, count, self.CHUNK):
            chunk = items[rows : rows + self.CHUNK]
            norms = torch.linalg.vector_norm(chunk, dim=1)
            self.norms[rows : rows + self.CHUNK] = norms
            self.matrix[rows : rows + self.CHUNK, :dim] = chunk  # round to nearest
            self.matrix[rows : rows + self.CHUNK, dim] = bf16_at_least(norms)
        self.gamma = (dim + 1) * 2.0**-24 / (1 - (dim + 1) * 2.0**-24)  # float32 sums
        self._terms = dim + 1
        self._longest = float(self.norms.max()) * (1 + 2 * self.gamma) if count else 0.0

    def queries(self, queries: torch.Tensor) -> torch.Tensor:
        """``[bf16(q), e_q]`` per query: multiplied with ``matrix``, an upper-bound key."""
        queries_bf16 = queries.bfloat16()
        q = queries.double()
        norm = torch.linalg.vector_norm(q, dim=1)
        r_q = torch.linalg.vector_norm(queries_bf16.double() - q, dim=1)
        u, nu = self.UNIT, 1 + 2 * self.gamma  # |x_j| <= nu n_j: n_j is a float32 sum
        inputs = nu * (r_q + norm * u + r_q * u)  # / n_j: |q . x - bf16(q) . bf16(x)|
        product = (norm + r_q) * nu * (1 + u)  # / n_j: >= |bf16(q)| |bf16(x_j)|
        kappa = self.gamma + u * (1 + self.gamma)  # float32 sum, then bf16 result
        slack = (inputs + kappa * product) / (1 - kappa) * (1 + 2.0**-20)
        return torch.cat([queries_bf16, bf16_at_least(slack.float())[:, None]], dim=1)

    def proof_margin(self, queries: torch.Tensor, rows: np.ndarray) -> np.ndarray:
        """Per query, what the proof must allow beside the keys: values below float32's
        normal range (2^-126) that bf16 hardware may flush to zero (absolute, not covered
        by the keys), and the float32 rounding of rescoring ``rows`` against real scores."""
        norm = torch.linalg.vector_norm(queries.double(), dim=1).numpy()
        underflow = self._terms * 2.0**-126 * (1 + norm + self._longest)
        longest = self.norms[torch.from_numpy(rows)].amax(dim=1).double().numpy()
        return underflow + 2 * self.gamma * norm * longest


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
    ``SCREEN_BLOCK`` queries at a time; it keeps a bf16 copy of the matrix (about half its
    size) and the norms.
    """

    TILE_SCORES = 1 << 21  # 8 MB of float32 scores per tile
    MAX_QUERY_ROWS = 2048
    MIN_ITEM_ROWS, MAX_ITEM_ROWS = 1024, 1 << 16
    SCREEN_BLOCK = 128  # queries screened together: bounds the rescoring's gather (27 MB)
    # The screen's own cost grows with its width (heaps, rescoring gather), its saving with
    # the catalogue: it broke even at ~450 items per candidate here (docs/benchmarks.md).
    SCREEN_MIN_ITEMS_PER_CANDIDATE = 500

    def __init__(self, matrix: np.ndarray, bf16_screen: bool = False) -> None:
        array = np.ascontiguousarray(matrix, dtype=np.float32)  # no copy if it is
        with warnings.catch_warnings():  # a read-only mapping: torch warns, we never write
            warnings.simplefilter("ignore", UserWarning)
            self._matrix = torch.from_numpy(array)
        # no bf16 copy where no search could use it (the narrowest screen is k = 1's)
        usable = bf16_screen and self._screen_pays(1)
        self._screen = Bf16Screen(self._matrix) if usable else None
        self.screen_rescans = 0

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

        ``matrix`` defaults to the float32 one; with the screen's bf16 matrix (and bf16
        queries) the products run in bf16 and each tile is widened to float32 for faiss'
        heaps. A tile's scores are only valid until the next one is computed.
        """
        matrix = self._matrix if matrix is None else matrix
        widen = matrix.dtype != torch.float32
        query_rows, item_rows = self._tile(len(queries))
        scores = torch.empty(query_rows * item_rows)
        products = torch.empty(query_rows * item_rows, dtype=matrix.dtype) if widen else scores
        for first_query in range(0, len(queries), query_rows):
            block = queries[first_query : first_query + query_rows]
            for first_item in range(0, self.size, item_rows):
                items = matrix[first_item : first_item + item_rows]
                shape = (len(block), len(items))
                out = scores[: shape[0] * shape[1]].view(shape)
                product = products[: shape[0] * shape[1]].view(shape)
                torch.mm(block, items.T, out=product)
                if widen:
                    out.copy_(product)
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
        """Candidates kept per query by the screen: ~1.5k beat the bound at 1M x 64."""
        return 2 * k + 32

    def _screen_pays(self, k: int) -> bool:
        """Whether the catalogue is large enough for a top-k screen to beat the plain scan."""
        return self.size > self.SCREEN_MIN_ITEMS_PER_CANDIDATE * self.screen_width(k)

    def _screens(self, k: int) -> bool:
        """Whether searches for the top k go through the bf16 screen (where it pays)."""
        return self._screen is not None and k > 0 and self._screen_pays(k)

    def _screened_search(self, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top k through the bf16 screen; queries whose proof fails are rescanned exactly."""
        assert self._screen is not None
        tiles = self.score_tiles(self._screen.queries(queries), self._screen.matrix)
        keys, rows = heap_top_k(tiles, len(queries), self.screen_width(k))
        exact = torch.bmm(self._matrix[torch.from_numpy(rows)], queries.unsqueeze(2)).squeeze(2)
        best = torch.topk(exact, k, dim=1)
        scores = best.values.numpy()
        top_rows = np.take_along_axis(rows, best.indices.numpy(), axis=1)
        # Every item left out has a key, so a score, <= the heap's last key; the k rescored
        # items' real scores are >= the k-th float32 one, less that sum's own rounding.
        margin = self._screen.proof_margin(queries, top_rows)
        proven = keys[:, -1].astype(np.float64) + margin < scores[:, -1]
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


def build_mips(matrix: np.ndarray, config: MipsConfig | None = None) -> ExactMIPS:
    """The flat searcher for ``matrix``: CUDA when asked or available (``auto``), else CPU."""
    config = config or MipsConfig()
    if config.device != "cpu" and torch.cuda.is_available():
        return TorchMIPS(matrix, "cuda")
    if config.device == "cuda":
        raise UserFacingError("serving device 'cuda' requested but torch sees no CUDA device")
    screen = config.bf16_screen == "on" or (config.bf16_screen == "auto" and cpu_multiplies_bf16())
    return TiledFlatMIPS(matrix, bf16_screen=screen)
