#!/usr/bin/env python3
"""Decode-heavy load on `vitdeploy serve` (issue 19): 8 concurrent 78 kB PNGs that decode to
6324x6324 16-bit gray, and a 32x32 prediction sent meanwhile. Prints the server's peak
memory above idle (sampled every 20 ms from /proc) and the small prediction's latency.

    python3 scripts/decode_load.py ARTIFACT_FOLDER
"""

from __future__ import annotations

import argparse
import io
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_serve import Server  # noqa: E402 - the test suite's server runner


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc")


def measure(artifacts: Path, *server_args: str) -> dict:
    """Serve `artifacts`, send the 8 large pictures and the small one; the numbers, as a record."""
    heavy = png(np.zeros((6324, 6324), np.uint16))
    small = png(np.random.default_rng(0).integers(0, 255, (32, 32, 3)).astype(np.uint8))
    server = Server(artifacts, "--max-batch", "8", "--timeout-s", "30", *server_args)
    peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb(server.proc.pid))
            time.sleep(0.02)

    try:
        httpx.post(server.url + "/v1/predict", content=small, timeout=30)  # warm
        idle = peak[0] = rss_mb(server.proc.pid)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        with ThreadPoolExecutor(8) as pool:
            start = time.perf_counter()
            large = [pool.submit(httpx.post, server.url + "/v1/predict", content=heavy, timeout=120) for _ in range(8)]
            time.sleep(0.5)
            sent = time.perf_counter()
            answer = httpx.post(server.url + "/v1/predict", content=small, timeout=30)
            small_s = time.perf_counter() - sent
            statuses = [f.result().status_code for f in large]
            large_s = time.perf_counter() - start
        done.set()
        sampler.join()
    finally:
        done.set()
        server.stop()
    return {"large_png_bytes": len(heavy), "idle_rss_mb": round(idle), "peak_rss_mb": round(peak[0]),
            "peak_above_idle_mb": round(peak[0] - idle), "small_status": answer.status_code,
            "small_seconds": round(small_s, 3), "large_statuses": statuses, "large_seconds": round(large_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", type=Path)
    r = measure(parser.parse_args().artifacts)
    print(f"idle RSS {r['idle_rss_mb']} MB, peak {r['peak_rss_mb']} MB (+{r['peak_above_idle_mb']} MB); small prediction "
          f"{r['small_seconds']:.2f} s (HTTP {r['small_status']}); 8 large: {r['large_statuses']} in {r['large_seconds']} s")


if __name__ == "__main__":
    main()
