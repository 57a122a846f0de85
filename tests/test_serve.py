"""`vitdeploy serve`: handlers in-process (ASGI test client), and the real server over
loopback HTTP (uvicorn started by the test): answers equal the offline backend's, batching
happens, overload gives 503 and recovers, bad input gets a 4xx JSON error, SIGTERM drains."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'vitdeploy[serve]'")

import httpx
import numpy as np
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import REPO, free_port
from vitdeploy.backends.base import run_batches
from vitdeploy.backends.ort import OrtBackend
from vitdeploy.data import load_test
from vitdeploy.errors import VitDeployError
from vitdeploy.serve.app import create_app
from vitdeploy.serve.config import ServeConfig


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def images(cifar_root: Path) -> np.ndarray:
    return load_test(cifar_root).images[:24].numpy()


@pytest.fixture(scope="module")
def offline(exported: Path, images: np.ndarray) -> np.ndarray:
    """Probabilities of the same images through ort-cpu directly, as bench computes them."""
    with OrtBackend(exported / "model.onnx") as backend:
        return softmax(run_batches(backend, images, 16))


@pytest.fixture(scope="module")
def client(exported: Path) -> TestClient:
    app = create_app(ServeConfig(artifacts=exported, max_batch=8, max_wait_ms=2, max_body_bytes=256 * 1024))
    with TestClient(app) as c:
        yield c


def probabilities(predictions: list[dict]) -> np.ndarray:
    out = np.zeros(10)
    for p in predictions:
        out[p["class_index"]] = p["probability"]
    return out


def test_predict_equals_the_offline_backend(client: TestClient, images: np.ndarray, offline: np.ndarray) -> None:
    for i in range(6):
        body = png(images[i])
        raw = client.post("/v1/predict?top_k=10", content=body, headers={"content-type": "image/png"})
        multipart = client.post("/v1/predict?top_k=10", files={"file": ("x.png", body, "image/png")})
        for response in (raw, multipart):
            assert response.status_code == 200, response.text
            predictions = response.json()["predictions"]
            assert [p["label"] for p in predictions][0] == predictions[0]["label"] and len(predictions) == 10
            np.testing.assert_allclose(probabilities(predictions), offline[i], atol=1e-5)
    top3 = client.post("/v1/predict?top_k=3", content=png(images[0])).json()["predictions"]
    assert len(top3) == 3 and top3[0]["probability"] >= top3[1]["probability"] >= top3[2]["probability"]
    assert set(top3[0]) == {"label", "class_index", "probability"}


def test_batch_endpoint_answers_in_order(client: TestClient, images: np.ndarray, offline: np.ndarray) -> None:
    files = [("files", (f"{i}.png", png(images[i]), "image/png")) for i in range(5)]
    response = client.post("/v1/predict/batch?top_k=10", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == [f"{i}.png" for i in range(5)]
    for i, r in enumerate(results):
        np.testing.assert_allclose(probabilities(r["predictions"]), offline[i], atol=1e-5)


def test_larger_images_are_resized_like_predict(client: TestClient) -> None:
    big = Image.new("RGB", (300, 200), (200, 30, 30))
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG")
    assert client.post("/v1/predict", content=buffer.getvalue(), headers={"content-type": "image/jpeg"}).status_code == 200


def test_health_model_metrics_and_page(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").json() == {"ready": True}
    model = client.get("/v1/model").json()
    assert model["model"] == "vit_cifar_tiny" and model["serving"]["max_batch"] == 8
    assert model["backend"]["name"] == "ort-cpu"
    metrics = client.get("/metrics").text
    for name in ("vitdeploy_requests_total", "vitdeploy_request_latency_seconds_bucket", "vitdeploy_batch_size_bucket",
                 "vitdeploy_queue_depth"):
        assert name in metrics
    page = client.get("/")
    assert page.status_code == 200 and "<form" in page.text and "/v1/predict" in page.text


def bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buffer, format="PNG")  # tiny file, 400 M pixels
    return buffer.getvalue()


@pytest.mark.parametrize(("kwargs", "status", "message"), [
    ({"content": b""}, 400, "empty"),
    ({"content": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00"}, 400, "not a readable image"),
    ({"content": b"hello, I am text"}, 400, "not a readable image"),
    ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported content type"),
    ({"content": "1x1"}, 400, "at least 2x2"),
    ({"content": "bomb"}, 400, "more than the 40,000,000 pixels allowed"),
    ({"content": b"\x00" * (300 * 1024)}, 413, "larger than"),
    ({"content": "ok", "params": {"top_k": "0"}}, 400, "top_k must be an integer from 1 to 10"),
    ({"content": "ok", "params": {"top_k": "11"}}, 400, "top_k"),
    ({"content": "ok", "params": {"top_k": "five"}}, 400, "top_k"),
    ({"content": b"--xyz\r\ngarbage", "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 400, "multipart"),
    ({"data": {"note": "no file"}, "files": {"other": ("a.txt", b"a", "text/plain")}}, 400, "no file part named 'file'"),
])
def test_bad_input_is_a_4xx_json_error_and_the_server_goes_on(client: TestClient, images: np.ndarray, kwargs: dict,
                                                             status: int, message: str) -> None:
    special = {"1x1": png(np.zeros((3, 1, 1), np.uint8)), "bomb": bomb(), "ok": png(images[0])}
    if isinstance(kwargs.get("content"), str):
        kwargs = {**kwargs, "content": special[kwargs["content"]]}
    response = client.post("/v1/predict", **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"] and "Traceback" not in response.text
    assert client.post("/v1/predict", content=png(images[1])).status_code == 200


def test_batch_endpoint_refuses_raw_bodies_and_a_bad_image_alone(client: TestClient, images: np.ndarray) -> None:
    assert client.post("/v1/predict/batch", content=png(images[0])).status_code == 415
    files = [("files", ("good.png", png(images[0]), "image/png")), ("files", ("bad.png", b"junk", "image/png"))]
    response = client.post("/v1/predict/batch", files=files)
    assert response.status_code == 400 and "bad.png is not a readable image" in response.json()["error"]


def test_api_key(exported: Path, images: np.ndarray) -> None:
    app = create_app(ServeConfig(artifacts=exported, max_batch=4, api_key="s3cret-key"))
    with TestClient(app) as c:
        body = png(images[0])
        assert c.post("/v1/predict", content=body).status_code == 401
        assert c.post("/v1/predict", content=body, headers={"Authorization": "Bearer wrong-key"}).status_code == 401
        assert c.get("/metrics").status_code == 401 and c.get("/v1/model").status_code == 401
        assert c.post("/v1/predict", content=body, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        assert c.post("/v1/predict", content=body, headers={"X-API-Key": "s3cret-key"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_settings_are_checked_against_the_manifest(exported: Path) -> None:
    with pytest.raises(VitDeployError, match="--max-batch 64 is outside the exported batch range 1..16"):
        create_app(ServeConfig(artifacts=exported, max_batch=64))
    with pytest.raises(VitDeployError, match="--max-queue must be at least --max-batch"):
        create_app(ServeConfig(artifacts=exported, max_batch=8, max_queue=4))


# -- the real server over loopback -------------------------------------------------------------


class Server:
    """`python -m vitdeploy serve` in a subprocess, ready when /readyz says so."""

    def __init__(self, artifacts: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vitdeploy", "serve", str(artifacts), "--port", str(self.port), "--log-level", "warning", *args],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stdout.read())
            time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError("server did not become ready")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))


def test_concurrent_requests_are_batched(exported: Path, images: np.ndarray, offline: np.ndarray) -> None:
    server = Server(exported, "--max-batch", "16", "--max-wait-ms", "20")
    try:
        bodies = [png(images[i % len(images)]) for i in range(200)]
        with httpx.Client(timeout=60) as http, ThreadPoolExecutor(32) as pool:
            responses = list(pool.map(lambda b: http.post(server.url + "/v1/predict?top_k=10", content=b,
                                                          headers={"content-type": "image/png"}), bodies))
            metrics = http.get(server.url + "/metrics").text
        assert [r.status_code for r in responses] == [200] * 200
        for i, r in enumerate(responses):
            np.testing.assert_allclose(probabilities(r.json()["predictions"]), offline[i % len(images)], atol=1e-5)
        batches = metric(metrics, "vitdeploy_batch_size_count")
        assert metric(metrics, "vitdeploy_batch_size_sum") >= 200 and batches < 200  # some batches held several images
        assert metric(metrics, 'vitdeploy_requests_total{endpoint="/v1/predict",status="200"}') == 200
    finally:
        assert server.stop() == 0


def test_overload_gives_503_then_recovers(exported: Path, images: np.ndarray) -> None:
    server = Server(exported, "--max-batch", "4", "--max-queue", "8", "--max-wait-ms", "200")
    try:
        body = png(images[0])
        with httpx.Client(timeout=60) as http, ThreadPoolExecutor(64) as pool:
            responses = list(pool.map(lambda _i: http.post(server.url + "/v1/predict", content=body), range(64)))
            codes = [r.status_code for r in responses]
            assert set(codes) == {200, 503} and codes.count(503) >= 10, codes
            busy = next(r for r in responses if r.status_code == 503)
            assert busy.headers["retry-after"] == "1" and "server busy" in busy.json()["error"]
            assert http.post(server.url + "/v1/predict", content=body).status_code == 200
    finally:
        assert server.stop() == 0


def test_sigterm_drains_queued_requests(exported: Path, images: np.ndarray) -> None:
    server = Server(exported, "--max-batch", "16", "--max-wait-ms", "1500")
    body = png(images[0])
    with httpx.Client(timeout=30) as http, ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(http.post, server.url + "/v1/predict", content=body) for _ in range(6)]
        time.sleep(0.5)  # the requests are waiting for their batch to fill
        server.proc.send_signal(signal.SIGTERM)
        codes = [f.result().status_code for f in futures]
    assert codes == [200] * 6
    assert server.proc.wait(timeout=30) == 0


def test_pytorch_backend_serves_a_training_checkpoint(trained: Path, images: np.ndarray, offline: np.ndarray) -> None:
    app = create_app(ServeConfig(artifacts=trained, backend="pytorch", max_batch=8))
    with TestClient(app) as c:
        assert c.get("/v1/model").json()["backend"]["name"] == "pytorch"
        response = c.post("/v1/predict?top_k=10", content=png(images[0]))
        assert response.status_code == 200
        np.testing.assert_allclose(probabilities(response.json()["predictions"]), offline[0], atol=1e-5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\x00\x00\x00\x00WEBP"]))
def test_any_bytes_get_a_200_or_a_400(client: TestClient, data: bytes, prefix: bytes) -> None:
    response = client.post("/v1/predict", content=prefix + data, headers={"content-type": "application/octet-stream"})
    assert response.status_code in (200, 400), response.text
    assert ("predictions" in response.json()) == (response.status_code == 200)


def test_a_failing_backend_gives_500_without_internals_and_the_server_goes_on(exported: Path, images: np.ndarray,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(ServeConfig(artifacts=exported, max_batch=4))
    with TestClient(app, raise_server_exceptions=False) as c:
        original = OrtBackend.infer
        calls = {"n": 0}

        def flaky(self: OrtBackend, batch: np.ndarray) -> np.ndarray:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("secret internal detail")
            return original(self, batch)

        monkeypatch.setattr(OrtBackend, "infer", flaky)
        failed = c.post("/v1/predict", content=png(images[0]))
        assert failed.status_code == 500 and failed.json() == {"error": "internal server error"}
        assert "secret" not in failed.text
        assert c.post("/v1/predict", content=png(images[0])).status_code == 200
