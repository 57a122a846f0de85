"""`vitdeploy export` on a small trained model: ONNX fp32/fp16, parity, manifest, Triton,
predict, and the refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from tests.conftest import run_cli
from vitdeploy.backends.base import run_batches
from vitdeploy.backends.ort import OrtBackend
from vitdeploy.errors import VitDeployError
from vitdeploy.export.artifacts import ExportOptions, export_artifacts
from vitdeploy.export.fp16 import node_dtypes
from vitdeploy.manifest import read_manifest

FLOAT, FLOAT16, UINT8 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.UINT8


def test_manifest_describes_everything(exported: Path, trained: Path) -> None:
    manifest = read_manifest(exported)  # verifies every sha256
    assert manifest["model"]["name"] == "vit_cifar_tiny" and len(manifest["model"]["class_names"]) == 10
    assert manifest["input"]["dtype"] == "uint8" and manifest["input"]["shape"] == ["batch", 3, 32, 32]
    assert manifest["input"]["preprocessing_in_graph"] is True
    assert manifest["batch"] == {"min": 1, "opt": 16, "max": 16}
    kinds = {(a["kind"], a["precision"]): a for a in manifest["artifacts"]}
    assert set(kinds) == {("onnx", "fp32"), ("onnx", "fp16")}
    for artifact in kinds.values():
        assert artifact["status"] == "passed" and artifact["parity"]["passed"]
        assert artifact["inputs"] == [{"name": "input", "dtype": "uint8", "shape": ["batch", 3, 32, 32]}]
        assert artifact["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}]
        assert len(artifact["sha256"]) == 64 and artifact["size_bytes"] > 0
    assert kinds[("onnx", "fp32")]["parity"]["max_abs_logit_diff"] < 1e-3
    assert manifest["tensorrt"]["built"] is False and "TensorRT" in manifest["tensorrt"]["reason"]
    assert manifest["model"]["source_checkpoint"]["path"].endswith("best.pt")
    assert manifest["model"]["weights"] == "model"  # a run without EMA exports its trained weights


def test_onnx_metadata_and_checker(exported: Path) -> None:
    model = onnx.load(str(exported / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["vitdeploy.model"] == "vit_cifar_tiny"
    assert meta["vitdeploy.class_names"].split(",")[0] == "airplane"
    assert json.loads(meta["vitdeploy.preprocessing"])["input_size"] == 32
    assert len(meta["vitdeploy.source_checkpoint_sha256"]) == 64
    assert model.opset_import[0].version == 18
    assert {n.op_type for n in model.graph.node} >= {"LayerNormalization", "Softmax", "MatMul"}


def test_fp16_graph_dtypes(exported: Path) -> None:
    model = onnx.load(str(exported / "model_fp16.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == UINT8
    assert model.graph.output[0].type.tensor_type.elem_type == FLOAT
    seen = set()
    for op, name, inputs, outputs in node_dtypes(model):
        seen.add(op)
        if op in ("MatMul", "Gemm", "Conv"):
            assert set(inputs) == {FLOAT16} and outputs == [FLOAT16], (op, name, inputs, outputs)
        if op in ("LayerNormalization", "Softmax"):  # documented: both stay fp32
            assert set(inputs) == {FLOAT} and outputs[0] == FLOAT, (op, name, inputs, outputs)
    assert {"MatMul", "Gemm", "Conv", "LayerNormalization", "Softmax"} <= seen


def test_fp16_session_at_full_optimization_in_a_subprocess(exported: Path) -> None:
    """ORT's CPU provider has crashed building such sessions: a crash must fail this test, not pytest."""
    code = (
        "import sys, numpy as np, onnxruntime as ort\n"
        "o = ort.SessionOptions(); o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL\n"
        "s = ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])\n"
        "y = s.run(None, {'input': np.zeros((2, 3, 32, 32), np.uint8)})[0]\n"
        "assert y.shape == (2, 10) and np.isfinite(y).all()\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(exported / "model_fp16.onnx")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["model.onnx", "model_fp16.onnx"])
def test_batch_sizes_give_the_same_per_image_logits(exported: Path, cifar_root: Path, name: str) -> None:
    from vitdeploy.data import load_test

    images = load_test(cifar_root).images[:16].numpy()
    with OrtBackend(exported / name, max_batch=16) as backend:
        full = backend.infer(images)  # the exported maximum
        for size in (1, 7):
            np.testing.assert_allclose(run_batches(backend, images, size), full, atol=1e-5, rtol=1e-5)
        with pytest.raises(VitDeployError, match="exceeds the exported maximum 16"):
            backend.infer(np.zeros((17, 3, 32, 32), np.uint8))


def test_a_runtime_the_project_does_not_use_agrees(exported: Path, cifar_root: Path) -> None:
    """onnx's own reference evaluator runs the graph and gives ONNX Runtime's answers."""
    from onnx.reference import ReferenceEvaluator

    from vitdeploy.data import load_test

    images = load_test(cifar_root).images[:2].numpy()
    reference = ReferenceEvaluator(str(exported / "model.onnx")).run(None, {"input": images})[0]
    with OrtBackend(exported / "model.onnx") as backend:
        np.testing.assert_allclose(reference, backend.infer(images), atol=1e-4)


def test_parity_on_real_test_images(trained: Path, shared_cifar: Path, tmp_path: Path) -> None:
    manifest = export_artifacts(ExportOptions(source=trained, out=tmp_path / "art", parity_images=1000, data_dir=shared_cifar.parent),
                                say=lambda _line: None)
    metrics = manifest["artifacts"][0]["parity"]
    assert metrics["images"] == 1000 and metrics["top1_agreement"] == 1.0 and metrics["max_abs_logit_diff"] < 1e-3


def test_no_preprocess_contract(trained: Path, cifar_root: Path, tmp_path: Path) -> None:
    manifest = export_artifacts(ExportOptions(source=trained, out=tmp_path / "art", preprocess_in_graph=False, max_batch=8,
                                              data_dir=cifar_root), say=lambda _line: None)
    assert manifest["input"]["dtype"] == "float32" and manifest["input"]["preprocessing_in_graph"] is False
    assert manifest["artifacts"][0]["inputs"][0]["dtype"] == "float32" and manifest["artifacts"][0]["parity"]["passed"]


def triton_model_config():
    """Triton's ModelConfig protobuf module from the tritonclient package, without its grpc client."""
    import importlib.util

    package = importlib.util.find_spec("tritonclient")
    if package is None:
        pytest.skip("tritonclient is not installed (pip install -e '.[dev]')")
    path = Path(package.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_triton_configs_parse_with_tritons_schema(exported: Path) -> None:
    model_config_pb2 = triton_model_config()
    from google.protobuf import text_format

    repo = exported.parent / "triton"
    folders = sorted(p.name for p in repo.iterdir())
    assert folders == ["vit_cifar_tiny_onnx", "vit_cifar_tiny_onnx_fp16"]
    for folder in folders:
        config = text_format.Parse((repo / folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 16
        assert list(config.input[0].dims) == [3, 32, 32] and config.input[0].data_type == model_config_pb2.TYPE_UINT8
        assert list(config.output[0].dims) == [10] and config.output[0].data_type == model_config_pb2.TYPE_FP32
        assert config.HasField("dynamic_batching")
        assert (repo / folder / "1" / "model.onnx").is_file()
        assert (repo / folder / "labels.txt").read_text().split()[0] == "airplane"


def test_predict_cli_matches_the_runtime(exported: Path, cifar_root: Path, tmp_path: Path) -> None:
    from vitdeploy.data import load_test

    images = load_test(cifar_root).images[:3].numpy()
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(image.transpose(1, 2, 0)).save(paths[-1])
    big = tmp_path / "big.jpg"
    Image.fromarray(np.full((300, 200, 3), 128, np.uint8)).save(big)
    result = run_cli("predict", str(exported), *map(str, paths), str(big), "--json", "--top-k", "3")
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    with OrtBackend(exported / "model.onnx") as backend:
        logits = backend.infer(images)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for answer, p in zip(answers, probs, strict=False):
        assert len(answer["predictions"]) == 3
        assert answer["predictions"][0]["class_index"] == int(p.argmax())
        assert answer["predictions"][0]["probability"] == pytest.approx(float(p.max()), abs=1e-5)
    assert len(answers) == 4


def test_tampered_artifact_is_refused(exported: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "art"
    shutil.copytree(exported, copy)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(VitDeployError, match="no longer matches the sha256"):
        read_manifest(copy)
    (copy / "model_fp16.onnx").unlink()
    result = run_cli("predict", str(copy), str(tmp_path / "x.png"))
    assert result.returncode == 1 and "error:" in result.stderr


def test_export_errors(trained: Path, cifar_root: Path, tmp_path: Path) -> None:
    def export(*args: str):
        return run_cli("export", *args, "--data-dir", str(cifar_root), "--parity-images", "8")

    result = export(str(tmp_path / "nope"), "--out", str(tmp_path / "a"))
    assert result.returncode == 1 and "does not exist" in result.stderr
    (tmp_path / "plain.pt").write_bytes(b"not a checkpoint")
    result = export(str(tmp_path / "plain.pt"), "--out", str(tmp_path / "a"))
    assert result.returncode == 1 and "truncated or not a torch file" in result.stderr
    result = export(str(trained), "--out", str(tmp_path / "a"), "--min-batch", "8", "--max-batch", "4")
    assert result.returncode == 1 and "--max-batch 4 is below --min-batch 8" in result.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    result = export(str(trained), "--out", str(tmp_path / "full"))
    assert result.returncode == 1 and "--force" in result.stderr and (tmp_path / "full" / "notes.txt").read_text() == "mine"


def test_explicit_trt_without_tensorrt_fails_early(trained: Path, cifar_root: Path, tmp_path: Path) -> None:
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    result = run_cli("export", str(trained), "--out", str(tmp_path / "a"), "--trt", "--data-dir", str(cifar_root))
    assert result.returncode == 1
    assert "TensorRT is not installed" in result.stderr and "vitdeploy[trt]" in result.stderr
    assert not (tmp_path / "a").exists()  # failed before writing anything


def test_interrupted_export_leaves_no_manifest(trained: Path, cifar_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vitdeploy.export.artifacts as artifacts

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifacts.fp16, "convert_to_mixed_fp16", disk_full)
    with pytest.raises(OSError):
        export_artifacts(ExportOptions(source=trained, out=tmp_path / "art", fp16=True, max_batch=8, data_dir=cifar_root),
                         say=lambda _line: None)
    assert not (tmp_path / "art" / "manifest.json").exists()
    assert not (tmp_path / "art" / "model.onnx").exists()  # still in the staging folder, never published
    monkeypatch.undo()
    export_artifacts(ExportOptions(source=trained, out=tmp_path / "art", max_batch=8, data_dir=cifar_root), say=lambda _line: None)
    assert [p.name for p in (tmp_path / "art").glob(".staging-*")] == []  # the leftover is cleaned up
    assert (tmp_path / "art" / "manifest.json").is_file()


def test_failed_parity_keeps_the_artifact_marked_failed(trained: Path, cifar_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vitdeploy.parity as parity

    monkeypatch.setitem(parity.TOLERANCES, "fp32", parity.Tolerance(max_abs=0.0, margin=0.0, max_accuracy_drop=0.0))
    with pytest.raises(VitDeployError, match="parity failed for model.onnx"):
        export_artifacts(ExportOptions(source=trained, out=tmp_path / "art", max_batch=8, data_dir=cifar_root), say=lambda _line: None)
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["artifacts"][0]["status"] == "failed" and (tmp_path / "art" / "model.onnx").is_file()


def test_cli_export_says_why_no_engine(trained: Path, cifar_root: Path, tmp_path: Path) -> None:
    result = run_cli("export", str(trained), "--out", str(tmp_path / "art"), "--fp16", "--max-batch", "8",
                     "--data-dir", str(cifar_root))
    assert result.returncode == 0, result.stderr
    assert "no TensorRT engine:" in result.stdout and "PASS" in result.stdout
    assert (tmp_path / "art" / "manifest.json").is_file()


def test_ort_cuda_refuses_a_silent_cpu_fallback(exported: Path) -> None:
    """ONNX Runtime asked for CUDA without a usable GPU runs on the CPU; the backend must refuse."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the fallback cannot be provoked here")
    with pytest.raises(VitDeployError, match="ort-cuda needs a CUDA GPU and PyTorch sees none here"):
        OrtBackend(exported / "model.onnx", "cuda").activate()
    # Where PyTorch sees a GPU but ONNX Runtime's CUDA libraries do not load, the session falls back: refused too.
    monkeypatch = pytest.MonkeyPatch()
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        with pytest.raises(VitDeployError, match="fell back to CPUExecutionProvider|has no CUDAExecutionProvider"):
            OrtBackend(exported / "model.onnx", "cuda").activate()


def test_external_data_for_large_models(trained: Path, cifar_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vit_l/vit_h weights exceed protobuf's 2 GB: the same path, forced here on a small model."""
    import vitdeploy.export.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    manifest = export_artifacts(ExportOptions(source=trained, out=tmp_path / "art", fp16=True, max_batch=8, data_dir=cifar_root,
                                              triton=tmp_path / "triton"), say=lambda _line: None)
    for artifact, data in zip(manifest["artifacts"], ["model.onnx.data", "model_fp16.onnx.data"], strict=False):
        assert [e["path"] for e in artifact["external_data"]] == [data] and len(artifact["external_data"][0]["sha256"]) == 64
        assert artifact["status"] == "passed"
        assert (tmp_path / "art" / artifact["path"]).stat().st_size < 1_000_000  # the graph alone
    read_manifest(tmp_path / "art")  # verifies the data files' sha256 too
    assert (tmp_path / "triton" / "vit_cifar_tiny_onnx" / "1" / "model.onnx.data").is_file()
    with OrtBackend(tmp_path / "triton" / "vit_cifar_tiny_onnx" / "1" / "model.onnx") as backend:
        assert backend.infer(np.zeros((2, 3, 32, 32), np.uint8)).shape == (2, 10)


def test_fp16_activations_policy(trained: Path, cifar_root: Path, tmp_path: Path) -> None:
    manifest = export_artifacts(ExportOptions(source=trained, out=tmp_path / "art", fp16=True, fp16_policy="activations", max_batch=8,
                                              data_dir=cifar_root), say=lambda _line: None)
    low = next(a for a in manifest["artifacts"] if a["precision"] == "fp16")
    assert low["fp16_policy"] == "activations" and low["status"] == "passed" and low["tensorrt_preflight"]["ok"]
    model = onnx.load(str(tmp_path / "art" / "model_fp16.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == UINT8
    assert model.graph.output[0].type.tensor_type.elem_type == FLOAT
    seen = set()
    for op, name, inputs, outputs in node_dtypes(model):
        if op in ("MatMul", "Gemm", "Conv", "Softmax", "LayerNormalization", "Erf", "Add"):
            seen.add(op)
            assert FLOAT not in inputs and outputs[0] == FLOAT16, (op, name, inputs, outputs)
    assert {"MatMul", "Softmax", "LayerNormalization", "Add"} <= seen
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":  # statistics in fp32: stash_type absent (default 1) or 1
            assert all(a.i == 1 for a in node.attribute if a.name == "stash_type")


def test_unknown_fp16_policy_is_refused(trained: Path, tmp_path: Path) -> None:
    with pytest.raises(VitDeployError, match="unknown --fp16-policy 'half'"):
        export_artifacts(ExportOptions(source=trained, out=tmp_path / "art", fp16=True, fp16_policy="half"), say=lambda _line: None)
    assert not (tmp_path / "art").exists()
