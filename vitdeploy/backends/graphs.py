"""CUDA graphs for the GPU backends: one captured graph per batch-size bucket.

Small ViTs are launch-bound at small batches; a CUDA graph replays a whole forward pass
with one launch. Graphs fix shapes and addresses, so each bucket has static device
buffers: a batch is copied into its bucket's input (padded with zeros up to the bucket
size), the graph is replayed, and the first rows of the static output are read.

Before a bucket's graph is used, its replay is checked against the same backend without
graphs at the same bucket size on the real batch that first needed it (bitwise for
TensorRT and ONNX Runtime, within a relative 1e-6 for PyTorch). A capture that fails or
a replay that differs leaves that bucket without a graph, with one line saying so; it is
never silent. `describe()` says which buckets have graphs and which bucket ran last.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from vitdeploy.errors import VitDeployError


class StaticRun(Protocol):
    """One bucket's fixed-shape work on static device buffers (backend-specific)."""

    def load(self, images: np.ndarray) -> None:
        """Copy a host batch into the static input, zero-padding it to the bucket size."""

    def reference(self) -> np.ndarray:
        """Logits of the loaded bucket computed without a graph (host array, all bucket rows)."""

    def capture(self, graph: Any) -> None:
        """Record the work on the static buffers into `graph`."""

    def read(self, rows: int) -> np.ndarray:
        """The first `rows` rows of the static output, on the host, after the device finished."""


class Graph(Protocol):
    def replay(self) -> None: ...


@dataclass
class GraphEntry:
    """One bucket: its static buffers and its graph (None: the bucket runs without one, `note` says why)."""

    static: StaticRun
    graph: Graph | None
    note: str = ""


def load_padded(buffer: Any, images: np.ndarray, bucket: int, device: Any) -> Any:
    """`images` copied into a bucket's static device input, zero-padded to the bucket size; the
    buffer (a torch tensor) is made on first use and reused, since graphs fix its address."""
    import torch

    host = torch.from_numpy(np.ascontiguousarray(images))
    if buffer is None:
        buffer = torch.zeros((bucket, *host.shape[1:]), dtype=host.dtype, device=device)
    buffer.zero_()
    buffer[: len(images)].copy_(host)
    return buffer


@dataclass
class GraphSet:
    """The graphs of one backend. `buckets` None: each batch size is its own bucket (bench)."""

    name: str
    prepare: Callable[[int], StaticRun]
    graph_factory: Callable[[], Graph]
    buckets: tuple[int, ...] | None = None
    exact: bool = True  # bitwise check (TensorRT, ONNX Runtime) or relative 1e-6 (PyTorch)
    say: Callable[[str], None] = print
    entries: dict[int, GraphEntry] = field(default_factory=dict)
    last_bucket: int | None = None

    def bucket_for(self, rows: int) -> int:
        if self.buckets is None:
            return rows
        fitting = [b for b in self.buckets if b >= rows]
        if not fitting:
            raise VitDeployError(f"batch {rows} is larger than the largest CUDA-graph bucket {max(self.buckets)}; "
                                 "send smaller batches or raise --max-batch")
        return min(fitting)

    def run(self, images: np.ndarray) -> np.ndarray | None:
        """Logits through the bucket's graph; None when that bucket has no graph (run eagerly instead)."""
        bucket = self.bucket_for(len(images))
        entry = self.entries.get(bucket) or self._capture(bucket, images)
        self.last_bucket = bucket if entry.graph is not None else None
        if entry.graph is None:
            return None
        entry.static.load(images)
        entry.graph.replay()
        return entry.static.read(len(images))

    def staged(self, images: np.ndarray) -> GraphEntry | None:
        """Device mode: the bucket loaded with `images`, to replay with `replay_staged` (None: no graph)."""
        bucket = self.bucket_for(len(images))
        entry = self.entries.get(bucket) or self._capture(bucket, images)
        if entry.graph is None:
            return None
        entry.static.load(images)
        self.last_bucket = bucket
        return entry

    def _capture(self, bucket: int, images: np.ndarray) -> GraphEntry:
        static = self.prepare(bucket)
        try:
            static.load(images)
            expected = static.reference()
            graph = self.graph_factory()
            static.capture(graph)
            static.load(images)
            graph.replay()
            got = static.read(bucket)
        except Exception as exc:  # noqa: BLE001 - every runtime raises its own types; we fall back and say why
            entry = GraphEntry(static, None, f"capture failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        else:
            same = np.array_equal(got, expected) if self.exact else np.allclose(got, expected, rtol=1e-6, atol=0)
            entry = GraphEntry(static, graph if same else None,
                           "" if same else f"replay differs from the run without a graph (max |d| "
                                           f"{float(np.max(np.abs(got.astype(np.float64) - expected))):.3g})")
        if entry.graph is None:
            self.say(f"{self.name}: no CUDA graph for batch {bucket} ({entry.note}); that batch size runs without one")
        self.entries[bucket] = entry
        return entry

    def describe(self) -> dict[str, Any]:
        return {"buckets": list(self.buckets) if self.buckets else "each batch size",
                "captured": sorted(b for b, e in self.entries.items() if e.graph is not None),
                "failed": {str(b): e.note for b, e in sorted(self.entries.items()) if e.graph is None},
                "last_bucket": self.last_bucket}


def power_of_two_buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to `max_batch` (which is always a bucket): serve's graph buckets."""
    buckets, size = [], 1
    while size < max_batch:
        buckets.append(size)
        size *= 2
    return (*buckets, max_batch)


class TorchCudaGraph:
    """torch.cuda.CUDAGraph captured on a given (non-default) stream."""

    def __init__(self, stream: Any) -> None:
        import torch

        self.graph = torch.cuda.CUDAGraph()
        self.stream = stream

    def capture(self, work: Callable[[], None]) -> None:
        import torch

        with torch.cuda.graph(self.graph, stream=self.stream):
            work()

    def replay(self) -> None:
        """Replay on the capture stream, after whatever the current stream has queued (the input copy)."""
        import torch

        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self.graph.replay()
