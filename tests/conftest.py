"""Shared fixtures: small CIFAR-format data written by the tests, the real CIFAR-10
beside the checkout when present, and GPU/TensorRT markers that skip without hardware."""

from __future__ import annotations

import importlib
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one compute thread per worker (and its subprocesses), so two
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # workers share the cores instead of oversubscribing them
    torch.set_num_threads(1)
SHARED_CIFAR = Path(os.environ.get("VITDEPLOY_SHARED_DATA", REPO.parent / "shared" / "data")) / "cifar-10-batches-py"


def _serve_extra_missing() -> str | None:
    """Why `vitdeploy serve` cannot run here (the GPU machine has no serve extra), or None."""
    for module in ("fastapi", "starlette", "uvicorn", "prometheus_client"):
        try:
            importlib.import_module(module)
        except ImportError:
            return f"needs the serve extra ({module} is missing): pip install 'vitdeploy[serve]'"
    return None


SERVE_MISSING = _serve_extra_missing()
needs_serve = pytest.mark.skipif(SERVE_MISSING is not None, reason=SERVE_MISSING or "")


def serve_client(**settings: Any) -> Any:
    """An in-process (ASGI) client of the app `vitdeploy serve` builds from ServeConfig(**settings);
    skips the test without the serve extra."""
    if SERVE_MISSING is not None:
        pytest.skip(SERVE_MISSING)
    from fastapi.testclient import TestClient

    from vitdeploy.serve.app import create_app
    from vitdeploy.serve.config import ServeConfig

    return TestClient(create_app(ServeConfig(**settings)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_gpu = torch.cuda.is_available()
    try:
        import tensorrt  # noqa: F401

        has_trt = has_gpu
    except ImportError:
        has_trt = False
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "trt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT and a CUDA GPU"))


def make_images(labels: np.ndarray, seed: int) -> np.ndarray:
    """Learnable CIFAR-like images: noise plus a class-specific colour and bar position."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    images = rng.integers(0, 96, size=(n, 3, 32, 32), dtype=np.int64)
    for i, c in enumerate(labels):
        images[i, c % 3] += 120
        images[i, :, 3 * c: 3 * c + 3, :] += 100
    return np.clip(images, 0, 255).astype(np.uint8)


def write_batch(path: Path, labels: np.ndarray, seed: int) -> None:
    data = make_images(labels, seed).reshape(len(labels), -1)
    with open(path, "wb") as f:
        pickle.dump({"batch_label": path.name, "data": data, "labels": [int(x) for x in labels]}, f, protocol=2)


def write_cifar(root: Path, per_batch: int = 40, test_size: int = 50) -> Path:
    """A complete small cifar-10-batches-py under `root`; returns `root`."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        write_batch(folder / f"data_batch_{i}", np.arange(per_batch) % 10, seed=i)
    write_batch(folder / "test_batch", np.arange(test_size) % 10, seed=99)
    return root


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 training and 50 test images in the standard layout (read-only by convention)."""
    return write_cifar(tmp_path_factory.mktemp("cifar"))


@pytest.fixture
def shared_cifar() -> Path:
    if not (SHARED_CIFAR / "test_batch").is_file():
        pytest.skip(f"real CIFAR-10 test set not found at {SHARED_CIFAR}")
    return SHARED_CIFAR


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m vitdeploy ARGS` in a subprocess, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", "vitdeploy", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


@pytest.fixture(scope="session")
def trained(cifar_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A vit_cifar_tiny run trained for a few steps (its head is no longer all zeros)."""
    from vitdeploy.train import TrainConfig, run_training

    out = tmp_path_factory.mktemp("trained") / "run"
    config = TrainConfig.from_options("vit_cifar_tiny", data_dir=str(cifar_root), out=str(out), epochs=1, batch_size=16,
                                      val_size=40, device="cpu", max_steps=6)
    run_training(config)
    return out


@pytest.fixture(scope="session")
def exported(trained: Path, cifar_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`trained` exported: ONNX fp32 and fp16, batch 1..16, a Triton repository beside it (read-only by convention)."""
    from vitdeploy.export.artifacts import ExportOptions, export_artifacts

    root = tmp_path_factory.mktemp("art")
    export_artifacts(ExportOptions(source=trained, out=root / "art", fp16=True, max_batch=16, triton=root / "triton",
                                   data_dir=cifar_root), say=lambda _line: None)
    return root / "art"


@pytest.fixture(scope="session")
def int8_art(trained: Path, cifar_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`trained` exported with both INT8 graphs (CPU form and TensorRT form), batch 1..16 (read-only by convention)."""
    from vitdeploy.export.artifacts import ExportOptions, export_artifacts
    from vitdeploy.export.int8 import Int8Options

    out = tmp_path_factory.mktemp("int8") / "art"
    export_artifacts(ExportOptions(source=trained, out=out, int8=True, max_batch=16, data_dir=cifar_root,
                                   int8_options=Int8Options(calib_images=64)), say=lambda _line: None)
    return out


def importable(module: str) -> bool:
    """Whether `module` imports in the Python `run_cli` starts (the CLI's view: PYTHONPATH is the
    repository there, so the GPU-machine emulation of this test process does not apply)."""
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, cwd=REPO, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    return probe.returncode == 0
