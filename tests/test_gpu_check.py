"""scripts/gpu_check.sh's plumbing (sections, budgets, results packed as they finish), exercised on the CPU in
the GPU machine's environment (no serve extra: tests/gpu_machine), and the gpu/trt tests collected there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from tests.conftest import REPO
from vitdeploy.backends import registry

GPU_MACHINE = REPO / "tests" / "gpu_machine"  # its sitecustomize makes fastapi, uvicorn, pydantic... unimportable


def gpu_machine_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{GPU_MACHINE}{os.pathsep}{REPO}", **extra}


def collected(env: dict[str, str]) -> list[str]:
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu or trt", "-p",
                             "no:cacheprovider", "tests"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    return [line for line in result.stdout.splitlines() if "::" in line]


def test_every_gpu_test_is_collected_without_the_serve_extra() -> None:
    hidden = subprocess.run([sys.executable, "-c", "import fastapi"], env=gpu_machine_env(), capture_output=True, text=True)
    assert hidden.returncode == 1 and "absent on the GPU machine" in hidden.stderr
    here = collected({**os.environ, "PYTHONPATH": str(REPO)})
    there = collected(gpu_machine_env())
    assert there == here and len(there) >= 9, there


def test_gpu_check_smoke_runs_every_section(cifar_root: Path, tmp_path: Path) -> None:
    from tests.test_gpu_ort import fake_wheel

    out = tmp_path / "out"
    parts = tmp_path / "ort-parts"  # the carried wheel, as docs/gpu-plan.md sends it (a stand-in package here)
    subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_ort.py"), "split", str(fake_wheel(tmp_path)), "--out", str(parts),
                    "--part-mb", "0.1"], check=True, capture_output=True)
    env = gpu_machine_env(GPU_CHECK_SMOKE="1", GPU_CHECK_DATA=str(cifar_root), GPU_CHECK_WORK=str(tmp_path / "work"),
                          OUT=str(out), GPU_CHECK_ORT_PARTS=str(parts))
    subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], env=env, check=True, timeout=900, capture_output=True)
    sections = {s["section"]: s for s in json.loads((out / "sections.json").read_text())["sections"]}
    listed = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], env={**env, "GPU_CHECK_LIST": "1"},
                            capture_output=True, text=True, check=True).stdout.split()
    # every section ran (but data: the smoke's data is there already), and the list names them all
    assert set(sections) == set(listed[::2]) - {"data"}, (sorted(sections), listed)
    assert all(int(budget) > 0 for budget in listed[1::2])
    assert sections.pop("ort_probe")["status"] == "failed"  # no CUDA here: the probe says no, the smoke runs ort-cpu
    assert all(s["status"] == "ok" for s in sections.values()), sections
    assert (tmp_path / "work" / "ort-site" / "fakeort" / "__init__.py").is_file()  # installed inside the work folder
    assert {p.name for p in out.iterdir()} <= {"sections.json", "sections.json.lock", "gpu_check.log", "results.tar"}
    results = tmp_path / "results"
    with tarfile.open(out / "results.tar") as tar:
        tar.extractall(results, filter="data")
    env_record = json.loads((results / "env.json").read_text())
    assert {b["name"] for b in env_record["backends"]} == set(registry.NAMES)
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
    for name, policy in (("ort_b16", "matmul"), ("ort_policy", "activations")):  # the fp16 policy comparison
        fp16 = [a for a in json.loads((results / f"{name}_manifest.json").read_text())["artifacts"] if a["precision"] == "fp16"]
        assert [a["fp16_policy"] for a in fp16] == [policy], name
    for name in ("ort_b16", "ort_policy", "ort_graphs", "ort_small"):
        report = json.loads((results / name / "bench.json").read_text())
        assert {r["backend"] for r in report["records"]} >= {"ort-cpu"}, name
    # random weights, head included: parity compares real logits, not zeros
    b16 = json.loads((results / "ort_b16_manifest.json").read_text())
    assert all(a["parity"]["max_abs_logit_diff"] > 0 for a in b16["artifacts"])
    parity = json.loads((results / "ort_b16" / "bench.json").read_text())["parity"]
    assert all(p["max_abs_logit_diff"] > 0 for p in parity if p["backend"] == "ort-cpu")
    for name in ("bench_small", "bench_vit_b_16"):
        report = json.loads((results / name / "bench.json").read_text())
        assert {r["backend"] for r in report["records"]} == {"pytorch", "ort-cpu"}, name
        assert (results / name / "bench.png").stat().st_size > 0
