"""scripts/gpu_ort.py: the onnxruntime-gpu wheel split into parts here, joined, checked and
installed there, and the probe that decides whether the ONNX Runtime CUDA sections run."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = [sys.executable, str(REPO / "scripts" / "gpu_ort.py")]


def fake_wheel(folder: Path) -> Path:
    """A real, installable wheel of a tiny package, padded to a few hundred kB so that it splits."""
    wheel = folder / "fakeort-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as z:
        z.writestr("fakeort/__init__.py", "VALUE = 42\n")
        z.writestr("fakeort/padding.bin", bytes(range(256)) * 1600)
        z.writestr("fakeort-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakeort\nVersion: 1.0\n")
        z.writestr("fakeort-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("fakeort-1.0.dist-info/RECORD", "")
    return wheel


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SCRIPT, *args], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_split_join_install(tmp_path: Path) -> None:
    wheel = fake_wheel(tmp_path)
    parts = tmp_path / "parts"
    result = run("split", str(wheel), "--out", str(parts), "--part-mb", "0.1")
    assert result.returncode == 0, result.stderr
    record = json.loads((parts / "wheel.json").read_text())
    assert len(record["parts"]) == 4 and all(p["size"] <= 0.1 * 2**20 for p in record["parts"])
    assert sum(p["size"] for p in record["parts"]) == wheel.stat().st_size
    result = run("join", str(parts), "--target", str(tmp_path / "site"))
    assert result.returncode == 0, result.stderr
    check = subprocess.run([sys.executable, "-c", "import fakeort; print(fakeort.VALUE)"], capture_output=True, text=True,
                           env={"PYTHONPATH": str(tmp_path / "site")})
    assert check.stdout.strip() == "42"


def test_a_damaged_or_missing_part_is_refused(tmp_path: Path) -> None:
    parts = tmp_path / "parts"
    run("split", str(fake_wheel(tmp_path)), "--out", str(parts), "--part-mb", "0.1")
    data = bytearray((parts / "part-01").read_bytes())
    data[10] ^= 0xFF
    (parts / "part-01").write_bytes(bytes(data))
    result = run("join", str(parts), "--target", str(tmp_path / "site"))
    assert result.returncode != 0 and "part-01 is damaged (sha256 differs); send it again" in result.stderr
    (parts / "part-02").unlink()
    (parts / "part-01").unlink()
    result = run("join", str(parts), "--target", str(tmp_path / "site"))
    assert result.returncode != 0 and "part-01 is missing" in result.stderr
    assert not (tmp_path / "site").exists()


def test_probe_says_why_cuda_does_not_work_here(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run("probe", "--json", str(tmp_path / "probe.json"))
    record = json.loads((tmp_path / "probe.json").read_text())
    assert result.returncode == 1 and record["ok"] is False and record["reason"]
    assert "does not work here" in result.stdout and record["seconds"] < 10


def test_slim_checkpoint_exports(trained: Path, tmp_path: Path) -> None:
    from vitdeploy.checkpoint import load_checkpoint

    result = run("slim", str(trained), str(tmp_path / "model.pt"))
    assert result.returncode == 0, result.stderr
    slim = load_checkpoint(tmp_path / "model.pt")
    assert "optimizer" not in slim and slim["model_name"] == "vit_cifar_tiny"
    assert (tmp_path / "model.pt").stat().st_size < (trained / "last.pt").stat().st_size / 2


def test_parts_fill_a_run_beside_the_checkout() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_ort import CARRY_LIMIT, checkout_bytes, part_size

    checkout = checkout_bytes()
    assert 100_000 < checkout < 8 * 2**20  # what travels with every run: the tracked files, not .git or .gpu
    size = part_size(checkout)
    assert checkout + size + 4096 < CARRY_LIMIT and checkout + size + 2 * 2**20 > CARRY_LIMIT
    wheel = 255_569_273  # onnxruntime-gpu 1.31.1 cp312: four runs, as few as 64 MiB allows
    assert -(-wheel // size) == 4
    with pytest.raises(SystemExit, match="no room for a part"):
        part_size(CARRY_LIMIT - 2**20)


def test_the_plan_is_worked_out_from_the_files_on_disk(cifar_root: Path, tmp_path: Path) -> None:
    """gpu_plan.py prepare + plan on a small repository: every call within 64 MiB, the lease within 900 s."""
    sys.path.insert(0, str(REPO / "scripts"))
    import gpu_plan

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / ".gitignore").write_text("/.gpu/\n")
    (repo / "README.md").write_text("x" * 100_000)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    data = tmp_path / "data"
    (data / "compact").mkdir(parents=True)
    (data / "compact" / "unpack.py").write_text("print('unpack')\n")
    subprocess.run(["cp", "-r", str(cifar_root / "cifar-10-batches-py"), str(data)], check=True)
    gpu_plan.prepare(fake_wheel(tmp_path), data, repo)
    result = gpu_plan.plan(repo)
    assert result["problems"] == [], result["problems"]
    assert [c["call"] for c in result["calls"]] == ["ort", "ort again", "rest"]  # a small wheel: one part, with the ORT run
    ort = next(c for c in result["calls"] if c["call"] == "ort")
    assert ".gpu/testset" in ort["carry"] and "ort_b16" in ort["command"] and ort["timeout_s"] > 0
    assert result["total_s"] <= 900 and result["spare_s"] == 900 - result["total_s"]
    assert all(c["mib"] <= 64 for c in result["calls"])
    (repo / "big.bin").write_bytes(bytes(65 * 2**20))  # a stray file in the checkout travels with every call
    problems = gpu_plan.plan(repo)["problems"]
    assert problems and all("over the 64 MiB" in p for p in problems)
