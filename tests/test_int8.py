"""INT8 export (issue 12): which nodes carry Q/DQ, symmetric zero points for TensorRT,
calibration determinism, the accuracy gate, --precision int8 through predict/bench/serve,
and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.conftest import run_cli, serve_client, write_batch
from vitdeploy.errors import VitDeployError
from vitdeploy.export import artifacts as artifacts_module
from vitdeploy.export.artifacts import ExportOptions, export_artifacts
from vitdeploy.export.int8 import Int8Options, cpu_form, scales
from vitdeploy.manifest import read_manifest


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def test_manifest_records_both_int8_graphs(int8_art: Path) -> None:
    manifest = read_manifest(int8_art)
    int8 = {a["int8"]["target"]: a for a in manifest["artifacts"] if a["precision"] == "int8"}
    assert set(int8) == {"cpu", "tensorrt"}
    cpu, trt = int8["cpu"], int8["tensorrt"]
    assert cpu["int8"]["form"] == cpu_form(set())["form"] or cpu["int8"]["cpu_int8_flags"]  # the rule's choice, recorded
    assert cpu["int8"]["backends"] == ["ort-cpu"] and trt["int8"]["backends"] == ["ort-trt", "trt", "openvino"]
    assert trt["int8"]["form"] == "qdq-s8-symmetric" and trt["tensorrt_preflight"]["ok"]
    assert cpu["tensorrt_preflight"] is None  # the CPU form is not meant for TensorRT
    calibration = trt["int8"]["calibration"]
    assert calibration["method"] == "minmax" and calibration["images"] == 64 and calibration["seed"] == 0
    assert calibration["process_peak_rss_mib"] > 0
    for artifact in int8.values():
        assert artifact["status"] == "passed" and artifact["parity"]["tolerance"]["max_accuracy_drop"] == 1.0
        assert 0 <= artifact["parity"]["top1_agreement"] <= 1


def test_only_weighted_matmuls_carry_qdq_and_the_sensitive_ops_stay_float(int8_art: Path) -> None:
    model = onnx.load(str(int8_art / "model_int8_trt.onnx"))
    made_by = producers(model)
    initializers = {t.name: t for t in model.graph.initializer}
    quantized_matmuls = 0
    for node in model.graph.node:
        sources = [made_by.get(i) for i in node.input if i]
        from_dq = [s for s in sources if s is not None and s.op_type == "DequantizeLinear"]
        if node.op_type in ("LayerNormalization", "Softmax", "Erf", "Add") and node.op_type != "Add":
            assert not from_dq, f"{node.op_type} {node.name} reads quantized data"
        if node.op_type in ("MatMul", "Gemm") and from_dq:
            quantized_matmuls += 1
            assert len(from_dq) == 2, node.name  # activation and weight
    assert quantized_matmuls >= 6
    # symmetric: every zero point is 0 and int8
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zero = onnx.numpy_helper.to_array(initializers[node.input[2]])
            assert zero.dtype == np.int8 and not zero.any(), node.name
    # the head (the last weighted Gemm/MatMul) stays float by default
    head = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")][-1]
    assert all(made_by.get(i) is None or made_by[i].op_type != "DequantizeLinear" for i in head.input)
    # attention's QK^T and softmax x V (no constant weight) stay float
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] not in initializers and made_by.get(node.input[1]) is not None \
                and made_by[node.input[1]].op_type != "DequantizeLinear":
            assert made_by[node.input[0]].op_type != "DequantizeLinear"


def test_calibration_is_deterministic(trained: Path, int8_art: Path, cifar_root: Path, tmp_path: Path) -> None:
    from vitdeploy.export.int8 import quantize
    from vitdeploy.models import load_model

    options = ExportOptions(source=trained, out=tmp_path / "x", int8=True, data_dir=cifar_root, int8_options=Int8Options(calib_images=32))
    source = artifacts_module._Source.load(options, load_model(trained / "last.pt"))
    first = artifacts_module._calibration_images(options, source)
    again = artifacts_module._calibration_images(options, source)
    other = artifacts_module._calibration_images(
        ExportOptions(source=trained, out=tmp_path / "x", int8=True, int8_options=Int8Options(calib_images=32, seed=1)),
        source)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    quantize(int8_art / "model.onnx", tmp_path / "a.onnx", "qdq-s8-symmetric", first, Int8Options())
    quantize(int8_art / "model.onnx", tmp_path / "b.onnx", "qdq-s8-symmetric", again, Int8Options())
    assert scales(tmp_path / "a.onnx") == scales(tmp_path / "b.onnx") and scales(tmp_path / "a.onnx")


@pytest.mark.parametrize("flags", [{"avx2"}, {"avx2", "avx512_vnni"}])  # both CPU forms, on any CPU
def test_a_broken_calibration_fails_the_gate_and_is_kept_marked_failed(trained: Path, cifar_root: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       flags: set[str]) -> None:
    from vitdeploy.export import int8 as int8q

    real = int8q.quantize

    def miscalibrated(source: Path, out: Path, *args: object, **kwargs: object) -> dict:
        """The real quantization with every scale then off by 50x: what a broken calibration does to a graph."""
        record = real(source, out, *args, **kwargs)
        model = onnx.load(str(out))
        for tensor in model.graph.initializer:
            if "scale" in tensor.name:
                tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor) * 50, tensor.name))
        onnx.save(model, str(out))
        return record

    monkeypatch.setattr(int8q, "quantize", miscalibrated)
    monkeypatch.setattr(artifacts_module, "cpu_flags", lambda: flags)
    with pytest.raises(VitDeployError, match="parity failed for .*model_int8"):
        export_artifacts(ExportOptions(source=trained, out=tmp_path / "art", int8=True, max_batch=16, data_dir=cifar_root,
                                       int8_options=Int8Options(calib_images=16), int8_max_accuracy_drop=0.5),
                         say=lambda _line: None)
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    failed = [a for a in manifest["artifacts"] if a["status"] == "failed"]
    assert failed and all(a["precision"] == "int8" for a in failed)
    assert all((tmp_path / "art" / a["path"]).is_file() for a in failed)


def test_int8_through_predict_bench_and_serve(int8_art: Path, cifar_root: Path, tmp_path: Path) -> None:
    from PIL import Image

    from vitdeploy.data import load_test

    image = load_test(cifar_root).images[0].numpy().transpose(1, 2, 0)
    Image.fromarray(image).save(tmp_path / "x.png")
    predicted = run_cli("predict", str(int8_art), str(tmp_path / "x.png"), "--precision", "int8", "--json")
    assert predicted.returncode == 0, predicted.stderr
    top = json.loads(predicted.stdout)[0]["predictions"]
    result = run_cli("bench", str(int8_art), "--backend", "ort-cpu", "--precision", "fp32,int8", "--batch-sizes", "1,4",
                     "--min-iters", "2", "--max-seconds", "0.3", "--out", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert {(r["precision"], r["batch_size"]) for r in report["records"] if r["mode"] == "end-to-end"} == {
        ("fp32", 1), ("fp32", 4), ("int8", 1), ("int8", 4)}
    assert "int8" in (tmp_path / "b" / "bench.csv").read_text()
    with serve_client(artifacts=int8_art, precision="int8", max_batch=8) as client:
        served = client.post("/v1/predict", content=(tmp_path / "x.png").read_bytes())
        assert served.status_code == 200
        assert [p["label"] for p in served.json()["predictions"]] == [p["label"] for p in top]


@pytest.mark.parametrize(("args", "message"), [
    (["--calib-images", "0"], "--calib-images must be at least 1"),
    (["--calib-images", "100000"], "exceeds the 160 training images"),
    (["--calib-method", "median"], "Invalid value for '--calib-method'"),
    (["--int8-exclude", "no_such_node", "--calib-images", "16"], "--int8-exclude names no node of the graph: no_such_node"),
])
def test_bad_int8_options(trained: Path, cifar_root: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = run_cli("export", str(trained), "--out", str(tmp_path / "art"), "--int8", "--max-batch", "8",
                     "--parity-images", "10", "--data-dir", str(cifar_root), *args)
    assert result.returncode in (1, 2) and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "art" / "manifest.json").exists()


def test_int8_without_training_data_names_data_dir(trained: Path, tmp_path: Path) -> None:
    only_test = tmp_path / "data" / "cifar-10-batches-py"
    only_test.mkdir(parents=True)
    write_batch(only_test / "test_batch", np.arange(20) % 10, seed=3)
    result = run_cli("export", str(trained), "--out", str(tmp_path / "art"), "--int8", "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 1 and "--int8 calibrates on CIFAR-10 training images" in result.stderr
    assert "--data-dir" in result.stderr and not (tmp_path / "art").exists()


def test_int8_on_a_model_above_2_gb_is_refused(trained: Path, cifar_root: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from vitdeploy.export import onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1024)  # as if the weights were above the limit
    with pytest.raises(VitDeployError, match="--int8 needs the model in one ONNX file"):
        export_artifacts(ExportOptions(source=trained, out=tmp_path / "art", int8=True, max_batch=8, data_dir=cifar_root,
                                       int8_options=Int8Options(calib_images=8)), say=lambda _line: None)


def test_precision_int8_without_int8_artifacts(exported: Path, tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    result = run_cli("predict", str(exported), str(tmp_path / "x.png"), "--precision", "int8")
    assert result.returncode == 1 and "has no onnx int8 artifact" in result.stderr and "--int8" in result.stderr


def test_calibration_one_batch_at_a_time_equals_one_big_batch(int8_art: Path, cifar_root: Path, tmp_path: Path) -> None:
    """Ranges are merged batch by batch (memory bounded by one batch), with the same result as all at once."""
    from vitdeploy.data import load_test
    from vitdeploy.export.int8 import quantize

    images = load_test(cifar_root).images[:40].numpy()
    quantize(int8_art / "model.onnx", tmp_path / "big.onnx", "qdq-s8-symmetric", images, Int8Options(), model_px=32)
    quantize(int8_art / "model.onnx", tmp_path / "one.onnx", "qdq-s8-symmetric", images, Int8Options(), model_px=224)
    assert scales(tmp_path / "big.onnx") == scales(tmp_path / "one.onnx")


@pytest.mark.parametrize("flags", [{"avx2"}, {"avx2", "avx512_vnni"}])  # the rule's form for either CPU, on any CPU
def test_an_images_int8_answer_does_not_depend_on_its_batch(exported: Path, cifar_root: Path, tmp_path: Path,
                                                             flags: set[str]) -> None:
    import onnxruntime as ort

    from vitdeploy.data import load_test
    from vitdeploy.export import int8 as int8q

    images = load_test(cifar_root).images.numpy()
    out = tmp_path / "int8.onnx"
    int8q.quantize(exported / "model.onnx", out, cpu_form(flags)["form"], images[:16], Int8Options(calib_images=16))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    alone = np.concatenate([session.run(None, {name: images[i:i + 1]})[0] for i in range(8)])
    together = session.run(None, {name: images[:8]})[0]
    beside_white = session.run(None, {name: np.concatenate([images[:1], np.full_like(images[:7], 255)])})[0][0]
    assert np.abs(alone - together).max() < 1e-5 and np.abs(alone[0] - beside_white).max() < 1e-5
