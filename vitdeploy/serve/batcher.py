"""Dynamic batching: requests queue single images; one worker takes up to `max_batch`
of them, or what arrived within `max_wait_ms` of the first, runs the backend once in a
thread of its own (never on the event loop) and answers each image's future.

The queue is bounded: when it is full, `submit` raises `QueueFull` at once instead of
letting memory grow. Images whose request gave up (timeout, disconnect) are dropped
before they reach the backend.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np


class QueueFull(Exception):
    """The queue holds `max_queue` images already."""


@dataclass(frozen=True)
class BatchStats:
    """What one backend call did, for metrics: its images, the seconds to stack them into one
    array and the seconds of the backend call."""

    size: int
    seconds: float
    stack_seconds: float = 0.0


@dataclass(frozen=True)
class Row:
    """One image's answer: its logits, how long it waited for its batch, and that batch's record."""

    logits: np.ndarray
    queued_seconds: float
    batch: BatchStats


class Batcher:
    """Collects images into batches for `infer` (uint8 NCHW batch -> logits)."""

    def __init__(self, infer: Callable[[np.ndarray], np.ndarray], max_batch: int, max_wait_ms: float, max_queue: int,
                 on_batch: Callable[[BatchStats], None] | None = None) -> None:
        self.infer = infer
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future, float]] | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitdeploy-infer")
        self._closing = False

    def start(self) -> None:
        self._queue = asyncio.Queue(self.max_queue)
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="vitdeploy-batcher")

    @property
    def depth(self) -> int:
        """Images waiting for a batch."""
        return self._queue.qsize() if self._queue is not None else 0

    def submit(self, images: list[np.ndarray]) -> list[asyncio.Future]:
        """Queue the images of one request, all or none; their futures resolve to `Row`s."""
        if self._queue is None or self._closing:
            raise QueueFull("the server is shutting down")
        if self._queue.qsize() + len(images) > self.max_queue:
            raise QueueFull(f"{self._queue.qsize()} images are queued (limit {self.max_queue})")
        loop = asyncio.get_running_loop()
        futures = []
        for image in images:
            future = loop.create_future()
            self._queue.put_nowait((image, future, time.perf_counter()))
            futures.append(future)
        return futures

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await self._queue.get()
            if item is None:  # close(): everything queued before it has been answered
                return
            batch = [item]
            deadline = loop.time() + self.max_wait
            stop = False
            while len(batch) < self.max_batch:
                try:
                    if self._queue.empty():
                        remaining = deadline - loop.time()
                        if remaining <= 0:
                            break
                        nxt = await asyncio.wait_for(self._queue.get(), remaining)
                    else:
                        nxt = self._queue.get_nowait()
                except (asyncio.TimeoutError, TimeoutError):
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            await self._answer(loop, batch)
            if stop:
                return

    async def _answer(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[np.ndarray, asyncio.Future, float]]) -> None:
        live = [item for item in batch if not item[1].done()]
        if not live:
            return
        started = time.perf_counter()
        try:
            logits, stats = await loop.run_in_executor(self._executor, self._run_batch, [image for image, _, _ in live])
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the failure, the server goes on
            for _, future, _ in live:
                if not future.done():
                    future.set_exception(exc)
            return
        if self.on_batch is not None:
            self.on_batch(stats)
        for (_, future, queued), row in zip(live, logits, strict=True):
            if not future.done():
                future.set_result(Row(row, started - queued, stats))

    def _run_batch(self, images: list[np.ndarray]) -> tuple[np.ndarray, BatchStats]:
        start = time.perf_counter()
        batch = np.stack(images)
        stacked = time.perf_counter()
        logits = self.infer(batch)
        return logits, BatchStats(len(images), time.perf_counter() - stacked, stacked - start)

    async def close(self) -> None:
        """Refuse new images, answer every queued one, stop the worker."""
        self._closing = True
        if self._queue is not None and self._worker is not None:
            await self._queue.put(None)
            await self._worker
        self._executor.shutdown(wait=True)
