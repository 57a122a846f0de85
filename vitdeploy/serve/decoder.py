"""Image decoding for the server, off the event loop and bounded by what it costs.

Decoding a large picture takes seconds of CPU and its decoded size in memory (up to
`images.MAX_PIXELS` x 4 bytes), whatever its compressed size: a 78 kB PNG can decode to
80 MB. So the server decodes in two dedicated lanes: pictures whose header says they
decode to more than `LARGE_BYTES` go to a lane of one thread (at most one large decode at
a time: bounded memory, and the other cores keep serving), the rest to a lane of two.
A small picture never waits behind large ones. Every decode is admitted (the caller holds
an admission slot while it waits here), so the lanes' queues are bounded by --max-queue.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from vitdeploy.images import Fit, decode_image, decoded_bytes, header

LARGE_BYTES = 16 * 2**20  # e.g. a 2,400 x 2,400 RGB picture


class Decoder:
    """Two thread pools; `decode` picks one by the picture's decoded size."""

    def __init__(self, fit: Fit, small_threads: int = 2) -> None:
        self.fit = fit
        self._small = ThreadPoolExecutor(max_workers=small_threads, thread_name_prefix="vitdeploy-decode")
        self._large = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitdeploy-decode-large")

    async def decode(self, data: bytes, name: str) -> np.ndarray:
        """uint8 (3, size, size) of one picture (fitted as the model's preprocessing says); raises VitDeployError for a refused or unreadable one."""
        loop = asyncio.get_running_loop()
        described = await loop.run_in_executor(self._small, header, data)
        large = described is not None and decoded_bytes(*described) > LARGE_BYTES
        return await loop.run_in_executor(self._large if large else self._small, decode_image, data, self.fit, name)

    def close(self) -> None:
        self._small.shutdown(wait=False, cancel_futures=True)
        self._large.shutdown(wait=False, cancel_futures=True)
