"""`vitdeploy serve` against hostile clients over real loopback sockets (issue 19): pipelined
partial requests, clients that never read, pictures that are cheap to send and costly to
decode, a busy explainer, a port in use."""

from __future__ import annotations

import io
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'vitdeploy[serve]'")

import httpx
import numpy as np
from PIL import Image

from tests.conftest import REPO, free_port, run_cli, serve_client
from tests.test_serve import Server
from vitdeploy.data import load_test

HOSTILE = 15  # against --max-connections 16: one connection left for everyone else


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def small_png(cifar_root: Path) -> bytes:
    return png(load_test(cifar_root).images[0].numpy().transpose(1, 2, 0))


def first_200(url: str, body: bytes, limit_s: float) -> float:
    """Seconds until a prediction is answered 200 (503s while the connections are held are retried)."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        try:
            if httpx.post(url + "/v1/predict", content=body, timeout=limit_s).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no 200 within {limit_s} s")


def closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing `sock`, or None if it was still open after `seconds`."""
    sock.settimeout(0.5)
    data, end = b"", time.perf_counter() + seconds
    while time.perf_counter() < end:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return data
        if not chunk:
            return data
        data += chunk
    return None


def test_pipelined_partial_requests_get_the_read_deadline(exported: Path, small_png: bytes) -> None:
    server = Server(exported, "--max-batch", "8", "--max-connections", "16", "--read-timeout-s", "3")
    pipelined = (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nPOST /v1/predict HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: image/png\r\nContent-Length: 1000\r\n\r\nab")
    sockets = []
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as alone:  # one: answered, then 408 at the deadline
            alone.sendall(pipelined)
            start = time.perf_counter()
            answer = closed_within(alone, 6)
            assert answer is not None and answer.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in answer, answer
            assert 2.5 < time.perf_counter() - start < 4.5
        for _ in range(HOSTILE):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(pipelined)
            sockets.append(sock)
        assert first_200(server.url, small_png, 20) < 3 + 3  # the held connections are closed at the deadline
        answers = [closed_within(sock, 5) for sock in sockets]
        # each one closed: its partial request timed out (408), or uvicorn refused it at the connection limit (503)
        assert all(a is not None and (b"HTTP/1.1 408" in a or b"HTTP/1.1 503" in a) for a in answers), answers
        start = time.perf_counter()
        assert server.stop() == 0 and time.perf_counter() - start < 10
        log = server.proc.stdout.read()
        assert "Traceback" not in log and "CancelledError" not in log, log[-2000:]
    finally:
        for sock in sockets:
            sock.close()
        server.stop()


def test_clients_that_never_read_are_dropped_at_the_write_deadline(exported: Path, small_png: bytes) -> None:
    server = Server(exported, "--max-batch", "8", "--max-connections", "16", "--write-timeout-s", "3")
    sockets, stop = [], threading.Event()

    def pipeline(sock: socket.socket, stalled: threading.Event) -> None:
        request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.settimeout(1)
        for _ in range(3000):
            if stop.is_set():
                return
            try:
                sock.sendall(request)
            except (TimeoutError, OSError):  # the server stopped reading (it is paused), or dropped us
                stalled.set()
                if stop.is_set():
                    return
        stalled.set()
    try:
        for _ in range(HOSTILE):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            sockets.append(sock)
        blocked = [threading.Event() for _ in sockets]
        senders = [threading.Thread(target=pipeline, args=(s, b), daemon=True) for s, b in zip(sockets, blocked, strict=True)]
        for t in senders:
            t.start()
        time.sleep(1)
        assert first_200(server.url, small_png, 20) < 3 + 4
        # every connection has as many answers waiting as the server buffers (it stopped reading), however slow
        # this machine is, before the clients stop sending
        assert all(b.wait(60) for b in blocked)
        stop.set()
        time.sleep(3 + 9)  # not reading well past the 3 s write deadline (a busy machine fills the buffers slowly): reading now would let the writes through
        for sock in sockets:  # dropped: reads end (after what the kernel buffered) with EOF or a reset
            assert closed_within(sock, 10) is not None
        assert server.stop() == 0
    finally:
        stop.set()
        for sock in sockets:
            sock.close()
        server.stop()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads memory from /proc")
def test_decode_heavy_pictures_are_bounded_and_do_not_delay_small_ones(exported: Path) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    from decode_load import (
        measure,  # the measurement command itself (scripts/decode_load.py)
    )

    result = measure(exported)
    assert result["large_png_bytes"] < 100_000  # 78 kB of PNG, 80 MB as decoded 16-bit grayscale
    assert result["small_status"] == 200 and result["small_seconds"] < 2, result
    assert all(s == 200 for s in result["large_statuses"]), result  # decoded (and answered), one at a time
    assert result["peak_above_idle_mb"] < 1024, result


def test_the_deadline_covers_decoding(exported: Path, monkeypatch: pytest.MonkeyPatch, small_png: bytes) -> None:
    from vitdeploy.serve import decoder as decoder_module

    real = decoder_module.decode_image

    def slow(*args: object) -> np.ndarray:
        time.sleep(1.5)
        return real(*args)

    monkeypatch.setattr(decoder_module, "decode_image", slow)
    with serve_client(artifacts=exported, max_batch=8, timeout_s=0.5) as client:
        start = time.perf_counter()
        response = client.post("/v1/predict", content=small_png)
        assert response.status_code == 504 and time.perf_counter() - start < 1.4, response.text


def test_a_busy_explainer_refuses_before_decoding(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vitdeploy.serve.explainer import Explainer

    monkeypatch.setattr(Explainer, "full", lambda self: True)
    with serve_client(artifacts=exported, max_batch=8) as client:
        response = client.post("/v1/explain", content=b"not an image: never decoded")
        assert response.status_code == 503 and "explainer busy" in response.json()["error"]
        assert response.headers["retry-after"] == "1"


def test_a_port_in_use_is_one_line_before_serving(exported: Path) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = run_cli("serve", str(exported), "--port", str(port), "--max-batch", "8", timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "already in use" in lines[0] and "--port" in lines[0], result.stderr
    assert "serving" not in result.stdout


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0"])
def test_body_limit_must_be_a_finite_positive_number(exported: Path, value: str) -> None:
    result = run_cli("serve", str(exported), "--max-body-mb", value, "--port", str(free_port()))
    assert result.returncode == 1 and "--max-body-mb must be a number" in result.stderr
    assert "Traceback" not in result.stderr
