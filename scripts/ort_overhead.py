"""Is `vitdeploy bench`'s ort-cpu latency the session's own? Compares its p50 with a bare
`InferenceSession.run` loop on the same ONNX file, input (real test images, uint8, in the
same rotation), thread count and iteration count; the two alternate, repeated, and the
medians of the p50s are compared. Also times pytorch eager fp32 the same way.

    python3 scripts/ort_overhead.py ART --data-dir data --batch-sizes 1,8 --repeats 5 --iters 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch  # before onnxruntime, as the backends do

from vitdeploy.bench.run import BenchOptions, rotation, run_bench
from vitdeploy.bench.timing import TimingPolicy
from vitdeploy.data import load_test
from vitdeploy.manifest import find_artifact, read_manifest


def bare_p50(path: Path, batches: list[np.ndarray], iters: int, warmup: int) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for i in range(warmup):
        session.run(["logits"], {"input": batches[i % len(batches)]})
    latencies = []
    for i in range(iters):
        t0 = time.perf_counter()
        session.run(["logits"], {"input": batches[i % len(batches)]})
        latencies.append(time.perf_counter() - t0)
    return float(np.percentile(latencies, 50) * 1e3)


def tool_p50(art: Path, backend: str, batch: int, iters: int, warmup: int, data_dir: Path) -> float:
    options = BenchOptions(artifacts=art, backends=(backend,), precisions=("fp32",), batch_sizes=(batch,),
                           policy=TimingPolicy(warmup=warmup, min_iters=iters, min_seconds=0, max_seconds=1e9),
                           limit=8, data_dir=data_dir)
    return run_bench(options, say=lambda _line: None)["records"][0]["latency_ms_p50"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    manifest = read_manifest(args.artifacts)
    onnx_path = args.artifacts / find_artifact(manifest, "onnx", "fp32")["path"]
    images = load_test(args.data_dir).images.numpy()
    results = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        batches = rotation(images, batch)
        bare, tool, eager = [], [], []
        for _ in range(args.repeats):
            bare.append(bare_p50(onnx_path, batches, args.iters, args.warmup))
            tool.append(tool_p50(args.artifacts, "ort-cpu", batch, args.iters, args.warmup, args.data_dir))
            eager.append(tool_p50(args.artifacts, "pytorch", batch, args.iters, args.warmup, args.data_dir))
        record = {
            "model": manifest["model"]["name"], "batch_size": batch, "repeats": args.repeats, "iterations": args.iters,
            "threads": torch.get_num_threads(),
            "bare_session_p50_ms": bare, "vitdeploy_ort_cpu_p50_ms": tool, "pytorch_eager_fp32_p50_ms": eager,
            "median_bare_ms": statistics.median(bare), "median_vitdeploy_ms": statistics.median(tool),
            "median_pytorch_ms": statistics.median(eager),
        }
        record["vitdeploy_over_bare"] = record["median_vitdeploy_ms"] / record["median_bare_ms"]
        record["pytorch_over_ort"] = record["median_pytorch_ms"] / record["median_vitdeploy_ms"]
        results.append(record)
        print(json.dumps(record), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
