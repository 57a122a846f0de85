"""scripts/gpu_check.sh's plumbing (sections, budgets, results packed as they finish), exercised on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from tests.conftest import REPO


def test_gpu_check_smoke_runs_every_section(cifar_root: Path, tmp_path: Path) -> None:
    from tests.test_gpu_ort import fake_wheel

    out = tmp_path / "out"
    parts = tmp_path / "ort-parts"  # the carried wheel, as docs/gpu-plan.md sends it (a stand-in package here)
    subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_ort.py"), "split", str(fake_wheel(tmp_path)), "--out", str(parts),
                    "--part-mb", "0.1"], check=True, capture_output=True)
    env = {**os.environ, "GPU_CHECK_SMOKE": "1", "GPU_CHECK_DATA": str(cifar_root), "GPU_CHECK_WORK": str(tmp_path / "work"),
           "OUT": str(out), "GPU_CHECK_ORT_PARTS": str(parts)}
    subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], env=env, check=True, timeout=900, capture_output=True)
    sections = {s["section"]: s for s in json.loads((out / "sections.json").read_text())["sections"]}
    assert set(sections) >= {"env", "gpu_tests", "train_throughput", "recipe_sweep", "cifar_small_run", "export_fp16",
                             "bench_small", "train_throughput_compiled", "bench_vit_b_16", "ddp", "cifar_long", "ort_join",
                             "ort_probe", "ort_small", "ort_b16"}
    assert sections.pop("ort_probe")["status"] == "failed"  # no CUDA here: the probe says no, the smoke runs ort-cpu
    assert all(s["status"] == "ok" for s in sections.values()), sections
    assert {p.name for p in out.iterdir()} <= {"sections.json", "sections.json.lock", "gpu_check.log", "results.tar"}
    results = tmp_path / "results"
    with tarfile.open(out / "results.tar") as tar:
        tar.extractall(results, filter="data")
    env_record = json.loads((results / "env.json").read_text())
    assert {b["name"] for b in env_record["backends"]} == {"pytorch", "ort-cpu", "ort-cuda", "ort-trt", "trt"}
    throughput = json.loads((results / "train_throughput.json").read_text())
    assert {(r["model"], r["source"]) for r in throughput} >= {("vit_cifar_tiny", "real"), ("vit_cifar_tiny", "synthetic")}
    assert all(r["train_images_per_s"] > 0 for r in throughput)
    assert json.loads((results / "train_throughput_compiled.json").read_text())[0]["train_images_per_s"] > 0
    sweep = json.loads((results / "recipe_sweep.json").read_text())
    assert [r["rc"] for r in sweep["runs"]] == [0, 0]
    run = json.loads((results / "cifar_small_run.json").read_text())
    assert run["model"] == "vit_cifar_small" and run["epochs_completed"] == 1
    long_config = json.loads((results / "cifar_long_config.json").read_text())
    assert long_config["recipe"] == "long" and long_config["ema"] and long_config["test_each_epoch"]
    curve = [json.loads(line) for line in (results / "cifar_long_metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in curve if r["type"] == "epoch"]
    assert len(epochs) == long_config["epochs"] and all("test_acc" in r and r["train_seconds"] > 0 for r in epochs)
    assert json.loads((results / "cifar_long_summary.json").read_text())["weights"] == "ema"
    manifest = json.loads((results / "export_manifest.json").read_text())
    assert {(a["kind"], a["precision"]) for a in manifest["artifacts"]} == {("onnx", "fp32"), ("onnx", "fp16")}
    assert json.loads((results / "ddp.json").read_text()) == {
        "gpus": 0, "ddp": "not measured: data-parallel training needs 2 or more GPUs"}
    probe = json.loads((results / "ort_probe.json").read_text())
    assert probe["ok"] is False and probe["reason"]
    assert json.loads((results / "ort_small_manifest.json").read_text())["artifacts"][1]["tensorrt_preflight"]["ok"]
    for name in ("ort_small", "ort_small_act", "ort_b16"):  # the *_graph benches run on GPUs only
        report = json.loads((results / name / "bench.json").read_text())
        assert {r["backend"] for r in report["records"]} >= {"ort-cpu"}, name
    for name in ("bench_small", "bench_vit_b_16"):
        report = json.loads((results / name / "bench.json").read_text())
        assert {r["backend"] for r in report["records"]} == {"pytorch", "ort-cpu"}, name
        assert (results / name / "bench.png").stat().st_size > 0
