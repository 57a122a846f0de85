"""How much do explanations slow predictions down? `vitdeploy serve` on loopback, a
prediction load from C concurrent clients (real CIFAR-10 test images as PNG), measured
once alone and once while E clients keep requesting `/v1/explain`; prints and writes the
p50/p90 prediction latency of both phases, the explanations answered, and the 503s.

    python3 scripts/explain_load.py ART --data-dir data --requests 1000 --concurrency 8 --explainers 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from serve_load import png  # noqa: E402

from vitdeploy.data import load_test  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def predict_phase(url: str, bodies: list[bytes], requests: int, concurrency: int) -> dict[str, float]:
    def one(i: int) -> float:
        start = time.perf_counter()
        response = client.post(url + "/v1/predict", content=bodies[i % len(bodies)], headers={"content-type": "image/png"})
        response.raise_for_status()
        return time.perf_counter() - start

    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(concurrency) as pool:
        latencies = np.array(list(pool.map(one, range(requests)))) * 1000
    return {"requests": requests, "latency_ms_p50": float(np.percentile(latencies, 50)),
            "latency_ms_p90": float(np.percentile(latencies, 90)), "latency_ms_mean": float(latencies.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--explainers", type=int, default=2)
    parser.add_argument("--method", default="rollout")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    bodies = [png(image) for image in load_test(args.data_dir).images[:200].numpy()]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "vitdeploy", "serve", str(args.artifacts), "--port", str(port),
                               "--log-level", "warning"], cwd=REPO)
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        predict_phase(url, bodies, 100, args.concurrency)  # warm-up
        alone = predict_phase(url, bodies, args.requests, args.concurrency)
        stop = threading.Event()
        counts = {"200": 0, "503": 0, "other": 0, "seconds": []}

        def explain_loop(worker: int) -> None:
            with httpx.Client(timeout=120) as client:
                i = worker
                while not stop.is_set():
                    start = time.perf_counter()
                    response = client.post(url + f"/v1/explain?method={args.method}", content=bodies[i % len(bodies)])
                    key = str(response.status_code) if response.status_code in (200, 503) else "other"
                    counts[key] += 1
                    if response.status_code == 200:
                        counts["seconds"].append(time.perf_counter() - start)
                    i += args.explainers

        threads = [threading.Thread(target=explain_loop, args=(w,)) for w in range(args.explainers)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        started = time.perf_counter()
        loaded = predict_phase(url, bodies, args.requests, args.concurrency)
        duration = time.perf_counter() - started
        stop.set()
        for thread in threads:
            thread.join()
        record = {
            "artifacts": str(args.artifacts), "concurrency": args.concurrency, "explain_clients": args.explainers,
            "method": args.method, "predictions_alone": alone, "predictions_while_explaining": loaded,
            "p50_change_pct": 100 * (loaded["latency_ms_p50"] / alone["latency_ms_p50"] - 1),
            "explanations_200": counts["200"], "explanations_503": counts["503"], "explanations_other": counts["other"],
            "explanations_per_s_during_load": counts["200"] / duration if duration else None,
            "explain_latency_ms_p50": float(np.percentile(np.array(counts["seconds"]) * 1000, 50)) if counts["seconds"] else None,
            "cpu": platform.processor() or platform.machine(),
        }
        print(json.dumps(record, indent=2))
        if args.json:
            args.json.write_text(json.dumps(record, indent=2) + "\n")
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
