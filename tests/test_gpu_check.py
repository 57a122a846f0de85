"""scripts/gpu_check.sh's plumbing (sections, budgets, JSON per section), exercised on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.conftest import REPO


def test_gpu_check_smoke_writes_every_section(cifar_root: Path, tmp_path: Path) -> None:
    env = {**os.environ, "GPU_CHECK_SMOKE": "1", "GPU_CHECK_DATA": str(cifar_root), "OUT": str(tmp_path)}
    subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], env=env, check=True, timeout=600, capture_output=True)
    sections = {s["section"]: s for s in json.loads((tmp_path / "sections.json").read_text())["sections"]}
    assert set(sections) >= {"env", "gpu_tests", "train_throughput", "cifar_small_run", "export_fp16", "recipe_sweep"}
    assert all(s["status"] == "ok" for s in sections.values()), sections
    env_record = json.loads((tmp_path / "env.json").read_text())
    assert {b["name"] for b in env_record["backends"]} == {"pytorch", "ort-cpu", "ort-cuda", "trt"}
    throughput = json.loads((tmp_path / "train_throughput.json").read_text())
    assert {(r["model"], r["source"]) for r in throughput} >= {("vit_cifar_tiny", "real"), ("vit_cifar_tiny", "synthetic")}
    assert all(r["train_images_per_s"] > 0 for r in throughput)
    run = json.loads((tmp_path / "cifar_small_run.json").read_text())
    assert run["model"] == "vit_cifar_small" and run["epochs"] == 1
    manifest = json.loads((tmp_path / "export_manifest.json").read_text())
    assert {(a["kind"], a["precision"]) for a in manifest["artifacts"]} == {("onnx", "fp32"), ("onnx", "fp16")}
    assert len(list(tmp_path.iterdir())) <= 8  # what one GPU run can bring back
