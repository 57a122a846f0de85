"""The served model's statistics in the form of Triton's statistics extension
(GET /v2/models/NAME/stats), which perf_analyzer and Triton dashboards read.

Counts and cumulative nanoseconds, since the server started, for every request that reached
the model, whichever endpoint it came through (/v1/predict, /v2/.../infer). Per request:
`success`/`fail` is the time from its images entering the queue to its answer; `queue` the
longest wait of its images for a batch; `compute_input` and `compute_infer` those of the
slowest batch that ran its images (stacking the images into one array; the backend call);
`compute_output` gathering its rows of logits. Per batch size, the batches' own times.
There is no response cache: its counts stay zero.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from vitdeploy.serve.batcher import BatchStats, Row


@dataclass
class Duration:
    """A count and the nanoseconds they took together."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += max(0, round(seconds * 1e9))

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class BatchSizeStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStats:
    """What the served model did; changed on the event loop only."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batch_sizes: dict[int, BatchSizeStats] = field(default_factory=dict)
    inference_count: int = 0  # images answered
    execution_count: int = 0  # backend calls
    last_inference_ms: int = 0  # milliseconds since the epoch

    def batch(self, stats: BatchStats) -> None:
        """One backend call."""
        self.execution_count += 1
        self.inference_count += stats.size
        self.last_inference_ms = int(time.time() * 1000)
        sized = self.batch_sizes.setdefault(stats.size, BatchSizeStats())
        sized.compute_input.add(stats.stack_seconds)
        sized.compute_infer.add(stats.seconds)
        sized.compute_output.add(0.0)  # the rows are handed back as views of the batch's logits

    def answered(self, rows: list[Row], seconds: float, output_seconds: float) -> None:
        """One request whose images were all answered, in `seconds` from queueing to its answer."""
        self.success.add(seconds)
        self.queue.add(max(r.queued_seconds for r in rows))
        slowest = max((r.batch for r in rows), key=lambda b: b.seconds)
        self.compute_input.add(slowest.stack_seconds)
        self.compute_infer.add(slowest.seconds)
        self.compute_output.add(output_seconds)

    def failed(self, seconds: float) -> None:
        """One request that reached the queue and got no answer (backend failure, deadline, client gone)."""
        self.fail.add(seconds)

    def to_json(self, name: str, version: str) -> dict[str, Any]:
        """One entry of Triton's `model_stats` list."""
        inference = {key: getattr(self, key).to_json() for key in
                     ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")}
        none = Duration().to_json()
        return {
            "name": name, "version": version, "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count, "execution_count": self.execution_count,
            "inference_stats": {**inference, "cache_hit": none, "cache_miss": none},
            "batch_stats": [{"batch_size": size, "compute_input": s.compute_input.to_json(),
                             "compute_infer": s.compute_infer.to_json(), "compute_output": s.compute_output.to_json()}
                            for size, s in sorted(self.batch_sizes.items())],
        }
