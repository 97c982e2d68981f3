"""Exact MIPS backends agree with brute force and each other; the batcher batches and sheds."""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from serving.batcher import MicroBatcher, QueueFullError
from serving.mips import MipsConfig, TiledFlatMIPS, TorchMIPS, build_mips

# isort: split
import faiss  # after serving.mips, which loads torch first (see there)


@pytest.fixture(scope="module")
def vectors() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((20_000, 64), dtype=np.float32),
        rng.standard_normal((50, 64), dtype=np.float32),
    )


class SmallTiles(TiledFlatMIPS):
    """Tiles far smaller than the matrix and the batch, so every boundary case is crossed."""

    TILE_SCORES = 7 * 1000
    MAX_QUERY_ROWS = 7  # 50 queries: 7 blocks, the last one short
    MIN_ITEM_ROWS, MAX_ITEM_ROWS = 1000, 1000  # 20,000 items: 20 tiles


def flat_index_ip(matrix: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatIP(matrix.shape[1])
    index.add(matrix)
    return index.search(queries, k)


def assert_same_up_to_near_ties(rows: np.ndarray, f_rows: np.ndarray, exact: np.ndarray) -> None:
    """The same ids in the same order as faiss but for near-ties: faiss sums each product
    in another order (its SIMD path depends on the CPU), which may swap two items whose
    exact scores differ by less than float32 resolves."""
    differ = rows != f_rows
    assert differ.mean() < 0.01
    np.testing.assert_allclose(
        np.take_along_axis(exact, rows, 1)[differ],
        np.take_along_axis(exact, f_rows, 1)[differ],
        rtol=1e-6,
    )


@pytest.mark.parametrize("searcher", [TiledFlatMIPS, SmallTiles])
def test_tiled_scan_is_exact_and_equals_faiss_index_flat_ip(
    vectors: tuple[np.ndarray, np.ndarray], searcher: type[TiledFlatMIPS]
) -> None:
    matrix, queries = vectors
    scores, rows = searcher(matrix).search(queries, 100)
    exact = queries @ matrix.T
    expected = np.argsort(-exact, axis=1)[:, :100]
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(exact, expected, 1), rtol=1e-4)
    f_scores, f_rows = flat_index_ip(matrix, queries, 100)
    np.testing.assert_allclose(scores, f_scores, rtol=1e-5, atol=1e-5)
    assert_same_up_to_near_ties(rows, f_rows, exact)


def assert_exact_top_k(
    matrix: np.ndarray, queries: np.ndarray, scores: np.ndarray, rows: np.ndarray
) -> None:
    """Against float64 truth: the k best items in order, up to float32 near-ties.

    The screen rescores its candidates with a batched product whose float32 sums run in
    another order than the tiles', so two items within ~1e-6 may swap places.
    """
    exact = queries.astype(np.float64) @ matrix.T.astype(np.float64)
    best = -np.sort(-exact, axis=1)[:, : rows.shape[1]]
    np.testing.assert_allclose(np.take_along_axis(exact, rows, 1), best, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scores, best, rtol=1e-5, atol=1e-5)
    assert all(len(set(row)) == len(row) for row in rows.tolist())


class Screened(TiledFlatMIPS):
    """The bf16 screen, whatever this CPU's instructions (emulated bf16 is slow, not wrong),
    and however small the catalogue (in production it waits for ~500 items per candidate)."""

    SCREEN_MIN_ITEMS_PER_CANDIDATE = 1

    def __init__(self, matrix: np.ndarray) -> None:
        super().__init__(matrix, bf16_screen=True)


class ScreenedSmallTiles(Screened, SmallTiles):
    """The screen over tiles and query blocks that cross every boundary."""

    SCREEN_BLOCK = 16  # 50 queries: 4 blocks, the last one short


class ScreenedNarrow(Screened):
    """A screen too narrow to prove anything: every query must fall back to the full scan."""

    def screen_width(self, k: int) -> int:
        return k


@pytest.mark.parametrize("searcher", [Screened, ScreenedSmallTiles, ScreenedNarrow])
def test_bf16_screen_returns_exactly_the_float32_top_k(
    vectors: tuple[np.ndarray, np.ndarray], searcher: type[TiledFlatMIPS]
) -> None:
    matrix, queries = vectors
    screen = searcher(matrix)
    scores, rows = screen.search(queries, 100)
    assert_exact_top_k(matrix, queries, scores, rows)
    # the bound is tight enough to prove every random query; a too narrow screen none
    assert screen.screen_rescans == (len(queries) if searcher is ScreenedNarrow else 0)


@pytest.mark.parametrize("searcher", [Screened, ScreenedNarrow])
def test_bf16_screen_separates_items_that_bf16_cannot_tell_apart(
    searcher: type[TiledFlatMIPS],
) -> None:
    """Near-duplicates round to the same bf16 vector; only float32 ranks them, and the
    screen must hand all of them to the float32 rescoring. Norms span 1e-3..30."""
    rng = np.random.default_rng(1)
    base = rng.standard_normal((2_000, 32)).astype(np.float32)
    twins = base * (1 + 1e-4 * rng.standard_normal((2_000, 1)).astype(np.float32))
    scale = np.geomspace(1e-3, 30, 4_000).astype(np.float32)[:, None]
    matrix = np.concatenate([base, twins]) * rng.permutation(scale)
    queries = rng.standard_normal((16, 32)).astype(np.float32)
    screen = searcher(matrix)
    for k in (1, 10, 300):
        scores, rows = screen.search(queries, k)
        assert_exact_top_k(matrix, queries, scores, rows)


def test_bf16_screen_keys_bound_every_exact_score_from_above() -> None:
    """The proof rests on key >= q . x for every item: checked against float64 on vectors
    with norms over 12 orders of magnitude, signs mixed, and a zero row."""
    rng = np.random.default_rng(2)
    scale = np.geomspace(1e-6, 1e6, 3_000).astype(np.float32)[:, None]
    matrix = rng.standard_normal((3_000, 48)).astype(np.float32) * rng.permutation(scale)
    matrix[7] = 0
    queries = rng.standard_normal((9, 48)).astype(np.float32) * np.float32(1e3)
    screen = Screened(matrix)
    assert screen._screen is not None
    exact = queries.astype(np.float64) @ matrix.T.astype(np.float64)
    # the slack, in units of |q| |x|: ~3 bf16 roundings (2^-8 each), not more
    unit = np.outer(np.linalg.norm(queries, axis=1), np.linalg.norm(matrix, axis=1)) + 1e-30
    augmented = screen._screen.queries(torch.tensor(queries))
    for first_query, first_item, keys in screen.score_tiles(augmented, screen._screen.matrix):
        rows, items = keys.shape
        span = np.s_[first_query : first_query + rows, first_item : first_item + items]
        slack = keys.numpy().astype(np.float64) - exact[span]
        assert (slack >= 0).all()
        assert (slack / unit[span]).max() < 4 * 2.0**-8


def test_the_screen_is_used_where_asked_and_where_it_pays(
    vectors: tuple[np.ndarray, np.ndarray],
) -> None:
    matrix, queries = vectors
    screened = Screened(matrix)
    assert screened._screens(100)
    assert not screened._screens(10_000)  # a screen as wide as the catalogue saves nothing
    assert not TiledFlatMIPS(matrix, bf16_screen=True)._screens(100)  # 20k items: too few
    assert TiledFlatMIPS(matrix[:10_000], bf16_screen=True)._screen is None  # never usable
    assert not TiledFlatMIPS(matrix)._screens(100)  # off unless asked
    forced = build_mips(matrix, MipsConfig("cpu", bf16_screen="on"))
    assert isinstance(forced, TiledFlatMIPS) and forced._screens(1)  # 20k > 500 x 34
    off = build_mips(matrix, MipsConfig("cpu", bf16_screen="off"))
    assert isinstance(off, TiledFlatMIPS) and not off._screens(1)
    assert screened.search(queries[:0], 10)[1].shape == (0, 10)


def test_tiled_scan_reads_a_read_only_mapping_in_place(
    vectors: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    matrix, queries = vectors
    np.save(tmp_path / "m.npy", matrix)
    mapped = np.load(tmp_path / "m.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable tensor" warning either
        searcher = TiledFlatMIPS(mapped)
        _, rows = searcher.search(queries[:3], 10)
    assert np.shares_memory(searcher._matrix.numpy(), mapped)
    np.testing.assert_array_equal(rows, np.argsort(-(queries[:3] @ matrix.T), axis=1)[:, :10])
    assert searcher.search(queries[:0], 10)[1].shape == (0, 10)


def test_torch_path_returns_the_same_results_as_faiss(
    vectors: tuple[np.ndarray, np.ndarray],
) -> None:
    matrix, queries = vectors
    f_scores, f_rows = flat_index_ip(matrix, queries, 100)
    t_scores, t_rows = TorchMIPS(matrix, "cpu").search(queries, 100)
    assert_same_up_to_near_ties(t_rows, f_rows, queries @ matrix.T)
    np.testing.assert_allclose(t_scores, f_scores, rtol=1e-4, atol=1e-4)


def test_k_larger_than_the_catalogue_returns_every_item() -> None:
    matrix = np.eye(3, dtype=np.float32)
    scores, rows = build_mips(matrix, MipsConfig("cpu")).search(
        np.array([[0, 2, 1]], np.float32), 10
    )
    assert rows.tolist() == [[1, 2, 0]] and scores.tolist() == [[2.0, 1.0, 0.0]]


def test_concurrent_submissions_share_one_batch() -> None:
    sizes: list[int] = []

    def process(items: Sequence[int]) -> list[int]:
        time.sleep(0.05)
        return [2 * i for i in items]

    async def scenario() -> list[int]:
        batcher = MicroBatcher(
            process, max_batch=16, max_wait_s=0.005, max_queue=64, on_batch=sizes.append
        )
        await batcher.start()
        try:
            return list(await asyncio.gather(*(batcher.submit(i) for i in range(40))))
        finally:
            await batcher.stop()

    assert asyncio.run(scenario()) == [2 * i for i in range(40)]
    assert max(sizes) == 16 and sum(sizes) == 40 and len(sizes) <= 4


def test_a_full_queue_is_refused_at_once_and_memory_stays_bounded() -> None:
    release = threading.Event()

    def process(items: Sequence[int]) -> list[int]:
        release.wait(5)
        return list(items)

    async def scenario() -> tuple[int, int]:
        batcher = MicroBatcher(process, max_batch=1, max_wait_s=0, max_queue=3)
        await batcher.start()
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(10)]
        await asyncio.sleep(0.1)
        release.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.stop()
        refused = sum(isinstance(o, QueueFullError) for o in outcomes)
        return refused, sum(isinstance(o, int) for o in outcomes)

    refused, served = asyncio.run(scenario())
    # at most one batch in flight plus three queued; everything else is refused at once
    assert served + refused == 10 and 3 <= served <= 4


def test_a_failing_batch_fails_its_requests_and_the_batcher_keeps_going() -> None:
    def process(items: Sequence[int]) -> list[int]:
        if 0 in items:
            raise RuntimeError("boom")
        return list(items)

    async def scenario() -> tuple[BaseException | int, int]:
        batcher = MicroBatcher(process, max_batch=1, max_wait_s=0, max_queue=8)
        await batcher.start()
        first = (await asyncio.gather(batcher.submit(0), return_exceptions=True))[0]
        second = await batcher.submit(7)
        await batcher.stop()
        return first, second

    first, second = asyncio.run(scenario())
    assert isinstance(first, RuntimeError) and second == 7
