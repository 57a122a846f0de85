"""The server's explanations (`POST /v1/explain`): its own PyTorch copy of the model,
outside the prediction batcher, one explanation at a time on one thread.

Hooks are installed on this copy only, for the duration of one explanation, so the
prediction path never sees them. Requests beyond `max_waiting` are refused (503) rather
than queued without bound: an explanation costs a forward pass (and, for grad-rollout, a
backward pass) in PyTorch, far more than a batched prediction.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitdeploy.errors import VitDeployError
from vitdeploy.explain import Tokens, explain_images, load_explained_model
from vitdeploy.models import LoadedModel


class ExplainBusy(Exception):
    """More explanations are waiting than the server takes."""


class Explainer:
    """A PyTorch model with its preprocessing and class names, explaining one image at a time."""

    def __init__(self, loaded: LoadedModel, max_waiting: int) -> None:
        self.loaded = loaded
        self.classes = loaded.class_names
        self.max_waiting = max_waiting
        self.pending = 0  # running + waiting; changed on the event loop only
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitdeploy-explain")

    @classmethod
    def open(cls, artifacts: Path, checkpoint: Path | None, max_waiting: int,
             threads: int | None = None) -> tuple[Explainer | None, str]:
        """The explainer, or None and the reason /v1/explain will give (the server starts either way).

        `threads` caps PyTorch's CPU threads: when another runtime serves predictions, PyTorch
        does nothing but explain, and one thread leaves the other cores to predictions."""
        if threads is not None:
            torch.set_num_threads(threads)
        if max_waiting == 0:
            return None, "explanations are turned off (--explain-queue 0)"
        try:
            loaded = load_explained_model(artifacts, checkpoint)
        except VitDeployError as exc:
            return None, f"no PyTorch model to explain with: {exc}"
        return cls(loaded, max_waiting), ""

    def full(self) -> bool:
        """Whether an explanation asked for now would be refused (a cheap check before any work)."""
        return self.pending >= self.max_waiting

    async def explain(self, image: np.ndarray, method: str, target: int) -> tuple[dict[str, Any], np.ndarray, float]:
        """(record, map, seconds) for one uint8 image (3 x H x W) and class `target`."""
        if self.full():
            raise ExplainBusy(f"{self.pending} explanations in progress or waiting (limit {self.max_waiting})")
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._explain, image, method, target)
        finally:
            self.pending -= 1

    def _explain(self, image: np.ndarray, method: str, target: int) -> tuple[dict[str, Any], np.ndarray, float]:
        start = time.perf_counter()
        loaded = self.loaded
        records, maps = explain_images(loaded.module, loaded.preprocessing, self.classes, image[None], method, target=target,
                                       top_k=len(self.classes), tokens=Tokens.of(loaded.spec))
        return records[0], maps[0], time.perf_counter() - start

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
