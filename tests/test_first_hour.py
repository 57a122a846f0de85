"""A new user's first hour (issue 20): help that shows defaults, output that is not cut when piped,
progress lines in logs, refusals that say what to do, the machine named in bench.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import needs_serve, run_cli
from tests.test_hardening import one_error_line


@pytest.mark.parametrize(("command", "option", "default"), [
    ("train", "--model", "vit_b_16"),
    ("export", "--data-dir", "the one the export used"),
    ("bench", "--precision", "pytorch fp32"),
])
def test_help_shows_the_defaults(command: str, option: str, default: str) -> None:
    result = run_cli(command, "--help", env={"COLUMNS": "250"})
    assert result.returncode == 0
    row = result.stdout.split(f" {option} ", 1)[1].split("\n│ --", 1)[0]  # the option's row, wrapped lines included
    assert "[default:" in row and default.split()[0] in row, row


def test_piped_output_is_not_cut_at_80_columns() -> None:
    result = run_cli("models")  # stdout is a pipe here
    assert result.returncode == 0
    assert "vit_cifar_tiny" in result.stdout and "vit_cifar_small" in result.stdout and "…" not in result.stdout


def test_training_prints_progress_lines_when_not_on_a_terminal(cifar_root: Path, tmp_path: Path) -> None:
    result = run_cli("train", "--model", "vit_cifar_tiny", "--data-dir", str(cifar_root), "--out", str(tmp_path / "run"),
                     "--device", "cpu", "--epochs", "1", "--batch-size", "8", "--max-steps", "6", "--log-every", "2",
                     "--val-size", "40", "--test-size", "10", env={"VITDEPLOY_PROGRESS_LINE_S": "0"})
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/6", "4/6", "6/6"], result.stdout
    assert all("img/s" in line and "training left" in line for line in lines)


def test_config_records_an_absolute_data_dir(trained: Path) -> None:
    assert Path(json.loads((trained / "config.json").read_text())["data_dir"]).is_absolute()


def test_device_mode_on_a_cpu_is_refused_before_any_work(exported: Path, tmp_path: Path) -> None:
    line = one_error_line(run_cli("bench", str(exported), "--backend", "ort-cpu", "--mode", "device", "--out",
                                  str(tmp_path / "b")))
    assert "--mode device" in line and "--mode end-to-end" in line
    assert not (tmp_path / "b" / "bench.json").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--precision", "bf16"], "bf16 runs only on --backend pytorch"),
    (["--backend", "pytorch", "--precision", "int8"], "the pytorch backend has no INT8 path"),
])
def test_predict_refusals_say_what_to_do(exported: Path, tmp_path: Path, args: list[str], message: str) -> None:
    from PIL import Image

    Image.new("RGB", (32, 32), (90, 20, 200)).save(tmp_path / "x.png")
    line = one_error_line(run_cli("predict", str(exported), str(tmp_path / "x.png"), *args))
    assert message in line and not line.endswith("with")


def test_bench_all_covers_every_exported_precision_and_names_the_cpu(exported: Path, tmp_path: Path) -> None:
    result = run_cli("bench", str(exported), "--backend", "all", "--limit", "8", "--batch-sizes", "1", "--min-iters", "2",
                     "--max-seconds", "0.2", "--mode", "end-to-end", "--out", str(tmp_path / "b"),
                     env={"VITDEPLOY_PROGRESS_LINE_S": "0"})
    assert result.returncode == 0, result.stderr
    assert "ort-cpu fp16 parity: 7/8 images" in result.stdout and "left" in result.stdout  # progress of the passes
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert {(r["backend"], r["precision"]) for r in report["records"]} >= {("ort-cpu", "fp32"), ("ort-cpu", "fp16")}
    cpu = report["environment"]["cpu"]
    assert cpu["name"] not in ("x86_64", "") and isinstance(cpu["flags"], list)


def test_export_writes_beside_the_run_without_out_and_predict_says_what_ran(trained: Path, cifar_root: Path,
                                                                           tmp_path: Path) -> None:
    import shutil

    from PIL import Image

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    result = run_cli("export", str(run), "--data-dir", str(cifar_root), "--parity-images", "8", "--max-batch", "8")
    assert result.returncode == 0, result.stderr
    assert (run / "export" / "manifest.json").is_file() and f"writing the export to {run / 'export'}" in result.stdout
    Image.new("RGB", (32, 32), (90, 20, 200)).save(tmp_path / "x.png")
    shown = run_cli("predict", str(run / "export"), str(tmp_path / "x.png"))
    assert shown.returncode == 0 and "ort-cpu fp32 (model.onnx): 1 image(s) in" in shown.stdout, shown.stdout
    record = json.loads(run_cli("predict", str(run / "export"), str(tmp_path / "x.png"), "--json").stdout)[0]
    assert (record["backend"], record["precision"], record["model_file"]) == ("ort-cpu", "fp32", "model.onnx")
    assert record["inference_ms_all_images"] > 0


@needs_serve
def test_loadtest_sweeps_concurrency_against_a_real_server(exported: Path, cifar_root: Path, tmp_path: Path) -> None:
    from tests.test_serve import Server

    server = Server(exported, "--max-batch", "8")
    try:
        result = run_cli("loadtest", server.url, "--data-dir", str(cifar_root), "--limit", "20", "--concurrency", "1,4",
                         "--requests", "40", "--out", str(tmp_path / "lt"))
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        server.stop()
    report = json.loads((tmp_path / "lt" / "loadtest.json").read_text())
    assert [level["concurrency"] for level in report["levels"]] == [1, 4]
    assert all(level["ok"] == 40 and level["requests_per_s"] > 0 and level["latency_ms_p50"] > 0 for level in report["levels"])
    assert (tmp_path / "lt" / "loadtest.png").read_bytes()[:4] == b"\x89PNG"
    assert report["server"]["model"] == "vit_cifar_tiny"


def test_loadtest_without_a_server_is_one_line(cifar_root: Path, tmp_path: Path) -> None:
    from tests.conftest import free_port

    line = one_error_line(run_cli("loadtest", f"http://127.0.0.1:{free_port()}", "--data-dir", str(cifar_root),
                                  "--out", str(tmp_path / "lt")))
    assert "no vitdeploy server answers" in line and "vitdeploy serve" in line


def test_debug_works_after_the_command_name(exported: Path, tmp_path: Path) -> None:
    result = run_cli("predict", str(exported), str(tmp_path / "missing.png"), "--debug")
    assert result.returncode == 1 and "Traceback" in result.stderr and "error: image" in result.stderr


def test_help_names_choices_and_hides_bool_metavars() -> None:
    result = run_cli("explain", "--help", env={"COLUMNS": "250"})
    assert "[rollout|grad-rollout]" in result.stdout and "[mean|max]" in result.stdout
    rows = run_cli("export", "--help", env={"COLUMNS": "250"}).stdout.splitlines()
    assert not [row for row in rows if "<bool>" in row and "Show this message" not in row]  # typer's own --help aside


def test_an_explained_class_that_is_not_the_top1_names_the_top1(trained: Path, cifar_root: Path, tmp_path: Path) -> None:
    from PIL import Image

    from vitdeploy.data import load_test

    Image.fromarray(load_test(cifar_root).images[0].numpy().transpose(1, 2, 0)).save(tmp_path / "x.png")
    plain = run_cli("explain", str(trained), str(tmp_path / "x.png"), "--out", str(tmp_path / "a"))
    assert plain.returncode == 0 and "top-1:" not in plain.stdout
    top1 = json.loads((tmp_path / "a" / "x.json").read_text())["predictions"][0]["class_index"]
    other = (top1 + 1) % 10
    result = run_cli("explain", str(trained), str(tmp_path / "x.png"), "--out", str(tmp_path / "b"), "--class", str(other))
    assert result.returncode == 0 and "(top-1: " in result.stdout, result.stdout


def test_calibration_and_explain_say_where_they_are(trained: Path, cifar_root: Path, tmp_path: Path) -> None:
    from PIL import Image

    quick = {"VITDEPLOY_PROGRESS_LINE_S": "0"}
    result = run_cli("export", str(trained), "--out", str(tmp_path / "art"), "--int8", "--calib-images", "64",
                     "--data-dir", str(cifar_root), "--parity-images", "8", "--max-batch", "8", env=quick)
    assert result.returncode == 0, result.stderr
    assert "calibration: 1/2 batches collected" in result.stdout, result.stdout  # 64 images in batches of 32
    Image.new("RGB", (32, 32), (10, 200, 90)).save(tmp_path / "x.png")
    result = run_cli("explain", str(trained), *[str(tmp_path / "x.png")] * 10, "--out", str(tmp_path / "maps"), env=quick)
    assert result.returncode == 0 and "explained 8/10 images" in result.stdout, result.stdout
