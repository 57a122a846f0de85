"""Token merging through deployment (issue 25): export --tome writes merged graphs beside the unmerged
ones, each through the accuracy gate and the TensorRT preflight, with static token shapes; bench,
predict and serve pick them by r; --tome auto; a failing gate; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.conftest import run_cli, serve_client
from vitdeploy import tome
from vitdeploy.bench.report import write_reports
from vitdeploy.bench.run import BenchOptions, run_bench
from vitdeploy.bench.timing import TimingPolicy
from vitdeploy.errors import VitDeployError
from vitdeploy.export.artifacts import ExportOptions, export_artifacts
from vitdeploy.export.int8 import Int8Options
from vitdeploy.manifest import read_manifest, validate_manifest
from vitdeploy.models import REGISTRY, build_model

TINY = REGISTRY["vit_cifar_tiny"]  # 64 patch tokens and a class token, 6 blocks


@pytest.fixture(scope="module")
def tome_art(trained: Path, cifar_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`trained` exported with --tome 4 --fp16 --int8 and a Triton repository (read-only by convention)."""
    root = tmp_path_factory.mktemp("tome")
    export_artifacts(ExportOptions(source=trained, out=root / "art", fp16=True, int8=True, max_batch=16,
                                   int8_options=Int8Options(calib_images=32), data_dir=cifar_root, tome=(4,),
                                   tome_max_accuracy_drop=4.0, triton=root / "triton"), say=lambda _line: None)
    return root / "art"


def test_merged_graphs_beside_the_unmerged_pass_the_gate_and_the_preflight(tome_art: Path) -> None:
    manifest = read_manifest(tome_art)
    by_path = {a["path"]: a for a in manifest["artifacts"]}
    merged = ["model_tome4.onnx", "model_tome4_fp16.onnx", "model_tome4_int8_cpu.onnx", "model_tome4_int8_trt.onnx"]
    assert set(merged) | {"model.onnx", "model_fp16.onnx", "model_int8_cpu.onnx", "model_int8_trt.onnx"} == set(by_path)
    plan = tome.plan(TINY, 4)
    for path in merged:
        record = by_path[path]
        assert record["status"] == "passed" and record["parity"]["passed"], path
        assert record["tome"]["schedule"] == [4] * 6 and record["tome"]["tokens"] == list(plan.tokens)
        assert 0 < record["tome"]["gflops_per_image"] < record["tome"]["unmerged_gflops_per_image"]
        assert record["parity"]["tolerance"]["max_accuracy_drop"] >= 4.0  # judged against the unmerged reference
        if record["int8"]["target"] != "cpu" if "int8" in record else True:
            assert record["tensorrt_preflight"]["ok"], (path, record["tensorrt_preflight"]["problems"])
    assert by_path["model_tome4.onnx"]["parity"]["merged"]["top1_agreement"] >= 0.99  # PyTorch merging the same way
    assert "tome" not in by_path["model.onnx"]
    triton = {m["name"] for m in manifest["triton"]["models"]}
    assert {"vit_cifar_tiny_onnx", "vit_cifar_tiny_tome4_onnx", "vit_cifar_tiny_tome4_onnx_fp16",
            "vit_cifar_tiny_tome4_onnx_int8_cpu"} <= triton
    assert (tome_art.parent / "triton" / "vit_cifar_tiny_tome4_onnx" / "1" / "model.onnx").is_file()


def test_the_merged_graph_has_static_token_shapes(tome_art: Path) -> None:
    """Every shape but the batch is a number, and the sequence lengths are the schedule's."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(tome_art / "model_tome4.onnx")))
    lengths = set()
    for value in model.graph.value_info:
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 3 and dims[0].dim_param and dims[2].dim_value == TINY.hidden_dim:
            assert dims[1].dim_value > 0, value.name  # tokens: static
            lengths.add(dims[1].dim_value)
        assert all(d.dim_value > 0 or d.dim_param == "batch" for d in dims), value.name  # nothing data-dependent
    assert set(tome.plan(TINY, 4).tokens) <= lengths


def test_bench_runs_each_r_beside_the_unmerged(tome_art: Path, tmp_path: Path) -> None:
    options = BenchOptions(artifacts=tome_art, backends=("ort-cpu", "pytorch"), precisions=("fp32",), batch_sizes=(4,),
                           modes=("end-to-end",), policy=TimingPolicy(0, 2, 0.0, 1.0), limit=24)
    report = run_bench(options, say=lambda _line: None)
    runs = {(r["backend"], r["tome"]): r for r in report["records"]}
    assert set(runs) == {("ort-cpu", None), ("ort-cpu", "4"), ("pytorch", None), ("pytorch", "4")}
    assert runs[("ort-cpu", "4")]["artifact"] == "model_tome4.onnx"
    assert runs[("ort-cpu", "4")]["gflops_per_image"] < runs[("ort-cpu", None)]["gflops_per_image"]
    assert runs[("pytorch", "4")]["speedup_vs_unmerged"] > 0 and runs[("pytorch", None)]["speedup_vs_unmerged"] == 1.0
    parity = {(p["backend"], p["tome"]): p for p in report["parity"]}
    assert all(p["passed"] for p in parity.values())
    # the merged graph and PyTorch merging the same way answer alike
    assert parity[("ort-cpu", "4")]["accuracy_pct"] == parity[("pytorch", "4")]["accuracy_pct"]
    assert (tmp_path / "bench.png") in write_reports(report, tmp_path)
    only = run_bench(BenchOptions(**{**options.__dict__, "tome": ("4",)}), say=lambda _line: None)
    assert {r["tome"] for r in only["records"]} == {"4"}


def test_predict_and_serve_pick_the_merged_graph(tome_art: Path, cifar_root: Path, tmp_path: Path) -> None:
    from PIL import Image

    image = tmp_path / "cat.png"
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(image)
    done = run_cli("predict", str(tome_art), str(image), "--tome", "4", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["model_file"].endswith("model_tome4.onnx")
    missing = run_cli("predict", str(tome_art), str(image), "--tome", "5")
    assert missing.returncode == 1 and missing.stderr.count("error:") == 1
    assert "merging tokens with r=5" in missing.stderr and "--tome 5" in missing.stderr

    with serve_client(artifacts=tome_art, backend="ort-cpu", tome=4, max_batch=4) as client:
        model = client.get("/v1/model").json()
        assert model["backend"]["model"].endswith("model_tome4.onnx")
        assert model["open_inference_protocol"]["model"] == "vit_cifar_tiny_tome4_onnx"
        assert client.get("/v2/models/vit_cifar_tiny_tome4_onnx/ready").status_code == 200
        answer = client.post("/v1/predict", files={"file": ("cat.png", image.read_bytes(), "image/png")})
        assert answer.status_code == 200, answer.text
        explained = client.post("/v1/explain", files={"file": ("cat.png", image.read_bytes(), "image/png")})
        assert explained.status_code == 503 and "merges tokens" in explained.json()["error"]


def _zeroing_merge(at_least: int):
    """tome.merge, except that from r = `at_least` on it wipes every token: a merging that destroys accuracy."""
    real = tome.merge

    def merge(x, size, metric, r, prefix):  # noqa: ANN001, ANN202 - the same signature
        out, sizes = real(x, size, metric, r, prefix)
        return (out * 0 if r >= at_least else out), sizes

    return merge


def test_a_merging_that_fails_the_gate_is_kept_marked_failed(trained: Path, cifar_root: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tome, "merge", _zeroing_merge(1))
    out = tmp_path / "art"
    with pytest.raises(VitDeployError, match="parity failed for model_tome4.onnx"):
        export_artifacts(ExportOptions(source=trained, out=out, max_batch=16, data_dir=cifar_root, tome=(4,)),
                         say=lambda _line: None)
    manifest = read_manifest(out)
    merged = next(a for a in manifest["artifacts"] if a["path"] == "model_tome4.onnx")
    assert merged["status"] == "failed" and any("points below" in f for f in merged["parity"]["failures"])
    assert next(a for a in manifest["artifacts"] if a["path"] == "model.onnx")["status"] == "passed"


def test_auto_exports_the_largest_r_that_passes(trained: Path, cifar_root: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tome, "merge", _zeroing_merge(6))  # r = 10, 8 and 6 destroy the model; 4 and 2 do not
    out = tmp_path / "art"
    lines: list[str] = []
    export_artifacts(ExportOptions(source=trained, out=out, max_batch=16, data_dir=cifar_root, tome=("auto",),
                                   tome_max_accuracy_drop=10.0), say=lines.append)
    manifest = read_manifest(out)
    assert manifest["tome_auto"]["chosen"] == "4"
    assert [(t["r"], t["passed"]) for t in manifest["tome_auto"]["tried"]] == [("10", False), ("8", False), ("6", False),
                                                                               ("4", True)]
    assert sorted(a["path"] for a in manifest["artifacts"]) == ["model.onnx", "model_tome4.onnx"]
    assert any(line.startswith("--tome auto: r=4") for line in lines)


@pytest.mark.parametrize("args, message", [
    (["--tome", "-1"], "cannot be negative"),
    (["--tome", "33"], "at most 32"),
    (["--tome", "1,2"], "6 blocks"),
    (["--tome", "auto", "--tome", "4"], "give it alone"),
    (["--tome", "4", "--tome-max-accuracy-drop", "101"], "0..100"),
])
def test_bad_tome_values_are_one_error_line_and_write_nothing(trained: Path, cifar_root: Path, tmp_path: Path,
                                                              args: list[str], message: str) -> None:
    out = tmp_path / "art"
    done = run_cli("export", str(trained), "--out", str(out), "--data-dir", str(cifar_root), *args)
    assert done.returncode == 1
    assert done.stderr.count("error:") == 1 and message in done.stderr, done.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_serving_commands_refuse_auto(tmp_path: Path) -> None:
    done = run_cli("bench", str(tmp_path), "--tome", "auto")  # refused before any folder is read
    assert done.returncode == 1 and "chooses r at export" in done.stderr


def test_a_tampered_merging_record_is_refused(tome_art: Path) -> None:
    manifest = json.loads((tome_art / "manifest.json").read_text())
    merged = next(a for a in manifest["artifacts"] if "tome" in a)
    for bad in ({**merged["tome"], "label": "../x"}, {**merged["tome"], "schedule": [1] * 1001}, "4"):
        with pytest.raises(VitDeployError, match="tome"):
            validate_manifest({**manifest, "artifacts": [{**merged, "tome": bad}]})


def test_training_with_merging_is_checkpointed_and_exported(cifar_root: Path, tmp_path: Path) -> None:
    """train --tome fine-tunes (and evaluates) merging; the checkpoint keeps the setting and the plain weights;
    a resume must keep it; export then writes the merged graphs without being told."""
    from vitdeploy.checkpoint import load_checkpoint
    from vitdeploy.export.artifacts import _tome_plan
    from vitdeploy.models import load_model
    from vitdeploy.train import TrainConfig, run_training

    config = TrainConfig.from_options("vit_cifar_tiny", data_dir=str(cifar_root), out=str(tmp_path / "run"), epochs=1,
                                      batch_size=16, val_size=40, test_size=16, device="cpu", max_steps=2, ema=True,
                                      tome="4")
    run_training(config)
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint["config"]["tome"] == "4"
    loaded = load_model(tmp_path / "run")  # the plain architecture: the weights do not depend on merging
    assert tome.merging_of(loaded.module) is None
    lines: list[str] = []
    plan = _tome_plan(ExportOptions(source=tmp_path / "run", out=tmp_path / "art"), loaded, lines.append)
    assert [m.label for m in plan.mergings] == ["4"] and "fine-tuned with --tome 4" in lines[0]
    assert _tome_plan(ExportOptions(source=tmp_path / "run", out=tmp_path / "art", tome=(None,)), loaded,
                      lines.append).mergings == ()  # --tome 0: unmerged only
    with pytest.raises(VitDeployError, match="--tome 4, not 2"):
        TrainConfig.from_dict(checkpoint["config"]).resumed({"tome": "2"})


def test_merging_survives_the_copies_training_makes() -> None:
    import copy

    from torch.optim.swa_utils import AveragedModel

    module = tome.apply(build_model(TINY), tome.plan(TINY, 4))
    for twin in (copy.deepcopy(module), AveragedModel(module).module):  # the EMA is a deep copy
        assert tome.merging_of(twin) == tome.plan(TINY, 4)
        assert twin.encoder.layers.forward.__self__ is twin.encoder.layers  # bound to the copy, not the original


@pytest.mark.parametrize("value, message", [("99", "at most 32"), ("auto", "for export"), ("x", "takes R")])
def test_train_refuses_bad_tome(cifar_root: Path, tmp_path: Path, value: str, message: str) -> None:
    from vitdeploy.train import TrainConfig

    with pytest.raises(VitDeployError, match=message):
        TrainConfig.from_options("vit_cifar_tiny", data_dir=str(cifar_root), out=str(tmp_path / "run"), tome=value)
