"""`vitdeploy loadtest`: a concurrency sweep against a running `vitdeploy serve`, like
perf_analyzer's: at each level, that many clients send predictions back to back on their own
kept-alive connections for a fixed number of requests; throughput, latency percentiles and
errors per level, as a flat record per level (JSON, CSV) and a plot.

Clients are threads with the standard library's HTTP client (no extra package); every
request's latency is measured from sending to the whole answer read.
"""

from __future__ import annotations

import http.client
import io
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from vitdeploy.errors import VitDeployError


@dataclass(frozen=True)
class LoadOptions:
    url: str
    images: tuple[bytes, ...]
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    requests: int = 200  # per level
    timeout_s: float = 60.0
    api_key: str | None = None

    def validate(self) -> None:
        parsed = urllib.parse.urlsplit(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise VitDeployError(f"URL must be http://HOST:PORT of a vitdeploy server (got {self.url[:100]!r})")
        if not self.images:
            raise VitDeployError("no images to send: pass --image FILE or --data-dir with the CIFAR-10 test set")
        if not self.concurrency or not all(1 <= c <= 1024 for c in self.concurrency):
            raise VitDeployError("--concurrency takes levels from 1 to 1024, e.g. 1,4,16,64")
        if not 1 <= self.requests <= 1_000_000:
            raise VitDeployError("--requests must be in 1..1000000")
        if not 0 < self.timeout_s <= 3600:
            raise VitDeployError("--timeout-s must be in (0, 3600]")


class _Client:
    """One kept-alive connection, reopened after an error."""

    def __init__(self, options: LoadOptions) -> None:
        parts = urllib.parse.urlsplit(options.url)
        self.parts, self.options, self.conn = parts, options, None
        self.path = (parts.path.rstrip("/") or "") + "/v1/predict"
        self.headers = {"Content-Type": "application/octet-stream"}
        if options.api_key:
            self.headers["X-API-Key"] = options.api_key

    def send(self, body: bytes) -> tuple[int, float]:
        """(HTTP status or 0 for a transport error, seconds)."""
        start = time.perf_counter()
        try:
            if self.conn is None:
                kind = http.client.HTTPSConnection if self.parts.scheme == "https" else http.client.HTTPConnection
                self.conn = kind(self.parts.hostname, self.parts.port, timeout=self.options.timeout_s)
            self.conn.request("POST", self.path, body=body, headers=self.headers)
            response = self.conn.getresponse()
            response.read()
            status = response.status
            if response.getheader("connection", "").lower() == "close":
                self.close()
        except (OSError, http.client.HTTPException):
            self.close()
            status = 0
        return status, time.perf_counter() - start

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def run_level(options: LoadOptions, concurrency: int) -> dict[str, Any]:
    """`options.requests` predictions from `concurrency` clients; one flat record."""
    counter, lock = iter(range(options.requests)), threading.Lock()

    def client_loop() -> list[tuple[int, float]]:
        client, results = _Client(options), []
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                client.close()
                return results
            results.append(client.send(options.images[i % len(options.images)]))

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = [r for f in [pool.submit(client_loop) for _ in range(concurrency)] for r in f.result()]
    wall = time.perf_counter() - start
    ok = np.array([s for status, s in results if status == 200]) * 1000
    statuses: dict[str, int] = {}
    for status, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    percentile = (lambda q: round(float(np.percentile(ok, q)), 3)) if len(ok) else (lambda q: None)
    return {"concurrency": concurrency, "requests": len(results), "ok": int(len(ok)), "statuses": statuses,
            "wall_s": round(wall, 3), "requests_per_s": round(len(ok) / wall, 2),
            "latency_ms_p50": percentile(50), "latency_ms_p90": percentile(90), "latency_ms_p99": percentile(99),
            "latency_ms_max": round(float(ok.max()), 3) if len(ok) else None}


def check_server(options: LoadOptions) -> dict[str, Any]:
    """GET /v1/model: the server is there and says what it serves (fails fast, before the sweep)."""
    import json

    client = _Client(options)
    parts = client.parts
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = kind(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", (parts.path.rstrip("/") or "") + "/v1/model", headers=client.headers)
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise VitDeployError(f"no vitdeploy server answers at {options.url} ({exc}); start one with `vitdeploy serve`") from None
    finally:
        conn.close()
    if response.status != 200:
        raise VitDeployError(f"{options.url}/v1/model answered {response.status}: {body[:200].decode(errors='replace')}"
                             + (" (pass --api-key)" if response.status == 401 else ""))
    return json.loads(body)


def plot_png(levels: list[dict[str, Any]], title: str) -> bytes:
    """Requests/s and latency percentiles against concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    xs = [r["concurrency"] for r in levels]
    fig, (ax_thr, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.5))
    ax_thr.plot(xs, [r["requests_per_s"] for r in levels], marker="o")
    ax_thr.set_ylabel("requests/s (answered 200)")
    for q in ("p50", "p90", "p99"):
        ax_lat.plot(xs, [r[f"latency_ms_{q}"] for r in levels], marker="o", label=q)
    ax_lat.set_ylabel("latency, ms")
    ax_lat.legend()
    for ax in (ax_thr, ax_lat):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("concurrent clients")
        ax.grid(True, alpha=0.3)
        ax.set_title(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
