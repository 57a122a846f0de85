"""The command line as a user meets it: help, version, info, models, and every bad input
answered with one clear line and a non-zero exit, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import importable, run_cli, write_cifar
from vitdeploy.models import build_model, get_spec

TRAIN = ("train", "--model", "vit_cifar_tiny", "--device", "cpu", "--batch-size", "16", "--val-size", "40")


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_version_and_models() -> None:
    assert "train" in run_cli("--help").stdout
    assert run_cli("--version").stdout.strip().startswith("vitdeploy ")
    rows = json.loads(run_cli("models", "--json").stdout)
    tiny = next(r for r in rows if r["name"] == "vit_cifar_tiny")
    assert tiny["input_px"] == 32 and 2.6 < tiny["params_millions"] < 2.8 and tiny["gflops_per_image"] > 0
    assert tiny["default_recipe"] == "long" and tiny["recipes"]["short"]["epochs"] == 2 and tiny["recipes"]["long"]["ema"]
    assert "1 multiply-add = 2 FLOPs" in run_cli("models").stdout


def test_info_reports_backends_honestly() -> None:
    record = json.loads(run_cli("info", "--json").stdout)
    backends = {b["name"]: b for b in record["backends"]}
    assert set(backends) == {"pytorch", "ort-cpu", "ort-cuda", "ort-trt", "trt", "openvino"}
    assert backends["pytorch"]["usable"]
    openvino_installed = importable("openvino")
    assert backends["openvino"]["usable"] == openvino_installed, backends["openvino"]
    assert ("OpenVINO" in backends["openvino"]["reason"]) if openvino_installed else (
        "pip install openvino" in backends["openvino"]["reason"])
    if not torch.cuda.is_available():
        assert not backends["ort-cuda"]["usable"] and "CUDA" in backends["ort-cuda"]["reason"]
        assert not backends["trt"]["usable"]
    assert record["versions"]["torch"] == torch.__version__
    assert "vitdeploy[trt]" in run_cli("info").stdout or backends["trt"]["usable"]


def test_missing_data_folder(tmp_path: Path) -> None:
    result = run_cli(*TRAIN, "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "run"))
    assert_one_line_error(result, str(tmp_path / "none"), "--data-dir", "--download")
    assert not (tmp_path / "run").exists()


def test_corrupt_batch_file(tmp_path: Path) -> None:
    root = write_cifar(tmp_path / "data")
    (root / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"\x80\x02garbage")
    result = run_cli(*TRAIN, "--data-dir", str(root), "--out", str(tmp_path / "run"))
    assert_one_line_error(result, "data_batch_2", "corrupt")


def test_unknown_model(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("train", "--model", "vit_zz", "--out", str(tmp_path / "run")), "unknown model 'vit_zz'", "vit_b_16")


def test_missing_weights_file(cifar_root: Path, tmp_path: Path) -> None:
    result = run_cli(*TRAIN, "--data-dir", str(cifar_root), "--weights", str(tmp_path / "w.pth"), "--out", str(tmp_path / "run"))
    assert_one_line_error(result, "w.pth does not exist")


def test_weights_for_another_architecture(cifar_root: Path, tmp_path: Path) -> None:
    torch.save(build_model(get_spec("vit_cifar_small")).state_dict(), tmp_path / "small.pth")
    result = run_cli(*TRAIN, "--data-dir", str(cifar_root), "--weights", str(tmp_path / "small.pth"), "--out", str(tmp_path / "run"))
    assert_one_line_error(result, "does not fit vit_cifar_tiny")


@pytest.mark.parametrize("epochs", ["0", "-3"])
def test_epochs_must_be_positive(epochs: str, tmp_path: Path) -> None:
    assert_one_line_error(run_cli(*TRAIN, "--epochs", epochs, "--out", str(tmp_path / "run")), "--epochs must be at least 1")


def test_unwritable_output_folder(cifar_root: Path, tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    result = run_cli(*TRAIN, "--data-dir", str(cifar_root), "--out", str(tmp_path / "a_file" / "run"))
    assert_one_line_error(result, "cannot write to --out")


def test_output_folder_holding_another_run(cifar_root: Path, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_text("x")
    result = run_cli(*TRAIN, "--data-dir", str(cifar_root), "--out", str(tmp_path / "run"))
    assert_one_line_error(result, "already holds files", "--resume")


def test_resume_with_another_model_and_debug_traceback(cifar_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = run_cli(*TRAIN, "--data-dir", str(cifar_root), "--max-steps", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = run_cli("train", "--resume", str(out), "--model", "vit_cifar_small")
    assert_one_line_error(result, "--model vit_cifar_tiny, not vit_cifar_small")
    debug = run_cli("--debug", "train", "--resume", str(out), "--model", "vit_cifar_small")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_resume_from_a_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pt")
    assert_one_line_error(run_cli("train", "--resume", str(tmp_path / "x.pt")), "not a vitdeploy checkpoint")


def test_train_refuses_an_unknown_recipe_and_a_test_size_beyond_the_set(cifar_root: Path, tmp_path: Path) -> None:
    assert_one_line_error(run_cli(*TRAIN, "--recipe", "fast", "--out", str(tmp_path / "run")), "unknown recipe 'fast'", "auto, short or long")
    result = run_cli(*TRAIN, "--data-dir", str(cifar_root), "--test-size", "51", "--out", str(tmp_path / "run"))
    assert_one_line_error(result, "--test-size must be between 0 (no test pass) and 50")
    assert not (tmp_path / "run").exists()


def test_train_help_shows_the_config_defaults() -> None:
    """The CLI must not load torch to print its help, so `train`'s help states some defaults as text;
    each such number is TrainConfig's own default (checked here, so the two cannot drift)."""
    import dataclasses
    import typing

    from vitdeploy import cli
    from vitdeploy.train import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(cli.train, include_extras=True)
    checked = 0
    for name, hint in hints.items():
        info = next((m for m in getattr(hint, "__metadata__", ()) if hasattr(m, "show_default")), None)
        shown = getattr(info, "show_default", None)
        if isinstance(shown, str) and name in defaults:
            try:
                number = float(shown.replace(",", ""))
            except ValueError:
                continue  # a description ("the recipe's"), not a number
            assert number == defaults[name], (name, shown, defaults[name])
            checked += 1
    assert checked >= 10
