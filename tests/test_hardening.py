"""Hostile artifacts, slow clients, real-world images and unlucky users (issue 10): each
test reproduces one failure as it was found and checks the right answer."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import REPO, free_port, needs_serve, run_cli, serve_client
from vitdeploy.cli import main as cli_main
from vitdeploy.data import load_test
from vitdeploy.errors import VitDeployError
from vitdeploy.images import Fit, decode_image
from vitdeploy.manifest import MANIFEST, read_manifest


def png(array_hwc: np.ndarray, **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array_hwc).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The CLI failed with exit 1 and exactly one `error:` line, no traceback."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def in_process_cli(capsys: pytest.CaptureFixture, *args: str) -> str:
    """Run the CLI in this process (so that a test can mock a write) and return its one error line."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(list(args))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def art(exported: Path, tmp_path: Path) -> Path:
    """A private copy of the exported artifact folder, free to damage."""
    copy = tmp_path / "art"
    shutil.copytree(exported, copy)
    return copy


def edit_manifest(folder: Path, change) -> None:  # noqa: ANN001 - a function of the manifest dict
    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


# -- 1. export --force never destroys the previous export ------------------------------------


def test_killed_export_force_leaves_the_previous_export_usable(art: Path, trained: Path, cifar_root: Path) -> None:
    (art / "notes.txt").write_text("mine")
    before = read_manifest(art)
    command = [sys.executable, "-m", "vitdeploy", "export", str(trained), "--out", str(art), "--force", "--fp16",
               "--max-batch", "16", "--data-dir", str(cifar_root)]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(art.parent.glob(".art.vitdeploy-staging-*/model.onnx")) and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the export ended before it could be interrupted"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert read_manifest(art) == before  # every file still verifies against the old manifest
    image = art.parent / "cat.png"
    image.write_bytes(png(load_test(cifar_root).images[3].numpy().transpose(1, 2, 0)))
    result = run_cli("predict", str(art), str(image))
    assert result.returncode == 0 and "cat.png:" in result.stdout, result.stderr
    assert list(art.parent.glob(".art.vitdeploy-staging-*")), "the killed export's staging folder is left to clean"

    result = run_cli(*command[3:])
    assert result.returncode == 0, result.stderr
    assert not list(art.parent.glob(".art.vitdeploy-staging-*")), "the next export cleans what the killed one left"
    assert read_manifest(art)["created"] >= before["created"] and (art / "notes.txt").read_text() == "mine"


def test_failed_export_force_keeps_the_previous_export(art: Path, trained: Path, cifar_root: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from vitdeploy.export import artifacts

    before = read_manifest(art)

    def fail(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "model.onnx")

    monkeypatch.setattr(artifacts.onnx_export, "export_onnx", fail)
    with pytest.raises(OSError):
        artifacts.export_artifacts(artifacts.ExportOptions(source=trained, out=art, force=True, max_batch=16, data_dir=cifar_root),
                                   say=lambda _line: None)
    assert read_manifest(art) == before


# -- 3, 4, 9. manifests stay inside their folder and are validated -----------------------------


@pytest.mark.parametrize("path", ["../other/model.onnx", "/etc/passwd", "/etc/shadow", "sub/../../x", "", "a\\..\\b"])
def test_manifest_paths_outside_the_folder_are_refused_alike(art: Path, path: str) -> None:
    (art.parent / "other").mkdir(exist_ok=True)
    shutil.copy(art / "model.onnx", art.parent / "other" / "model.onnx")
    edit_manifest(art, lambda m: m["artifacts"][0].update(path=path))
    with pytest.raises(VitDeployError) as refusal:
        read_manifest(art)
    message = str(refusal.value).replace(repr(path), "PATH")
    assert "outside its artifact folder" in message
    assert message == "the manifest names a model file outside its artifact folder (PATH); refused: an artifact folder may only refer to its own files"


def test_a_symlinked_model_file_is_refused(art: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(art / "model.onnx", outside)
    (art / "model.onnx").symlink_to(outside)
    with pytest.raises(VitDeployError, match="outside its artifact folder"):
        read_manifest(art)
    result = run_cli("predict", str(art), "x.png")
    assert "outside its artifact folder" in one_error_line(result)


def test_v1_model_never_shows_a_path_outside(art: Path) -> None:
    with serve_client(artifacts=art, max_batch=8) as client:
        shown = [a["path"] for a in client.get("/v1/model").json()["artifacts"]]
    assert shown and all("/" not in p for p in shown)


def test_huge_manifest_numbers_are_refused_before_allocating(art: Path) -> None:
    edit_manifest(art, lambda m: m["preprocessing"].update(source_size=100_000))
    start = time.perf_counter()
    result = run_cli("predict", str(art), str(REPO / "README.md"))
    assert "source_size = 100000 is outside 2..1024" in one_error_line(result)
    assert time.perf_counter() - start < 60


@pytest.mark.parametrize("content", [
    b"\x89PNG\x00\xff\xfe binary",
    b"[1, 2, 3]",
    b"[" * 100_000 + b"]" * 100_000,
    json.dumps({"format": "vitdeploy-manifest", "format_version": 1}).encode(),
], ids=["binary", "list", "nested", "missing-keys"])
def test_broken_manifests_are_one_line(art: Path, content: bytes) -> None:
    (art / MANIFEST).write_bytes(content)
    line = one_error_line(run_cli("predict", str(art), "x.png"))
    assert "manifest.json" in line and "re-run `vitdeploy export`" in line


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.lists(st.sampled_from(["model", "preprocessing", "input", "batch", "artifacts", 0, "path", "size_bytes",
                                      "sha256", "min", "max", "opt", "class_names", "source_size", "external_data",
                                      "shape", "kind", "precision", "num_classes", "mean"]), min_size=1, max_size=3),
       value=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                          max_leaves=8))
def test_fuzzed_manifests_load_or_give_one_clear_error(exported: Path, tmp_path_factory: pytest.TempPathFactory,
                                                       path: list, value: object) -> None:
    folder = tmp_path_factory.mktemp("fuzz")
    for name in ("model.onnx",):
        (folder / name).symlink_to(exported / name)  # inside links are fine: resolved, they leave the folder
    manifest = json.loads((exported / MANIFEST).read_text())
    node = manifest
    for key in path[:-1]:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
    last = path[-1]
    if isinstance(node, dict) and isinstance(last, str):
        node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = value
    (folder / MANIFEST).write_text(json.dumps(manifest))
    try:
        read_manifest(folder, verify=False)
    except VitDeployError as exc:
        assert "\n" not in str(exc)


# -- 5, 6. real-world images: 16-bit, EXIF orientation, modes --------------------------------


@pytest.fixture(scope="module")
def picture(cifar_root: Path) -> np.ndarray:
    """A real test image enlarged to 64x48 RGB (HWC), so that orientation matters."""
    image = load_test(cifar_root).images[3].numpy().transpose(1, 2, 0)
    return np.asarray(Image.fromarray(image).resize((64, 48), Image.Resampling.BICUBIC))


def test_16_bit_grayscale_png_is_scaled_not_whitened(picture: np.ndarray) -> None:
    gray8 = np.asarray(Image.fromarray(picture).convert("L"))
    gray16 = gray8.astype(np.uint16) * 257
    assert Image.open(io.BytesIO(png(gray16))).mode.startswith("I")
    from_16 = decode_image(png(gray16), Fit(32))
    from_8 = decode_image(png(gray8), Fit(32))
    assert np.array_equal(from_16, from_8) and from_16.max() < 255


def test_exif_orientation_is_applied(picture: np.ndarray) -> None:
    upright = Image.fromarray(picture)
    stored = upright.rotate(90, expand=True)  # a phone stores the sensor's view; orientation 6 says "turn 90 degrees clockwise"
    exif = Image.Exif()
    exif[0x0112] = 6

    def jpeg(image: Image.Image, **save: object) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95, **save)
        return buffer.getvalue()

    displayed = decode_image(jpeg(upright), Fit(32)).astype(int)
    rotated = decode_image(jpeg(stored, exif=exif), Fit(32)).astype(int)
    as_stored = decode_image(jpeg(stored), Fit(32)).astype(int)
    assert np.abs(rotated - displayed).mean() < 3 < np.abs(as_stored - displayed).mean()
    lossless = decode_image(png(np.asarray(stored), exif=exif), Fit(32))  # PNG carries EXIF too: exact
    assert np.array_equal(lossless, decode_image(png(picture), Fit(32)))


def test_transparency_is_shown_over_white_and_other_modes_decode() -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent black
    assert decode_image(png(rgba), Fit(8)).min() == 255
    for mode in ("1", "L", "P", "CMYK", "F", "I", "LA"):
        buffer = io.BytesIO()
        Image.new(mode, (8, 8)).save(buffer, format="TIFF")
        out = decode_image(buffer.getvalue(), Fit(8))
        assert out.shape == (3, 8, 8) and out.dtype == np.uint8


def test_undecodable_bytes_do_not_show_internals() -> None:
    with pytest.raises(VitDeployError) as refusal:
        decode_image(b"not an image at all", Fit(32))
    assert "BytesIO" not in str(refusal.value) and "0x" not in str(refusal.value)


def test_16_bit_and_exif_pictures_get_the_8_bit_upright_predictions(exported: Path, picture: np.ndarray) -> None:
    gray8 = np.asarray(Image.fromarray(picture).convert("L"))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = np.asarray(Image.fromarray(picture).rotate(90, expand=True))
    with serve_client(artifacts=exported, max_batch=8) as client:
        def top(body: bytes) -> list:
            response = client.post("/v1/predict", content=body, params={"top_k": "10"})
            assert response.status_code == 200, response.text
            return response.json()["predictions"]

        assert top(png(gray8.astype(np.uint16) * 257)) == top(png(gray8))
        assert top(png(stored, exif=exif)) == top(png(picture))


# -- 2, 7, 8, 11. the server ------------------------------------------------------------------


def test_cors_preflight_works_with_an_api_key(exported: Path) -> None:
    with serve_client(artifacts=exported, max_batch=8, api_key="secret-key-1", cors_origins=("https://app.example",)) as client:
        preflight = client.options("/v1/predict", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        refused = client.post("/v1/predict", content=b"x", headers={"Origin": "https://app.example"})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "https://app.example"


def test_non_ascii_api_key_matches(exported: Path, picture: np.ndarray) -> None:
    key = "schlüssel-ünïcode"
    with serve_client(artifacts=exported, max_batch=8, api_key=key) as client:
        ok = client.post("/v1/predict", content=png(picture), headers={"X-API-Key": key.encode("utf-8")})
        assert ok.status_code == 200, ok.text
        bearer = client.post("/v1/predict", content=png(picture), headers={"Authorization": b"Bearer " + key.encode("utf-8")})
        assert bearer.status_code == 200
    # what arrives on the wire is compared byte for byte (the test client re-encodes headers, so ASGI scopes here)
    from starlette.requests import (
        Request,  # present: serve_client above skips without the serve extra
    )

    from vitdeploy.serve.app import _authorized

    def sent(value: bytes) -> Request:
        return Request({"type": "http", "headers": [(b"x-api-key", value)]})

    assert _authorized(sent(key.encode("utf-8")), key)
    assert not _authorized(sent(key.encode("latin-1")), key) and not _authorized(sent(b""), key)


@pytest.mark.parametrize("raw", ["²", "١", "+3", " 3", "3 ", "0x3", "3.0", "99999999999999999999"])
def test_top_k_takes_ascii_digits_only(client_app: Any, picture: np.ndarray, raw: str) -> None:
    response = client_app.post("/v1/predict", content=png(picture), params={"top_k": raw})
    assert response.status_code == 400 and "top_k must be an integer" in response.json()["error"]


@pytest.fixture(scope="module")
def client_app(exported: Path) -> Any:
    with serve_client(artifacts=exported, max_batch=8) as client:
        yield client


def test_head_health_and_error_bodies(client_app: Any) -> None:
    assert client_app.head("/healthz").status_code == 200
    assert client_app.head("/readyz").status_code == 200
    missing = client_app.get("/no/such/page")
    assert missing.status_code == 404 and set(missing.json()) == {"error"}
    wrong = client_app.get("/v1/predict")
    assert wrong.status_code == 405 and set(wrong.json()) == {"error"}


def test_500s_are_counted(exported: Path, picture: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    with serve_client(artifacts=exported, max_batch=8) as client:
        from vitdeploy.serve import service  # importable: serve_client skips without the serve extra

        monkeypatch.setattr(service.predictions, "top_k", lambda *_a: 1 / 0)
        assert client.post("/v1/predict", content=png(picture)).status_code == 500
        metrics = client.get("/metrics").text
    assert 'vitdeploy_requests_total{endpoint="/v1/predict",status="500"} 1.0' in metrics


def _recv_all(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except (TimeoutError, socket.timeout, ConnectionResetError):
        pass
    return data


@needs_serve
def test_stalled_uploads_do_not_stop_predictions_and_are_closed(exported: Path, picture: np.ndarray) -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "vitdeploy", "serve", str(exported), "--port", str(port), "--max-batch", "8",
         "--max-queue", "32", "--read-timeout-s", "3", "--log-level", "warning"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stalled: list[socket.socket] = []
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        opened = time.perf_counter()
        for i in range(32):
            sock = socket.create_connection(("127.0.0.1", port))
            if i % 4 == 3:  # a few stall inside the headers
                sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Ty")
            else:
                sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                             b"Content-Length: 100000\r\n\r\n" + b"\x89PNG" + b"\x00" * 96)
            stalled.append(sock)
        time.sleep(0.5)
        response = httpx.post(f"{base}/v1/predict", content=png(picture), timeout=30)
        assert response.status_code == 200, response.text  # while all 32 are stalled
        answers = [_recv_all(sock, 10) for sock in stalled]
        waited = time.perf_counter() - opened
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[:2]
        assert waited < 3 + 6  # closed at the deadline, not at the client's pleasure
        assert httpx.post(f"{base}/v1/predict", content=png(picture), timeout=30).status_code == 200
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        for sock in stalled:
            sock.close()
        if server.poll() is None:
            server.kill()
            server.wait()


# -- 9. one error line where tracebacks were -------------------------------------------------


@pytest.fixture(scope="module")
def foreign_checkpoint(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint that says vit_cifar_tiny but holds another model's weights."""
    from vitdeploy.models import build_model, get_spec

    checkpoint = torch.load(trained / "last.pt", weights_only=True)
    checkpoint["model"] = build_model(get_spec("vit_cifar_small"), 10).state_dict()
    folder = tmp_path_factory.mktemp("foreign") / "run"
    folder.mkdir()
    torch.save(checkpoint, folder / "last.pt")
    shutil.copy(trained / "config.json", folder / "config.json")
    return folder / "last.pt"


def test_foreign_weights_are_one_line_everywhere(foreign_checkpoint: Path, cifar_root: Path, tmp_path: Path) -> None:
    expected = "says it holds vit_cifar_tiny, but its weights do not fit"
    assert expected in one_error_line(run_cli("export", str(foreign_checkpoint), "--out", str(tmp_path / "a"),
                                              "--data-dir", str(cifar_root)))
    assert not (tmp_path / "a").exists()
    assert expected in one_error_line(run_cli("train", "--resume", str(foreign_checkpoint), "--out", str(tmp_path / "r"),
                                              "--data-dir", str(cifar_root), "--device", "cpu"))


@needs_serve
def test_foreign_weights_are_one_line_in_serve(foreign_checkpoint: Path) -> None:
    expected = "says it holds vit_cifar_tiny, but its weights do not fit"
    assert expected in one_error_line(run_cli("serve", str(foreign_checkpoint), "--backend", "pytorch",
                                              "--port", str(free_port())))


def test_bench_and_triton_outputs_are_checked_first(exported: Path, trained: Path, cifar_root: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    start = time.perf_counter()
    assert "--out" in one_error_line(run_cli("bench", str(exported), "--out", str(a_file), "--backend", "ort-cpu"))
    assert time.perf_counter() - start < 60
    line = one_error_line(run_cli("export", str(trained), "--out", str(tmp_path / "art"), "--triton", str(a_file),
                                  "--data-dir", str(cifar_root)))
    assert "--triton" in line and "is a file" in line
    assert not (tmp_path / "art").exists()


def test_unwritable_export_folder_is_one_line(art: Path, trained: Path, cifar_root: Path, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    before = read_manifest(art)
    real_access = os.access  # root ignores permission bits: a read-only folder is simulated
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == art and mode & os.W_OK else real_access(path, mode))
    line = in_process_cli(capsys, "export", str(trained), "--out", str(art), "--force", "--data-dir", str(cifar_root))
    assert "not a writable folder" in line or "not writable" in line
    assert read_manifest(art) == before


def test_full_disk_during_export_and_training_is_one_line(trained: Path, cifar_root: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from vitdeploy.export import onnx_export
    from vitdeploy.train import loop

    def full(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "somewhere")

    monkeypatch.setattr(onnx_export, "export_onnx", full)
    line = in_process_cli(capsys, "export", str(trained), "--out", str(tmp_path / "art"), "--data-dir", str(cifar_root))
    assert "No space left on device" in line and "free some space" in line
    monkeypatch.setattr(loop, "atomic_save", full)
    line = in_process_cli(capsys, "train", "--model", "vit_cifar_tiny", "--data-dir", str(cifar_root), "--out",
                          str(tmp_path / "run"), "--epochs", "1", "--batch-size", "16", "--val-size", "40", "--device", "cpu")
    assert "No space left on device" in line


@needs_serve
def test_serve_load_failure_is_one_line(art: Path) -> None:
    damaged = b"this is not an onnx model"
    (art / "model.onnx").write_bytes(damaged)
    edit_manifest(art, lambda m: m["artifacts"][0].update(size_bytes=len(damaged), sha256=hashlib.sha256(damaged).hexdigest()))
    line = one_error_line(run_cli("serve", str(art), "--port", str(free_port()), "--max-batch", "8"))
    assert "could not load model.onnx" in line


# -- 10, 11. training folders after kills ----------------------------------------------------


def unfinished(folder: Path, cifar_root: Path) -> Path:
    """A run folder as left by a run killed before its first checkpoint."""
    from vitdeploy.train import TrainConfig

    folder.mkdir(parents=True)
    config = TrainConfig.from_options("vit_cifar_tiny", data_dir=str(cifar_root), out=str(folder), epochs=1, batch_size=16,
                                      val_size=40, device="cpu", max_steps=2)
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    (folder / "metrics.jsonl").write_text('{"type": "step", "step": 1, "loss": 2.3}\n{"type": "st')
    (folder / ".last.pt.k3j4h5.tmp").write_bytes(b"")
    return folder


def test_a_run_killed_before_its_first_checkpoint_can_be_resumed_or_reused(cifar_root: Path, tmp_path: Path) -> None:
    folder = unfinished(tmp_path / "a", cifar_root)
    result = run_cli("train", "--resume", str(folder))
    assert result.returncode == 0, result.stderr
    assert "stopped before its first checkpoint" in result.stdout
    assert (folder / "last.pt").is_file() and (folder / "summary.json").is_file()
    assert not list(folder.glob(".*.tmp"))
    assert all(json.loads(line)["type"] for line in (folder / "metrics.jsonl").read_text().splitlines())

    folder = unfinished(tmp_path / "b", cifar_root)
    result = run_cli("train", "--model", "vit_cifar_tiny", "--out", str(folder), "--data-dir", str(cifar_root), "--epochs", "1",
                     "--batch-size", "16", "--val-size", "40", "--max-steps", "2", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "starting it over" in result.stdout and (folder / "last.pt").is_file()
    (folder / "mine.txt").write_text("x")  # a folder with a checkpoint (or other files) is still refused
    assert "already holds files" in one_error_line(run_cli("train", "--model", "vit_cifar_tiny", "--out", str(folder),
                                                            "--data-dir", str(cifar_root), "--device", "cpu"))


def test_best_checkpoint_agrees_with_the_summary_after_resuming_an_older_checkpoint(cifar_root: Path, tmp_path: Path) -> None:
    from vitdeploy.checkpoint import load_checkpoint
    from vitdeploy.train import TrainConfig, run_training

    out = tmp_path / "run"
    config = TrainConfig.from_options("vit_cifar_tiny", data_dir=str(cifar_root), out=str(out), epochs=3, batch_size=16,
                                      val_size=40, device="cpu", keep_checkpoints=0, lr=3e-3)
    run_training(config)
    first = out / "checkpoints" / "epoch-0001.pt"
    # resumed from epoch 1 into the same folder, with best.pt left from the abandoned epochs 2-3
    resumed = run_training(config.resumed({"max_steps": 2 * 10 - 5}), resume=load_checkpoint(first), resume_dir=out)
    best = load_checkpoint(out / "best.pt")
    assert best["progress"]["best_epoch"] == resumed.summary["best_epoch"]
    assert best["step"] == best["progress"]["best_step"]
    # and into a new folder, which has no best.pt at all
    other = tmp_path / "other"
    resumed = run_training(config.resumed({"out": str(other)}), resume=load_checkpoint(first), resume_dir=out)
    best = load_checkpoint(other / "best.pt")
    assert best["progress"]["best_epoch"] == resumed.summary["best_epoch"]
