"""Graphs TensorRT can build: the uint8 input read by one Cast, and the preflight's rules,
each caught on a small hand-made graph that breaks it; every graph the exporter writes
passes (32 px and 224 px models, with and without preprocessing, fp32 and fp16)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torchvision.models.vision_transformer import VisionTransformer

from tests.conftest import REPO, SERVE_MISSING
from vitdeploy.export import onnx_export
from vitdeploy.export.trt_compat import preflight, single_cast_input, support_lists
from vitdeploy.manifest import read_manifest
from vitdeploy.preprocess import CIFAR_MEAN, CIFAR_STD, Preprocessing

NEWEST = support_lists()[0]


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def uint8_graph(readers: list[onnx.NodeProto], outputs: list[str], opset: int = 18,
                types: dict[str, int] | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(
        readers, "g", [helper.make_tensor_value_info("input", TensorProto.UINT8, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info(o, (types or {}).get(o, TensorProto.UNDEFINED), None) for o in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def test_rewiring_keeps_results_exact_and_leaves_one_cast() -> None:
    model = uint8_graph([
        helper.make_node("Shape", ["input"], ["shape"], name="shape"),
        helper.make_node("Cast", ["input"], ["x"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Cast", ["input"], ["wide"], to=TensorProto.INT64, name="to_int"),
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
    ], ["shape", "total", "wide"], types={"shape": TensorProto.INT64, "total": TensorProto.FLOAT, "wide": TensorProto.INT64})
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 4), dtype=np.uint8)
    before = run(model, {"input": images})
    assert not preflight(model)["ok"]
    single_cast_input(model)
    after = run(model, {"input": images})
    readers = [n for n in model.graph.node if "input" in n.input]
    assert [(n.op_type, n.name) for n in readers] == [("Cast", "cast")] and model.graph.node[0].name == "cast"
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert preflight(model)["ok"], preflight(model)["problems"]


def test_a_uint8_input_without_a_cast_gets_one() -> None:
    model = uint8_graph([helper.make_node("Shape", ["input"], ["shape"])], ["shape"])
    single_cast_input(model)
    assert [n.op_type for n in model.graph.node] == ["Cast", "Shape"] and preflight(model)["ok"]


@pytest.mark.parametrize(("node", "problem"), [
    (helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="cubic", name="r"), "mode 'cubic'"),
    (helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear", antialias=1, name="r"), "antialiasing"),
    (helper.make_node("Unique", ["x"], ["y"], name="u"), "operator Unique is not supported"),
    (helper.make_node("Custom", ["x"], ["y"], domain="com.example", name="c"), "custom domain 'com.example'"),
    (helper.make_node("Cast", ["x"], ["y"], to=TensorProto.UINT8, name="back"), "UINT8 is allowed only as a graph input"),
    (helper.make_node("LayerNormalization", ["x", "scale"], ["y", "mean", "inv"], name="ln"), "more than its first output"),
])
def test_each_rule_is_caught(node: onnx.NodeProto, problem: str) -> None:
    nodes = [helper.make_node("Cast", ["input"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("Constant", [], ["scales"], value=helper.make_tensor("s", TensorProto.FLOAT, [4], [1, 1, 2, 2])),
             helper.make_node("Constant", [], ["scale"], value=helper.make_tensor("w", TensorProto.FLOAT, [4], [1, 1, 1, 1])),
             node]
    result = preflight(uint8_graph(nodes, ["y"]))
    assert not result["ok"] and any(problem in p for p in result["problems"]), result["problems"]
    assert "no substitute for a build" in result["note"]


def test_opset_outside_the_parser_range_is_caught() -> None:
    model = uint8_graph([helper.make_node("Cast", ["input"], ["y"], to=TensorProto.FLOAT)], ["y"], opset=NEWEST["opset_max"] + 1)
    assert any("outside TensorRT" in p for p in preflight(model)["problems"])


def test_older_lists_lack_newer_operators() -> None:
    model = uint8_graph([helper.make_node("Cast", ["input"], ["x"], to=TensorProto.FLOAT),
                         helper.make_node("Constant", [], ["scale"], value=helper.make_tensor("w", TensorProto.FLOAT, [4], [1] * 4)),
                         helper.make_node("LayerNormalization", ["x", "scale"], ["y"])], ["y"], opset=17)
    result = preflight(model)
    assert result["ok"]
    older = [v for name, v in result["versions"].items() if name.startswith("8.")]
    assert older and not older[0]["ok"] and any("LayerNormalization" in p for p in older[0]["problems"])
    assert all(v["source"].startswith("onnx/onnx-tensorrt") for v in result["versions"].values())


def test_support_lists_name_their_source() -> None:
    for support in support_lists():
        assert support["source"] and support["opset_min"] <= 18 <= support["opset_max"] or support["major"] < 10
        assert {"Cast", "MatMul", "Softmax"} <= set(support["operators"])


@pytest.mark.parametrize(("input_size", "patch", "in_graph"), [(32, 4, True), (224, 16, True), (224, 16, False)])
def test_every_exported_graph_passes(tmp_path: Path, input_size: int, patch: int, in_graph: bool) -> None:
    """A 1-layer ViT with the same operators as the registry's models (32 px patch 4, 224 px patch 16 with the resize)."""
    model = VisionTransformer(image_size=input_size, patch_size=patch, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=10).eval()
    preprocessing = Preprocessing(32, input_size, "bilinear", CIFAR_MEAN, CIFAR_STD)
    module = onnx_export.InferenceModel(model, preprocessing, in_graph)
    path = tmp_path / "m.onnx"
    onnx_export.export_onnx(module, onnx_export.example_input(preprocessing, in_graph, 2), path, 1, 8, {})
    graph = onnx.load(str(path))
    result = preflight(graph)
    assert result["ok"], result["problems"]
    if in_graph:
        readers = [n for n in graph.graph.node if "input" in n.input]
        assert len(readers) == 1 and readers[0].op_type == "Cast"
        if input_size == 224:
            assert any(n.op_type == "Resize" for n in graph.graph.node)
    example = onnx_export.example_input(preprocessing, in_graph, 3)
    with torch.no_grad():
        expected = module(example).numpy()
    np.testing.assert_allclose(run(graph, {"input": example.numpy()})[0], expected, atol=1e-4)


def test_bicubic_preprocessing_is_reported(tmp_path: Path) -> None:
    model = VisionTransformer(image_size=64, patch_size=16, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10)
    preprocessing = Preprocessing(32, 64, "bicubic", CIFAR_MEAN, CIFAR_STD)
    path = tmp_path / "m.onnx"
    onnx_export.export_onnx(onnx_export.InferenceModel(model.eval(), preprocessing), onnx_export.example_input(preprocessing, True, 2),
                            path, 1, 4, {})
    problems = preflight(onnx.load(str(path)))["problems"]
    assert any("cubic" in p for p in problems), problems


def test_the_manifest_records_the_preflight(exported: Path) -> None:
    for artifact in read_manifest(exported)["artifacts"]:
        check = artifact["tensorrt_preflight"]
        assert check["ok"] and check["problems"] == [] and "no substitute for a build" in check["note"]


def test_inference_code_loads_no_training_or_export_code() -> None:
    # without the serve extra (as on the GPU machine) the server's modules that need no FastAPI
    serve = "vitdeploy.serve.app" if SERVE_MISSING is None else "vitdeploy.serve.batcher, vitdeploy.serve.explainer"
    code = (
        "import sys\n"
        "import vitdeploy.backends.factory, vitdeploy.backends.pytorch, vitdeploy.backends.ort, vitdeploy.backends.trt\n"
        f"import vitdeploy.bench.run, {serve}\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('vitdeploy.train', 'vitdeploy.export')))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr


# -- ort-trt: ONNX Runtime's TensorRT execution provider ----------------------------------------


def test_nodes_outside_tensorrt_are_named_from_the_profile() -> None:
    from vitdeploy.backends.ort import nodes_outside

    profile = [
        {"cat": "Session", "name": "session_initialization"},
        {"cat": "Node", "name": "TensorrtExecutionProvider_TRTKernel_graph_main_0_kernel_time",
         "args": {"provider": "TensorrtExecutionProvider"}},
        {"cat": "Node", "name": "node_Shape_0_kernel_time", "args": {"provider": "CUDAExecutionProvider"}},
        {"cat": "Node", "name": "node_Shape_0_fence_before", "args": {"provider": "CUDAExecutionProvider"}},
        {"cat": "Node", "name": "Erf_3_kernel_time", "args": {"provider": "CPUExecutionProvider"}},
    ]
    assert nodes_outside(profile, "TensorrtExecutionProvider") == ["node_Shape_0", "Erf_3"]
    assert nodes_outside(profile[:2], "TensorrtExecutionProvider") == []


def test_ort_trt_options_come_from_the_manifest(exported: Path, tmp_path: Path) -> None:
    import shutil

    from vitdeploy.backends.factory import open_backend

    art = tmp_path / "art"
    shutil.copytree(exported, art)
    backend = open_backend(art, read_manifest(art), "ort-trt", "fp16")
    options = backend._trt_options()
    assert options["trt_engine_cache_path"] == str(art / ".ort-trt-cache") and (art / ".ort-trt-cache").is_dir()
    assert options["trt_fp16_enable"] == "True" and options["trt_timing_cache_enable"] == "True"
    assert options["trt_profile_min_shapes"] == "input:1x3x32x32,input:2x3x32x32"
    assert options["trt_profile_opt_shapes"] == "input:1x3x32x32,input:16x3x32x32"
    assert options["trt_profile_max_shapes"] == "input:1x3x32x32,input:16x3x32x32"


def test_ort_trt_without_a_gpu_is_one_line(exported: Path, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    result = run_cli("predict", str(exported), str(image), "--backend", "ort-trt")
    assert result.returncode == 1 and result.stderr.startswith("error: ort-trt needs a CUDA GPU"), result.stderr
    result = run_cli("bench", str(exported), "--backend", "ort-trt", "--out", str(tmp_path / "b"))
    assert result.returncode == 1 and "backend ort-trt cannot run here" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "b" / "bench.json").exists()
    info = run_cli("info", "--json")
    assert any(b["name"] == "ort-trt" for b in __import__("json").loads(info.stdout)["backends"])


@pytest.mark.gpu
def test_ort_trt_runs_every_node_in_tensorrt(exported: Path, tmp_path: Path) -> None:
    """On a GPU machine with TensorRT libraries: the whole graph runs inside TensorRT."""
    import shutil

    from vitdeploy.backends import registry
    from vitdeploy.backends.factory import open_backend

    if not registry.get("ort-trt").probe()[0]:
        pytest.skip("ONNX Runtime's TensorRT provider cannot run here")
    art = tmp_path / "art"
    shutil.copytree(exported, art)
    with open_backend(art, read_manifest(art), "ort-trt", "fp32") as backend:
        logits = backend.infer(np.zeros((4, 3, 32, 32), np.uint8))
    assert logits.shape == (4, 10) and np.isfinite(logits).all()
