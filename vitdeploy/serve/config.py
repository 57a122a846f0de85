"""The settings of `vitdeploy serve`, checked before anything is loaded."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitdeploy.backends import registry
from vitdeploy.errors import VitDeployError

MAX_BODY_MB = 1024.0


def body_bytes(max_body_mb: float) -> int:
    """--max-body-mb in bytes, refused unless finite and within (0, 1024] MiB."""
    if not math.isfinite(max_body_mb) or not 0 < max_body_mb <= MAX_BODY_MB:
        raise VitDeployError(f"--max-body-mb must be a number in (0, {MAX_BODY_MB:g}] (got {max_body_mb})")
    return int(max_body_mb * 2**20)


@dataclass(frozen=True)
class ServeConfig:
    """Everything the server needs; `check` validates it against the artifact's manifest."""

    artifacts: Path
    backend: str = registry.DEFAULT
    precision: str = "fp32"
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    max_body_bytes: int = 8 * 2**20
    max_images_per_request: int = 64
    timeout_s: float = 30.0
    read_timeout_s: float = 10.0
    write_timeout_s: float = 10.0
    max_connections: int = 512
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    threads: int | None = None
    checkpoint: Path | None = None
    cuda_graph: bool = False
    explain_queue: int = 4
    tome: int | tuple[int, ...] | None = None  # token merging (`tome.parse`): the merged graph, or pytorch merging

    @property
    def shutdown_timeout_s(self) -> int:
        """How long a graceful shutdown may wait: what one request may take, reading, answering and the
        client taking the answer."""
        return math.ceil(self.read_timeout_s + self.timeout_s + self.write_timeout_s)

    @property
    def images_per_request(self) -> int:
        """The most images one request may carry: a request larger than the queue could never be answered."""
        return min(self.max_images_per_request, self.max_queue)

    def check(self, manifest: dict[str, Any]) -> None:
        lo, hi = manifest["batch"]["min"], manifest["batch"]["max"]
        checks = [
            (lo <= self.max_batch <= hi, f"--max-batch {self.max_batch} is outside the exported batch range {lo}..{hi}"),
            (0 <= self.max_wait_ms <= 10_000, "--max-wait-ms must be in 0..10000"),
            (self.max_queue >= self.max_batch, f"--max-queue must be at least --max-batch ({self.max_batch})"),
            (self.max_body_bytes >= 1024, "--max-body-mb is too small to hold an image"),
            (self.max_images_per_request >= 1, "--max-images-per-request must be at least 1"),
            (0 < self.timeout_s <= 3600, "--timeout-s must be in (0, 3600]"),
            (0 < self.read_timeout_s <= 600, "--read-timeout-s must be in (0, 600]"),
            (0 < self.write_timeout_s <= 600, "--write-timeout-s must be in (0, 600]"),
            (self.max_connections >= 1, "--max-connections must be at least 1"),
            (0 <= self.explain_queue <= 1024, "--explain-queue must be in 0..1024 (0 turns /v1/explain off)"),
            (0 <= self.port <= 65535, f"--port {self.port} is not a TCP port"),
            (self.api_key is None or len(self.api_key.encode("utf-8")) >= 8, "the API key must have at least 8 bytes"),
        ]
        for ok, message in checks:
            if not ok:
                raise VitDeployError(message)
