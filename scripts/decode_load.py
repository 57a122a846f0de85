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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", type=Path)
    args = parser.parse_args()
    heavy = png(np.zeros((6324, 6324), np.uint16))
    small = png(np.random.default_rng(0).integers(0, 255, (32, 32, 3)).astype(np.uint8))
    server = Server(args.artifacts, "--max-batch", "8", "--timeout-s", "30")
    try:
        httpx.post(server.url + "/v1/predict", content=small, timeout=30)  # warm
        idle = rss_mb(server.proc.pid)
        peak, done = [idle], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_mb(server.proc.pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
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
        print(f"idle RSS {idle:.0f} MB, peak {peak[0]:.0f} MB (+{peak[0] - idle:.0f} MB); small prediction "
              f"{small_s:.2f} s (HTTP {answer.status_code}); 8 large: {statuses} in {large_s:.1f} s")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
