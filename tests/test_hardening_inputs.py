"""Hostile and unlucky input outside the server (issue 19): explain's output folder, decoders'
exceptions, colour-key transparency, huge numbers, long digit strings, folders named as
images, diverging and interrupted training."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import REPO, run_cli, write_cifar
from tests.test_hardening import one_error_line, png
from vitdeploy.data import load_test
from vitdeploy.errors import VitDeployError
from vitdeploy.images import Fit, decode_image

# -- 4. explain never writes over a file it did not create ------------------------------------


@pytest.fixture
def images(cifar_root: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "dl"
    folder.mkdir()
    for i, name in enumerate(("cat", "manifest")):
        Image.fromarray(load_test(cifar_root).images[i].numpy().transpose(1, 2, 0)).save(folder / f"{name}.png")
    return folder


def test_explain_refuses_an_out_that_holds_its_inputs_or_an_artifact_folder(exported: Path, trained: Path, images: Path) -> None:
    before = (images / "cat.png").read_bytes()
    line = one_error_line(run_cli("explain", str(exported), str(images / "cat.png"), "--out", str(images)))
    assert "holds the images being explained" in line and (images / "cat.png").read_bytes() == before
    manifest = (exported / "manifest.json").read_bytes()
    line = one_error_line(run_cli("explain", str(trained), str(images / "manifest.png"), "--out", str(exported)))
    assert "is an artifact folder" in line and (exported / "manifest.json").read_bytes() == manifest


def test_explain_keeps_files_already_in_out(trained: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "maps"
    out.mkdir()
    (out / "cat.png").write_bytes(b"the user's own picture")
    (out / "cat-1.json").write_text("the user's notes")
    result = run_cli("explain", str(trained), str(images / "cat.png"), str(images / "cat.png"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "cat.png").read_bytes() == b"the user's own picture" and (out / "cat-1.json").read_text() == "the user's notes"
    written = sorted(p.name for p in out.iterdir())
    assert written == ["cat-1.json", "cat-2.json", "cat-2.png", "cat-3.json", "cat-3.png", "cat.png"], written
    result = run_cli("explain", str(trained), str(images / "cat.png"), "--out", str(out))  # a second run adds, never replaces
    assert result.returncode == 0 and (out / "cat-4.png").is_file() and len(list(out.iterdir())) == 8


def test_a_class_of_thousands_of_digits_is_one_line(trained: Path, images: Path, tmp_path: Path) -> None:
    line = one_error_line(run_cli("explain", str(trained), str(images / "cat.png"), "--out", str(tmp_path / "m"),
                                  "--class", "9" * 5000))
    assert "--class must be a class name" in line and len(line) < 400


def test_a_folder_named_as_an_image_says_so(exported: Path, images: Path) -> None:
    line = one_error_line(run_cli("predict", str(exported), str(images)))
    assert "is a folder, not an image file" in line and "does not exist" not in line


# -- 6, 7. decoders: every exception a refusal; colour keys composited --------------------------


def _formats() -> list[str]:
    from PIL import features

    names = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "PPM", "TGA", "ICO", "PCX", "SGI", "IM", "DDS", "SPIDER"]
    return names + (["WEBP"] if features.check("webp") else [])


def encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("L" if fmt == "SPIDER" else "RGB", (16, 16), 128)
    image.save(buffer, format=fmt if fmt != "SPIDER" else "SPIDER")
    return buffer.getvalue()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(_formats()), cut=st.integers(0, 4000), flips=st.lists(st.tuples(st.integers(0, 4000),
                                                                                              st.integers(1, 255)), max_size=6))
def test_damaged_files_of_every_format_are_refused_cleanly(fmt: str, cut: int, flips: list[tuple[int, int]]) -> None:
    data = bytearray(encoded(fmt))
    for position, value in flips:
        if data:
            data[position % len(data)] ^= value
    data = bytes(data[: max(1, len(data) - cut % max(1, len(data)))])
    try:
        out = decode_image(data, Fit(32), "upload")
    except VitDeployError as exc:
        assert str(exc).startswith("upload ")
    else:
        assert out.shape == (3, 32, 32) and out.dtype == np.uint8


def test_decoder_exceptions_of_any_type_are_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    from vitdeploy import images

    for error in (NotImplementedError("no DDS pixel format 42"), AttributeError("'NoneType' has no attribute 'read'"),
                  KeyError("tile"), IndexError("list index out of range")):
        def broken(_image: object, _size: int, error: Exception = error) -> Image.Image:
            raise error
        monkeypatch.setattr(images, "to_rgb", broken)
        with pytest.raises(VitDeployError, match=f"upload is not a readable image.*{type(error).__name__}"):
            decode_image(png(np.zeros((8, 8, 3), np.uint8)), Fit(8), "upload")


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_colour_key_is_transparent_over_white(mode: str) -> None:
    key = (10, 200, 30) if mode == "RGB" else 77
    image = Image.new(mode, (8, 8), key)
    image.putpixel((0, 0), (0, 0, 0) if mode == "RGB" else 0)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=key)
    assert "transparency" in Image.open(io.BytesIO(buffer.getvalue())).info
    out = decode_image(buffer.getvalue(), Fit(8))
    assert (out[:, 1:, :] == 255).all() and (out[:, 0, 1:] == 255).all() and (out[:, 0, 0] == 0).all()


# -- 10. numbers are range-checked before they size anything --------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--crop-padding", "100000"], "--crop-padding must not be negative nor above 1024 px"),
    (["--lr", "inf"], "--lr must be positive and at most 10"),
    (["--lr", "nan"], "--lr must be positive and at most 10"),
    (["--mixup", "--mixup-alpha", "inf"], "--mixup-alpha must be positive and at most 100"),
    (["--cutmix", "--cutmix-alpha", "nan"], "--cutmix-alpha must be positive and at most 100"),
    (["--weight-decay", "inf"], "--weight-decay must be in [0, 10]"),
    (["--batch-size", "100000000"], "--batch-size must be at least 1 and at most 65536"),
])
def test_training_numbers_out_of_range_are_one_line(cifar_root: Path, tmp_path: Path, args: list[str], message: str) -> None:
    start = time.perf_counter()
    line = one_error_line(run_cli("train", "--model", "vit_cifar_tiny", "--data-dir", str(cifar_root), "--out",
                                  str(tmp_path / "run"), "--device", "cpu", "--epochs", "1", *args))
    assert message in line and time.perf_counter() - start < 60
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_diverging_run_stops_with_one_line_and_keeps_its_last_good_checkpoint(cifar_root: Path, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from vitdeploy.train import TrainConfig, loop, run_training

    config = TrainConfig.from_options("vit_cifar_tiny", data_dir=str(cifar_root), out=str(tmp_path / "run"), epochs=2,
                                      batch_size=32, val_size=40, device="cpu")  # 160 training images: 5 steps an epoch
    real, calls = loop.evaluate, []

    def diverging(*args: object, **kwargs: object) -> dict[str, float]:
        calls.append(1)
        result = real(*args, **kwargs)
        return {**result, "loss": float("nan")} if len(calls) == 2 else result

    monkeypatch.setattr(loop, "evaluate", diverging)
    with pytest.raises(VitDeployError, match="the validation loss became nan at step 10.*last good checkpoint.*kept"):
        run_training(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == [1]  # the epoch before the divergence, checkpointed
    from vitdeploy.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 5


# -- 13. a signal during evaluation stops it within seconds ---------------------------------------


def test_sigterm_during_evaluation_stops_within_seconds_and_resumes_into_it(tmp_path: Path) -> None:
    data = write_cifar(tmp_path / "data", per_batch=40, test_size=16)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "vitdeploy", "train", "--model", "vit_b_32", "--no-pretrained", "--data-dir", str(data),
               "--out", str(out), "--device", "cpu", "--epochs", "1", "--batch-size", "8", "--max-steps", "1",
               "--val-size", "96", "--eval-batch-size", "4", "--test-size", "16"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        metrics = out / "metrics.jsonl"
        while time.time() < deadline and proc.poll() is None:  # the step record is written just before validation
            if metrics.is_file() and '"type": "step"' in metrics.read_text():
                break
            time.sleep(0.1)
        time.sleep(1.0)  # well inside the validation pass (96 images at 224 px: over ten seconds here)
        proc.send_signal(signal.SIGTERM)
        signalled = time.perf_counter()
        output, _ = proc.communicate(timeout=120)
        assert time.perf_counter() - signalled < 10, output
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 or proc.returncode == 128 + signal.SIGTERM, output
    assert "during evaluation" in output and "--resume" in output, output
    assert not (out / "summary.json").exists()
    resumed = run_cli("train", "--resume", str(out), timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_images"] == 96  # the abandoned validation, redone
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"type": "epoch"' in line]
    assert len(epochs) == 1


# -- 5, 9. INT8: exclusions checked first, counts read back, nothing left behind -------------------


def weighted_matmuls(path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(path))
    weights = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in weights]


def test_excluding_every_node_is_refused_before_any_parity_run(exported: Path, trained: Path, cifar_root: Path,
                                                                tmp_path: Path) -> None:
    every = weighted_matmuls(exported / "model.onnx")
    args = [a for name in every for a in ("--int8-exclude", name)]
    result = run_cli("export", str(trained), "--out", str(tmp_path / "art"), "--int8", "--data-dir", str(cifar_root),
                     "--calib-images", "16", "--max-batch", "16", *args)
    line = one_error_line(result)
    assert "leaves nothing to quantize" in line and "parity" not in result.stdout
    assert not (tmp_path / "art").exists() and not list(tmp_path.glob(".art.vitdeploy-staging-*"))


def test_the_manifest_counts_what_the_written_graphs_quantize(trained: Path, cifar_root: Path, tmp_path: Path) -> None:
    import onnx

    from vitdeploy.export import int8 as int8q
    from vitdeploy.manifest import read_manifest

    result = run_cli("export", str(trained), "--out", str(tmp_path / "art"), "--int8", "--data-dir", str(cifar_root),
                     "--calib-images", "16", "--max-batch", "16", "--parity-images", "16")
    assert result.returncode == 0, result.stderr
    for artifact in read_manifest(tmp_path / "art")["artifacts"]:
        if artifact["precision"] == "int8":
            graph = onnx.load(str(tmp_path / "art" / artifact["path"]))
            ops = [n.op_type for n in graph.graph.node]
            counted = int8q.quantized_count(tmp_path / "art" / artifact["path"])
            assert artifact["int8"]["quantized_nodes"] == counted > 0
            assert counted == ops.count("MatMulInteger") or counted <= ops.count("DequantizeLinear")


def test_sigterm_during_an_int8_export_leaves_no_debris(trained: Path, cifar_root: Path, tmp_path: Path) -> None:
    import tempfile

    scratch_before = set(Path(tempfile.gettempdir()).glob("ort.quant.*"))
    out = tmp_path / "art"
    proc = subprocess.Popen([sys.executable, "-m", "vitdeploy", "export", str(trained), "--out", str(out), "--int8",
                             "--data-dir", str(cifar_root), "--calib-images", "160", "--max-batch", "16",
                             "--parity-images", "16", "--calib-method", "entropy"],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "quantizing to INT8" in line:
                time.sleep(0.5)
                proc.send_signal(signal.SIGTERM)
                break
        output = "".join(lines) + proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "stopped by signal 15" in output and "Traceback" not in output, output
    assert not out.exists() and not list(tmp_path.glob(".art.vitdeploy-staging-*"))
    assert set(Path(tempfile.gettempdir()).glob("ort.quant.*")) <= scratch_before
