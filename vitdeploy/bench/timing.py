"""The timing loop: warm-up, then timed iterations until both a minimum count and a
minimum time are reached, or a time cap ends it first (which the result says).

Each iteration is timed on the host around a call that returns only when its work is
done (host logits in end-to-end mode; a device synchronization in device mode), so the
latency is the work, not the launch. Inputs rotate over several batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from vitdeploy.errors import VitDeployError


@dataclass(frozen=True)
class TimingPolicy:
    """How long to measure one configuration."""

    warmup: int = 3
    min_iters: int = 20
    min_seconds: float = 1.0
    max_seconds: float = 20.0

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise VitDeployError("--warmup must not be negative")
        if self.min_iters < 1:
            raise VitDeployError("--min-iters must be at least 1")
        if self.min_seconds < 0 or self.max_seconds <= 0:
            raise VitDeployError("--min-seconds must not be negative and --max-seconds must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Timing:
    """Per-iteration latencies (seconds) of the timed iterations."""

    latencies_s: list[float]
    warmup_iters: int
    capped: bool  # the time cap ended the run before min_iters / min_seconds were both met

    def summary(self, batch_size: int) -> dict[str, Any]:
        """Flat statistics with units in the names."""
        lat = np.asarray(self.latencies_s) * 1e3
        total_s = float(np.sum(self.latencies_s))
        return {
            "iterations": len(lat),
            "warmup_iterations": self.warmup_iters,
            "capped_by_max_seconds": self.capped,
            "latency_ms_p50": float(np.percentile(lat, 50)),
            "latency_ms_p90": float(np.percentile(lat, 90)),
            "latency_ms_p99": float(np.percentile(lat, 99)),
            "latency_ms_mean": float(lat.mean()),
            "latency_ms_min": float(lat.min()),
            "latency_ms_max": float(lat.max()),
            "latency_ms_std": float(lat.std()),
            "images_per_s": batch_size * len(lat) / total_s if total_s > 0 else float("inf"),
            "timed_seconds": total_s,
        }


def measure(run: Callable[[Any], Any], inputs: Sequence[Any], policy: TimingPolicy,
            clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Time `run(input)` over `inputs` in rotation. Warm-up takes at most a quarter of the cap."""
    if not inputs:
        raise ValueError("measure needs at least one input")
    start = clock()
    warmed = 0
    while warmed < policy.warmup and (warmed == 0 or clock() - start < policy.max_seconds / 4):
        run(inputs[warmed % len(inputs)])
        warmed += 1
    latencies: list[float] = []
    spent = 0.0
    i = 0
    while True:
        t0 = clock()
        run(inputs[i % len(inputs)])
        t1 = clock()
        latencies.append(t1 - t0)
        spent += t1 - t0
        i += 1
        if i >= policy.min_iters and spent >= policy.min_seconds:
            return Timing(latencies, warmed, capped=False)
        if spent >= policy.max_seconds:
            return Timing(latencies, warmed, capped=True)
