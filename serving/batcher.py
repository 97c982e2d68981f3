"""Micro-batching: requests arriving within a few milliseconds share one model pass and scan.

Flat MIPS is memory-bound: scanning a 1M x 64 float32 matrix costs about the same for one
query as for dozens, so throughput comes from scoring many users per scan. Requests wait
in a bounded queue (never unbounded memory); when it is full the caller is told at once
(:class:`QueueFullError`, HTTP 503 + Retry-After) instead of queueing into a timeout.
One worker drains the queue and runs ``process`` in a thread, so the event loop keeps
accepting requests while a batch is being scored.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class QueueFullError(Exception):
    """The batch queue is at capacity; the client should retry later."""


class MicroBatcher(Generic[Item, Result]):
    """Collects items into batches of at most ``max_batch``, waiting at most ``max_wait_s``."""

    def __init__(
        self,
        process: Callable[[Sequence[Item]], Sequence[Result]],
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self._process = process
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._max_queue = max_queue
        self._on_batch = on_batch
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future[Result]]] | None = None
        self._worker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Create the queue and worker on the running loop."""
        self._queue = asyncio.Queue(maxsize=self._max_queue)
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Cancel the worker; requests still queued fail with CancelledError."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._queue is not None:
            while not self._queue.empty():
                _, future = self._queue.get_nowait()
                future.cancel()

    @property
    def depth(self) -> int:
        """Items waiting (not counting the batch being scored)."""
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, item: Item) -> Result:
        """Queue ``item`` and wait for its result; raises :class:`QueueFullError` at capacity."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((item, future))
        except asyncio.QueueFull as exc:
            raise QueueFullError(f"batch queue full ({self._max_queue} waiting)") from exc
        return await future

    async def _collect(self) -> list[tuple[Item, asyncio.Future[Result]]]:
        """Block for one item, then take more until the batch is full or the wait is over."""
        assert self._queue is not None
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_wait_s
        while len(batch) < self._max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            live = [(item, future) for item, future in batch if not future.cancelled()]
            if not live:
                continue
            if self._on_batch is not None:
                self._on_batch(len(live))
            try:
                results = await asyncio.to_thread(self._process, [item for item, _ in live])
            except Exception as exc:
                for _, future in live:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(live, results, strict=True):
                if not future.done():
                    future.set_result(result)
