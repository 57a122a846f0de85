"""The backend interface and the one helper that feeds it a whole image set."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.backends.graphs import GraphEntry, GraphSet
from vitdeploy.errors import VitDeployError
from vitdeploy.manifest import INPUT, OUTPUT
from vitdeploy.progress import Ticker, eta


@dataclass(frozen=True)
class OpenRequest:
    """What a backend is opened with: the artifact folder and its manifest, the precision, the
    artifact of that precision the backend runs (None for the pytorch backend, which runs the
    checkpoint), and the run-time options.

    `threads` sets the CPU threads of the CPU runtimes; `checkpoint` overrides where the
    pytorch backend finds the training checkpoint; `cuda_graph` replays CUDA graphs per
    batch-size bucket (`graph_buckets`, or each batch size when None), saying through `say`
    where a graph cannot be used. `tome` picks the graph exported with that token merging (the
    pytorch backend merges tokens itself).
    """

    folder: Path
    manifest: dict[str, Any]
    precision: str = "fp32"
    artifact: dict[str, Any] | None = None
    threads: int | None = None
    compile: bool = False
    checkpoint: Path | None = None
    cuda_graph: bool = False
    graph_buckets: tuple[int, ...] | None = None
    say: Callable[[str], None] = print
    tome: int | tuple[int, ...] | None = None  # token merging (`tome.parse`): the merged graph, or merging in PyTorch

    def graphs(self) -> dict[str, Any]:
        """The CUDA-graph keyword arguments every graph-capable backend takes."""
        return {"cuda_graph": self.cuda_graph, "graph_buckets": self.graph_buckets, "say": self.say}


class Backend(ABC):
    """Runs a classifier: host images in (the manifest's input contract), host float32 logits out.

    Construction is cheap; `activate` loads the model (sessions, engines, device
    memory) and `deactivate` releases it. Use as a context manager.

    GPU backends also offer a device mode for benchmarks: `stage` puts a batch on the
    device once, and `run_staged` runs it and waits for the result, so that host-device
    copies are left out of the measurement.
    """

    name: str = "backend"
    device_mode: bool = False
    max_batch: int | None = None  # the exported batch range's top; larger batches are refused
    input_name, output_name = INPUT, OUTPUT  # the graph's tensors, as every export names them
    graphs: GraphSet | None = None  # CUDA graphs per batch-size bucket (GPU backends with --cuda-graph)

    @abstractmethod
    def activate(self) -> None: ...

    @abstractmethod
    def active(self) -> bool:
        """Whether `activate` has run (and `deactivate` not since)."""

    @abstractmethod
    def _infer_eager(self, images: np.ndarray) -> np.ndarray:
        """Logits of a checked batch without a CUDA graph."""

    def infer(self, images: np.ndarray) -> np.ndarray:
        """Host logits of a host batch: through its bucket's CUDA graph where there is one, else eagerly."""
        self._check(images)
        if self.graphs is not None:
            logits = self.graphs.run(images)
            if logits is not None:
                return logits
        return self._infer_eager(images)

    def stage(self, images: np.ndarray) -> Any:
        """A batch placed on the device, ready for `run_staged` (device-mode backends only): its
        loaded CUDA-graph bucket, or the backend's own staged form."""
        self._check(images)
        if self.graphs is not None:
            entry = self.graphs.staged(images)
            if entry is not None:
                return entry
        return self._stage_eager(images)

    def run_staged(self, staged: Any) -> None:
        """Run a staged batch and wait until the device has finished."""
        if isinstance(staged, GraphEntry):
            staged.graph.replay()
        else:
            self._run_staged_eager(staged)
        self._wait()

    def _stage_eager(self, images: np.ndarray) -> Any:
        raise NotImplementedError(f"{self.name} has no device mode")

    def _run_staged_eager(self, staged: Any) -> None:
        raise NotImplementedError(f"{self.name} has no device mode")

    def _wait(self) -> None:  # noqa: B027 - optional: host backends and ONNX Runtime return when done
        """Wait until the device has finished the work queued by `run_staged`."""

    def _check(self, images: np.ndarray) -> None:
        if not self.active():
            raise RuntimeError("activate() the backend first")
        if self.max_batch is not None and len(images) > self.max_batch:
            raise VitDeployError(f"batch of {len(images)} exceeds the exported maximum {self.max_batch}; "
                                 "re-export with a larger --max-batch")

    def deactivate(self) -> None:  # noqa: B027 - optional: a backend that holds nothing releases nothing
        """Release what `activate` took; the default has nothing to release."""

    def describe(self) -> dict[str, Any]:
        """Name, device, precision and versions, for reports."""
        return {"name": self.name}

    def __enter__(self) -> Backend:
        self.activate()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.deactivate()


def run_batches(backend: Backend, images: np.ndarray, batch_size: int,
                say: Callable[[str], None] | None = None, what: str = "") -> np.ndarray:
    """Logits for every image, in batches of at most `batch_size`; with `say`, a progress line at the
    interval of `vitdeploy.progress` (a 10,000-image parity pass takes minutes on a CPU)."""
    ticker, start, parts = Ticker(), time.perf_counter(), []
    for i in range(0, len(images), batch_size):
        parts.append(backend.infer(images[i:i + batch_size]))
        done = min(i + batch_size, len(images))
        if say is not None and done < len(images) and ticker.due():
            rate = done / (time.perf_counter() - start)
            say(f"{what}{' ' if what else ''}{done}/{len(images)} images, {rate:,.1f} images/s, "
                f"~{eta((len(images) - done) / rate)} left")
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
