"""`vitdeploy bench`: the timing loop counts what it claims, CPU backends agree with the
PyTorch reference on real images, reports are written and parse, and bad input is refused
with one line."""

from __future__ import annotations

import csv
import itertools
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import importable, run_cli
from vitdeploy.bench.run import BenchOptions, rotation, run_bench
from vitdeploy.bench.timing import TimingPolicy, measure
from vitdeploy.errors import VitDeployError

FAST = ["--min-iters", "3", "--min-seconds", "0", "--max-seconds", "1", "--warmup", "1"]


def test_timing_excludes_warmup_and_measures_the_work() -> None:
    calls = []

    def sleep_5ms(x: int) -> None:
        calls.append(x)
        time.sleep(0.005)

    timing = measure(sleep_5ms, [0, 1, 2], TimingPolicy(warmup=2, min_iters=10, min_seconds=0.05, max_seconds=5))
    summary = timing.summary(batch_size=4)
    assert len(calls) == 2 + summary["iterations"] and summary["warmup_iterations"] == 2
    assert summary["iterations"] >= 10 and not summary["capped_by_max_seconds"]
    assert calls[2:5] == [0, 1, 2]  # inputs rotate
    assert 5.0 <= summary["latency_ms_p50"] < 9.0
    assert summary["images_per_s"] == pytest.approx(4 * summary["iterations"] / summary["timed_seconds"])
    assert 4 / 0.009 < summary["images_per_s"] <= 4 / 0.005


def test_timing_cap_ends_the_run_and_says_so() -> None:
    ticks = itertools.count()  # a clock that advances one second per reading
    timing = measure(lambda _x: None, [0], TimingPolicy(warmup=0, min_iters=100, min_seconds=0, max_seconds=3),
                     clock=lambda: float(next(ticks)))
    assert timing.capped and len(timing.latencies_s) == 3 and timing.latencies_s == [1.0, 1.0, 1.0]


def test_rotation_gives_distinct_real_batches() -> None:
    images = np.arange(10)[:, None]
    batches = rotation(images, 4)
    assert len(batches) == 4 and all(len(b) == 4 for b in batches)
    assert batches[0].ravel().tolist() == [0, 1, 2, 3] and batches[2].ravel().tolist() == [8, 9, 0, 1]


def test_bench_all_on_cpu_writes_reports(exported: Path, cifar_root: Path, tmp_path: Path) -> None:
    result = run_cli("bench", str(exported), "--backend", "all", "--batch-sizes", "1,4", "--data-dir", str(cifar_root),
                     "--out", str(tmp_path), *FAST)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["schema"] == "vitdeploy-bench" and report["complete"] and report["passed"]
    # all: every exported precision a backend runs here (ort-cpu and openvino: fp32 and the fp16 graph; pytorch on
    # the CPU: fp32); openvino where it is installed, else skipped with the reason
    openvino = importable("openvino")
    runs = [("pytorch", "fp32"), ("ort-cpu", "fp32"), ("ort-cpu", "fp16")] + openvino * [("openvino", "fp32"), ("openvino", "fp16")]
    assert {(r["backend"], r["precision"], r["mode"], r["batch_size"]) for r in report["records"]} == {
        (b, p, "end-to-end", n) for b, p in runs for n in (1, 4)}
    assert {s["backend"] for s in report["skipped"]} == {"ort-cuda", "ort-trt", "trt"} | (set() if openvino else {"openvino"})
    assert all(s["reason"] for s in report["skipped"])
    assert "skipped ort-cuda" in result.stdout and "skipped trt" in result.stdout
    parity = {p["backend"]: p for p in report["parity"] if p["precision"] == "fp32"}
    assert parity["ort-cpu"]["images"] == 50 and parity["ort-cpu"]["top1_agreement"] == 1.0
    assert parity["ort-cpu"]["accuracy_pct"] == parity["pytorch"]["accuracy_pct"]
    for r in report["records"]:
        assert r["iterations"] >= 3 or r["capped_by_max_seconds"]
        assert r["latency_ms_p50"] <= r["latency_ms_p90"] <= r["latency_ms_p99"] <= r["latency_ms_max"]
    rows = list(csv.DictReader((tmp_path / "bench.csv").open()))
    assert len(rows) == len(report["records"]) and rows[0]["backend"] == report["records"][0]["backend"]
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cpu_backends_match_the_reference_on_real_images(exported: Path, shared_cifar: Path) -> None:
    options = BenchOptions(artifacts=exported, backends=("pytorch", "ort-cpu"), precisions=("fp32", "fp16"),
                           batch_sizes=(16,), policy=TimingPolicy(warmup=0, min_iters=1, min_seconds=0, max_seconds=1),
                           limit=500, data_dir=shared_cifar.parent)
    report = run_bench(options, say=lambda _line: None)
    parity = {(p["backend"], p["precision"]): p for p in report["parity"]}
    assert set(parity) == {("pytorch", "fp32"), ("ort-cpu", "fp32"), ("ort-cpu", "fp16")}
    assert any("pytorch fp16: needs a CUDA GPU" in s["reason"] for s in report["skipped"])
    assert parity[("ort-cpu", "fp32")]["max_abs_logit_diff"] < 1e-4 and parity[("ort-cpu", "fp32")]["passed"]
    assert parity[("ort-cpu", "fp16")]["passed"] and parity[("ort-cpu", "fp16")]["nan_inf_images"] == 0
    assert parity[("ort-cpu", "fp16")]["images"] == 500


def test_parity_outside_tolerance_fails_after_writing_the_report(exported: Path, cifar_root: Path, tmp_path: Path) -> None:
    result = run_cli("bench", str(exported), "--backend", "ort-cpu", "--precision", "fp16", "--batch-sizes", "2",
                     "--max-abs-diff", "0", "--data-dir", str(cifar_root), "--out", str(tmp_path), *FAST)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: outside parity tolerance: ort-cpu fp16 (details in "
                                                  f"{tmp_path / 'bench.json'})"]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["passed"] is False and "max abs logit difference" in report["parity"][0]["failures"][0]


@pytest.mark.parametrize(("args", "message"), [
    (["--backend", "onnx"], "unknown backend 'onnx'"),
    (["--batch-sizes", "1,32"], "batch size 32 is outside the exported range 1..16"),
    (["--batch-sizes", "one"], "--batch-sizes takes a comma-separated list"),
    (["--precision", "int4"], "unknown precision 'int4'"),
    (["--backend", "ort-cpu", "--precision", "int8"], "ort-cpu int8: the artifacts have no onnx int8 model (re-export with --int8)"),
    (["--backend", "ort-cuda"], "backend ort-cuda cannot run here"),
    (["--backend", "ort-cpu", "--precision", "bf16"], "nothing to run: ort-cpu bf16: bf16 runs only on --backend pytorch"),
    (["--mode", "fast"], "--mode must be one of"),
])
def test_bad_options_are_one_line_errors(exported: Path, cifar_root: Path, args: list[str], message: str) -> None:
    result = run_cli("bench", str(exported), "--data-dir", str(cifar_root), *args)
    assert result.returncode == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_bad_artifact_folders_are_refused(exported: Path, tmp_path: Path) -> None:
    with pytest.raises(VitDeployError, match="has no manifest.json"):
        run_bench(BenchOptions(artifacts=tmp_path))
    damaged = tmp_path / "damaged"
    shutil.copytree(exported, damaged)
    with open(damaged / "model.onnx", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(VitDeployError, match="no longer matches the sha256"):
        run_bench(BenchOptions(artifacts=damaged))
    (damaged / "model_fp16.onnx").unlink()
    with pytest.raises(VitDeployError, match="model_fp16.onnx listed in the manifest is missing|no longer matches"):
        run_bench(BenchOptions(artifacts=damaged))


def test_float_input_artifacts_are_fed_through_host_preprocessing(trained: Path, cifar_root: Path, tmp_path: Path) -> None:
    from vitdeploy.export.artifacts import ExportOptions, export_artifacts

    export_artifacts(ExportOptions(source=trained, out=tmp_path / "art", preprocess_in_graph=False, max_batch=8,
                                   data_dir=cifar_root), say=lambda _line: None)
    options = BenchOptions(artifacts=tmp_path / "art", backends=("ort-cpu",), batch_sizes=(2,), data_dir=cifar_root,
                           policy=TimingPolicy(warmup=0, min_iters=2, min_seconds=0, max_seconds=1))
    report = run_bench(options, say=lambda _line: None)
    assert report["input"]["preprocessing_in_graph"] is False and report["input"]["dtype"] == "float32"
    assert report["parity"][0]["passed"] and report["parity"][0]["max_abs_logit_diff"] < 1e-4
    assert report["records"][0]["mode"] == "end-to-end" and report["records"][0]["iterations"] >= 2
