"""The openvino backend on real exported files: fp32 computed in f32 (never the bf16 OpenVINO
picks by itself on AMX/AVX512_BF16 CPUs), INT8 from the TensorRT-form Q/DQ graph with INT8
kernels, parity in bench, and predict through it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli, serve_client
from vitdeploy.backends.factory import model_input, open_backend
from vitdeploy.errors import VitDeployError
from vitdeploy.manifest import find_artifact, read_manifest

pytest.importorskip("openvino")

from vitdeploy.backends.openvino import OpenVinoBackend  # noqa: E402 - after the skip


def _logits(art: Path, backend: str, precision: str, images: np.ndarray) -> tuple[np.ndarray, dict]:
    manifest = read_manifest(art)
    with open_backend(art, manifest, backend, precision) as runner:
        return runner.infer(model_input(manifest, images, backend)), runner.describe()


def test_fp32_runs_in_f32_and_matches_onnx_runtime(int8_art: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    ort, _ = _logits(int8_art, "ort-cpu", "fp32", images)
    ov, described = _logits(int8_art, "openvino", "fp32", images)
    assert described["inference_precision"] == "f32" and described["int8_layers"] == 0 and described["weighted_layers"] > 0
    assert ov.dtype == np.float32 and ov.shape == ort.shape
    assert np.abs(ov - ort).max() < 1e-4  # bf16 would differ by ~1e-2


def test_int8_runs_the_tensorrt_form_graph_with_int8_kernels(int8_art: Path) -> None:
    images = np.random.default_rng(1).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    _, described = _logits(int8_art, "openvino", "int8", images)
    manifest = read_manifest(int8_art)
    assert described["model"] == find_artifact(manifest, "onnx", "int8", "tensorrt")["path"]
    assert 0 < described["int8_layers"] <= described["weighted_layers"]


def test_a_graph_without_int8_layers_is_not_called_int8(int8_art: Path) -> None:
    fp32 = int8_art / find_artifact(read_manifest(int8_art), "onnx", "fp32")["path"]
    with pytest.raises(VitDeployError, match="runs no layer of model.onnx in INT8"):
        OpenVinoBackend(fp32, "int8").activate()


def test_a_broken_file_is_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(VitDeployError, match="OpenVINO could not load model.onnx"):
        OpenVinoBackend(broken).activate()


def test_batches_beyond_the_export_are_refused(int8_art: Path) -> None:
    manifest = read_manifest(int8_art)
    with open_backend(int8_art, manifest, "openvino", "fp32") as runner:
        with pytest.raises(VitDeployError, match="exceeds the exported maximum 16"):
            runner.infer(np.zeros((17, 3, 32, 32), np.uint8))


def test_bench_openvino_beside_ort_cpu_with_parity(int8_art: Path, cifar_root: Path, tmp_path: Path) -> None:
    result = run_cli("bench", str(int8_art), "--backend", "ort-cpu,openvino", "--precision", "fp32,int8",
                     "--batch-sizes", "1,4", "--min-iters", "2", "--min-seconds", "0", "--max-seconds", "0.3",
                     "--data-dir", str(cifar_root), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    assert {(p["backend"], p["precision"]) for p in report["parity"]} == {
        ("ort-cpu", "fp32"), ("ort-cpu", "int8"), ("openvino", "fp32"), ("openvino", "int8")}
    assert report["passed"] and all(p["images"] == 50 for p in report["parity"])
    fp32 = next(p for p in report["parity"] if p["backend"] == "openvino" and p["precision"] == "fp32")
    assert 0 < fp32["max_abs_logit_diff"] < 1e-4
    ov_rows = [r for r in report["records"] if r["backend"] == "openvino"]
    assert len(ov_rows) == 4 and all(r["inference_precision"] == "f32" for r in ov_rows)
    assert all(r["int8_layers"] > 0 for r in ov_rows if r["precision"] == "int8")
    assert {r["artifact"] for r in ov_rows if r["precision"] == "int8"} == {
        find_artifact(read_manifest(int8_art), "onnx", "int8", "tensorrt")["path"]}


def test_predict_through_openvino(int8_art: Path, tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    result = run_cli("predict", str(int8_art), str(path), "--backend", "openvino", "--json")
    assert result.returncode == 0, result.stderr
    [row] = json.loads(result.stdout)
    assert row["backend"] == "openvino" and row["precision"] == "fp32" and len(row["predictions"]) == 5


def test_serve_through_openvino_int8(int8_art: Path) -> None:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
    with serve_client(artifacts=int8_art, backend="openvino", precision="int8", max_batch=8) as client:
        model = client.get("/v1/model").json()
        assert model["backend"]["name"] == "openvino" and model["backend"]["inference_precision"] == "f32"
        assert model["backend"]["int8_layers"] > 0
        answer = client.post("/v1/predict", content=buffer.getvalue(), headers={"content-type": "image/png"})
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["predictions"]) == 5
