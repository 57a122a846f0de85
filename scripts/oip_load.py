"""Throughput of one running `vitdeploy serve` through its two protocols, the same images each way:
/v1/predict (one PNG per request), and /v2/.../infer with tritonclient (one PNG as BYTES; one
UINT8 tensor, binary), from N concurrent clients; and whether every answer's top-1 agrees.

    vitdeploy serve ART --max-batch 16 &
    python3 scripts/oip_load.py http://127.0.0.1:8000 --data-dir ../shared/data --images 2000 --clients 16

Prints one JSON record per way (requests/s, p50/p99 ms) and the top-1 agreement.
"""

from __future__ import annotations

import argparse
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import tritonclient.http as httpclient
from PIL import Image

from vitdeploy.data import load_test


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def timed(clients: int, count: int, send) -> tuple[list, dict]:  # noqa: ANN001 - send(i) -> top-1 index
    """Top-1 of every image, and the way's record."""
    latencies = [0.0] * count

    def one(i: int) -> int:
        start = time.perf_counter()
        top1 = send(i)
        latencies[i] = (time.perf_counter() - start) * 1000
        return top1

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        top1 = list(pool.map(one, range(count)))
    wall = time.perf_counter() - start
    return top1, {"requests": count, "clients": clients, "requests_per_s": round(count / wall, 1),
                  "latency_ms_p50": round(float(np.percentile(latencies, 50)), 2),
                  "latency_ms_p99": round(float(np.percentile(latencies, 99)), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("url")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    images = load_test(args.data_dir).images[:args.images].numpy()
    files = [png(image) for image in images]
    model = httpx.get(args.url + "/v1/model").json()["open_inference_protocol"]["model"]
    http = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=args.clients))
    host = args.url.removeprefix("http://")
    local = threading.local()  # one tritonclient per worker thread: its connection is not shared between threads

    def lane() -> httpclient.InferenceServerClient:
        if not hasattr(local, "client"):
            local.client = httpclient.InferenceServerClient(host, network_timeout=60)
        return local.client

    def v1(i: int) -> int:
        answer = http.post(args.url + "/v1/predict?top_k=1", content=files[i], headers={"content-type": "image/png"})
        return answer.json()["predictions"][0]["class_index"]

    def v2_bytes(i: int) -> int:
        tensor = httpclient.InferInput("input", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([files[i]], dtype=np.object_))
        return int(lane().infer(model, [tensor]).as_numpy("logits")[0].argmax())

    def v2_tensor(i: int) -> int:
        tensor = httpclient.InferInput("input", [1, *images.shape[1:]], "UINT8")
        tensor.set_data_from_numpy(images[i:i + 1])
        return int(lane().infer(model, [tensor]).as_numpy("logits")[0].argmax())

    results, records = {}, []
    for name, send in (("v1_png", v1), ("v2_bytes_png", v2_bytes), ("v2_uint8_binary", v2_tensor)):
        results[name], record = timed(args.clients, len(images), send)
        records.append({"way": name, **record})
        print(json.dumps(records[-1]))
    agree = {name: int(sum(a == b for a, b in zip(top1, results["v1_png"], strict=True))) for name, top1 in results.items()}
    print(json.dumps({"model": model, "images": len(images), "top1_equal_to_v1": agree}))


if __name__ == "__main__":
    main()
