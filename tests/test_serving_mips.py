"""Exact MIPS backends agree with brute force and each other; the batcher batches and sheds."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from serving.batcher import MicroBatcher, QueueFullError
from serving.mips import FaissFlatMIPS, TorchMIPS, build_mips


@pytest.fixture(scope="module")
def vectors() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((20_000, 64), dtype=np.float32),
        rng.standard_normal((50, 64), dtype=np.float32),
    )


def test_faiss_flat_is_exact_brute_force(vectors: tuple[np.ndarray, np.ndarray]) -> None:
    matrix, queries = vectors
    scores, rows = FaissFlatMIPS(matrix).search(queries, 100)
    exact = queries @ matrix.T
    expected = np.argsort(-exact, axis=1)[:, :100]
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(exact, expected, 1), rtol=1e-4)


def test_torch_path_returns_the_same_results_as_faiss(
    vectors: tuple[np.ndarray, np.ndarray],
) -> None:
    matrix, queries = vectors
    f_scores, f_rows = FaissFlatMIPS(matrix).search(queries, 100)
    t_scores, t_rows = TorchMIPS(matrix, "cpu").search(queries, 100)
    np.testing.assert_array_equal(t_rows, f_rows)
    np.testing.assert_allclose(t_scores, f_scores, rtol=1e-4, atol=1e-4)


def test_k_larger_than_the_catalogue_returns_every_item() -> None:
    matrix = np.eye(3, dtype=np.float32)
    scores, rows = build_mips(matrix, "cpu").search(np.array([[0, 2, 1]], np.float32), 10)
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
