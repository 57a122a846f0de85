"""Prometheus metrics of one server (its own registry, so several apps in one process
do not share counters)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Requests by endpoint and status, request latency, batch sizes, queue depth."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("vitdeploy_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("vitdeploy_request_latency_seconds", "Request latency, arrival to response",
                                 ["endpoint"], registry=self.registry)
        self.batch_size = Histogram("vitdeploy_batch_size", "Images per backend call", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.inference = Histogram("vitdeploy_inference_seconds", "Backend time per batch", registry=self.registry)
        self.queue_depth = Gauge("vitdeploy_queue_depth", "Images waiting for a batch", registry=self.registry)
        self.in_flight = Gauge("vitdeploy_requests_in_flight", "Prediction requests being read, decoded or queued",
                               registry=self.registry)
        self.images = Counter("vitdeploy_images", "Images answered", registry=self.registry)
        self.explain_seconds = Histogram("vitdeploy_explain_seconds", "Time per explanation (PyTorch, hooked attention)",
                                         buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30), registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
