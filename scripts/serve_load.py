"""Load test of `vitdeploy serve` on loopback, as issue 5's done-when describes: N
requests from C concurrent clients, each a real CIFAR-10 test image sent as PNG; every
answer is compared with the probabilities the same backend gives offline; the server's
resident memory is read at request 1,000 and at the end; then a burst beyond the queue
limit must get 503s, not a crash, and the server must answer again afterwards.

    python3 scripts/serve_load.py ART --data-dir data --requests 2000 --concurrency 32 --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from vitdeploy.backends.base import run_batches
from vitdeploy.backends.factory import model_input, open_backend
from vitdeploy.data import load_test
from vitdeploy.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--backend", default="ort-cpu")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5)
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--burst", type=int, default=600)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    manifest = read_manifest(args.artifacts)
    test = load_test(args.data_dir)
    n_images = min(args.requests, len(test))
    images = test.images[:n_images].numpy()
    with open_backend(args.artifacts, manifest, args.backend) as backend:
        logits = run_batches(backend, model_input(manifest, images, args.backend), 64)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    offline = e / e.sum(axis=1, keepdims=True)
    bodies = [png(image) for image in images]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "vitdeploy", "serve", str(args.artifacts), "--backend", args.backend, "--port", str(port),
               "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--max-queue", str(args.max_queue),
               "--log-level", "warning"]
    server = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        lock = threading.Lock()
        done = [0]
        rss: dict[str, float] = {"at_start": rss_mb(server.pid)}

        def one(i: int, http: httpx.Client) -> tuple[int, float, float]:
            t0 = time.perf_counter()
            r = http.post(url + "/v1/predict?top_k=10", content=bodies[i % n_images], headers={"content-type": "image/png"})
            latency = time.perf_counter() - t0
            error = float("nan")
            if r.status_code == 200:
                got = np.zeros(offline.shape[1])
                for p in r.json()["predictions"]:
                    got[p["class_index"]] = p["probability"]
                error = float(np.abs(got - offline[i % n_images]).max())
            with lock:
                done[0] += 1
                if done[0] == 1000:
                    rss["at_request_1000"] = rss_mb(server.pid)
            return r.status_code, latency, error

        start = time.perf_counter()
        with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=args.concurrency)) as http, \
                ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(lambda i: one(i, http), range(args.requests)))
        elapsed = time.perf_counter() - start
        rss["at_end"] = rss_mb(server.pid)
        metrics = httpx.get(url + "/metrics").text
        codes = [c for c, _, _ in results]
        latencies = np.array([t for _, t, _ in results]) * 1e3
        errors = np.array([e for _, _, e in results])

        with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=args.burst)) as http, \
                ThreadPoolExecutor(args.burst) as pool:
            burst = list(pool.map(lambda i: http.post(url + "/v1/predict", content=bodies[i % n_images]).status_code,
                                  range(args.burst)))
            after = http.post(url + "/v1/predict", content=bodies[0]).status_code
        record = {
            "command": " ".join(sys.argv), "server": " ".join(command[1:]), "requests": args.requests,
            "concurrency": args.concurrency, "ok": codes.count(200), "status_codes": sorted(set(codes)),
            "requests_per_s": args.requests / elapsed, "latency_ms_p50": float(np.percentile(latencies, 50)),
            "latency_ms_p99": float(np.percentile(latencies, 99)),
            "max_abs_probability_diff_vs_offline": float(np.nanmax(errors)) if codes.count(200) else None,
            "mean_batch_size": metric(metrics, "vitdeploy_batch_size_sum") / metric(metrics, "vitdeploy_batch_size_count"),
            "rss_mb": rss, "rss_growth_mb_request_1000_to_end": rss["at_end"] - rss["at_request_1000"],
            "burst": {"requests": args.burst, "ok": burst.count(200), "503": burst.count(503),
                      "other": len(burst) - burst.count(200) - burst.count(503), "request_after_burst": after},
            "server_alive_after_burst": server.poll() is None,
        }
        print(json.dumps(record, indent=2))
        if args.json:
            args.json.write_text(json.dumps(record, indent=2) + "\n")
    finally:
        server.send_signal(signal.SIGTERM)
        print("server exit code", server.wait(timeout=60))


if __name__ == "__main__":
    main()
