"""`vitdeploy serve` speaking the Open Inference Protocol (KServe v2 / Triton HTTP): Triton's own
client (`tritonclient.http`) against the real server on loopback, answers equal to /v1/predict
on real CIFAR-10 test images, batching of concurrent clients, the README's client snippet run
as written, and the protocol's errors for bad requests; the float32 and checkpoint contracts
and the API key in-process; the request parser fuzzed."""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'vitdeploy[serve]'")
pytest.importorskip("tritonclient.http", reason="needs tritonclient[http] (the dev extra)")

import httpx
import numpy as np
import torch
import tritonclient.http as httpclient
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from tests.conftest import REPO, SHARED_CIFAR
from tests.test_export import triton_model_config
from tests.test_serve import Server, png
from vitdeploy.data import load_test
from vitdeploy.preprocess import Preprocess, Preprocessing
from vitdeploy.serve import oip
from vitdeploy.serve.app import create_app
from vitdeploy.serve.config import ServeConfig
from vitdeploy.serve.service import ApiError

MODEL = "vit_cifar_tiny_onnx"  # the Triton name `export --triton` gives the fp32 ONNX file
REAL_IMAGES = int(os.environ.get("VITDEPLOY_OIP_IMAGES", "2000"))  # scripts and the closing note ran all 10,000


@pytest.fixture(scope="module")
def server(exported: Path) -> Iterator[Server]:
    running = Server(exported, "--max-batch", "16", "--max-wait-ms", "5", "--max-images-per-request", "64")
    yield running
    assert running.stop() == 0


@pytest.fixture
def client(server: Server) -> Iterator[httpclient.InferenceServerClient]:
    triton = httpclient.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120)
    yield triton
    triton.close()


@pytest.fixture(scope="module")
def real_images(cifar_root: Path) -> np.ndarray:
    """The first REAL_IMAGES real CIFAR-10 test images, or the small made-up set where the real one is absent."""
    root = SHARED_CIFAR.parent if (SHARED_CIFAR / "test_batch").is_file() else cifar_root
    return load_test(root).images[:REAL_IMAGES].numpy()


def uint8_input(images: np.ndarray, binary: bool = True) -> httpclient.InferInput:
    tensor = httpclient.InferInput("input", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images, binary_data=binary)
    return tensor


def bytes_input(files: list[bytes]) -> httpclient.InferInput:
    tensor = httpclient.InferInput("input", [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=np.object_))
    return tensor


def status_of(call) -> tuple[str, str]:  # noqa: ANN001 - a tritonclient call expected to fail
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value.status(), caught.value.message()


def test_metadata_config_and_readiness_as_tritonclient_reads_them(client: httpclient.InferenceServerClient,
                                                                  exported: Path) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    server = client.get_server_metadata()
    assert server["name"] == "vitdeploy" and {"binary_tensor_data", "classification"} <= set(server["extensions"])
    meta = client.get_model_metadata(MODEL)
    assert meta == client.get_model_metadata(MODEL, "1")
    assert meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "UINT8", "shape": [-1, 3, 32, 32]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]

    # The configuration is the record export --triton wrote as config.pbtxt, with this server's batching settings.
    from google.protobuf import json_format, text_format

    schema = triton_model_config()
    served = json_format.ParseDict(client.get_model_config(MODEL), schema.ModelConfig())
    written = text_format.Parse((exported.parent / "triton" / MODEL / "config.pbtxt").read_text(), schema.ModelConfig())
    assert served.max_batch_size == 16 and served.dynamic_batching.max_queue_delay_microseconds == 5000
    written.dynamic_batching.max_queue_delay_microseconds = 5000
    assert served == written
    assert served.output[0].label_filename == "labels.txt"

    for call in (lambda: client.get_model_metadata("resnet50"), lambda: client.get_model_metadata(MODEL, "2"),
                 lambda: client.get_model_config("nope"), lambda: client.get_inference_statistics("nope"),
                 lambda: client.infer("nope", [uint8_input(np.zeros((1, 3, 32, 32), np.uint8))])):
        status, message = status_of(call)
        assert status == "404" and MODEL in message
    assert not client.is_model_ready("nope")


def v1_top1(url: str, images: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Top-1 indices of /v1/predict/batch (the images as PNG files, 64 to a request), and the files."""
    files = [png(image) for image in images]
    top1 = []
    with httpx.Client(timeout=120) as http:
        for start in range(0, len(files), 64):
            parts = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(files[start:start + 64])]
            response = http.post(url + "/v1/predict/batch?top_k=1", files=parts)
            assert response.status_code == 200, response.text
            top1 += [r["predictions"][0]["class_index"] for r in response.json()["results"]]
    return np.array(top1), files


def test_answers_agree_with_v1_predict_on_real_images(client: httpclient.InferenceServerClient, server: Server,
                                                      real_images: np.ndarray) -> None:
    expected, files = v1_top1(server.url, real_images)
    binary, encoded = [], []
    for start in range(0, len(real_images), 64):
        chunk = real_images[start:start + 64]
        binary.append(client.infer(MODEL, [uint8_input(chunk)]).as_numpy("logits"))
        encoded.append(client.infer(MODEL, [bytes_input(files[start:start + 64])]).as_numpy("logits"))
    binary, encoded = np.concatenate(binary), np.concatenate(encoded)
    assert binary.shape == (len(real_images), 10) and binary.dtype == np.float32
    np.testing.assert_array_equal(binary.argmax(1), expected)  # identical top-1, image for image
    np.testing.assert_allclose(encoded, binary, atol=1e-6)  # BYTES files decode to the same pixels

    few = real_images[:8]
    as_json = client.infer(MODEL, [uint8_input(few, binary=False)],
                           outputs=[httpclient.InferRequestedOutput("logits", binary_data=False)])
    assert as_json.get_response()["outputs"][0]["data"]  # really answered as JSON data
    np.testing.assert_allclose(as_json.as_numpy("logits"), binary[:8], atol=1e-6)

    for binary_data in (True, False):
        top3 = client.infer(MODEL, [uint8_input(few)],
                            outputs=[httpclient.InferRequestedOutput("logits", binary_data=binary_data, class_count=3)])
        rows = top3.as_numpy("logits")
        assert rows.shape == (8, 3)
        for row, logits in zip(rows, binary[:8], strict=True):
            parsed = [(e.decode() if isinstance(e, bytes) else e).split(":") for e in row]
            order = np.argsort(-logits, kind="stable")[:3]
            assert [int(index) for _, index, _ in parsed] == order.tolist()
            np.testing.assert_allclose([float(score) for score, _, _ in parsed], logits[order], atol=1e-6)
            assert parsed[0][2] in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def test_concurrent_clients_are_batched_and_counted(server: Server, real_images: np.ndarray) -> None:
    triton = httpclient.InferenceServerClient(server.url.removeprefix("http://"), concurrency=16, network_timeout=120)
    try:
        before = triton.get_inference_statistics(MODEL)["model_stats"][0]
        pending = [triton.async_infer(MODEL, [uint8_input(real_images[i:i + 1])]) for i in range(160)]
        answers = [p.get_result().as_numpy("logits") for p in pending]
        after = triton.get_inference_statistics(MODEL)["model_stats"][0]
    finally:
        triton.close()
    assert all(a.shape == (1, 10) for a in answers)
    images = after["inference_count"] - before["inference_count"]
    batches = after["execution_count"] - before["execution_count"]
    assert images == 160 and images / batches > 1, (images, batches)  # concurrent requests shared batches
    stats = after["inference_stats"]
    assert stats["success"]["count"] - before["inference_stats"]["success"]["count"] == 160
    assert stats["queue"]["ns"] > 0 and stats["compute_infer"]["ns"] > 0
    assert sum(b["compute_infer"]["count"] for b in after["batch_stats"]) == after["execution_count"]
    metrics = httpx.get(server.url + "/metrics").text
    assert re.search(r'vitdeploy_requests_total\{endpoint="/v2/models/\{name\}/infer",status="200"\} [1-9]', metrics)


def readme_client() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"```python\n(# client\.py:.*?)```", text, re.S)
    assert match, "README has no ```python block starting with '# client.py:'"
    return match.group(1)


def test_the_readme_client_runs_unchanged(server: Server, tmp_path: Path, real_images: np.ndarray) -> None:
    code = readme_client()
    assert '"127.0.0.1:8000"' in code and f'"{MODEL}"' in code
    for name, image in (("cat.png", real_images[3]), ("ship.png", real_images[1])):
        (tmp_path / name).write_bytes(png(image))
    script = tmp_path / "client.py"
    script.write_text(code.replace('"127.0.0.1:8000"', f'"{server.url.removeprefix("http://")}"'))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(r"\d+\.\d{6}:\d:(airplane|automobile|bird|cat|deer|dog|frog|horse|ship|truck)", result.stdout)


def header_and_binary(header: dict, binary: bytes, length: str | None = None) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + binary, {oip.HEADER_LENGTH: length if length is not None else str(len(text))}


def uint8_request(n: int, **tensor: object) -> dict:
    return {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [n, 3, 32, 32], **tensor}]}


def bytes_request(n: int, size: int) -> dict:
    return {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [n], "parameters": {"binary_data_size": size}}]}


def element(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


PIXELS = bytes(3 * 32 * 32)
BAD_REQUESTS = [  # (what, path under /v2/models, body, headers, status, words in the error)
    ("wrong shape", MODEL, json.dumps(uint8_request(1, shape=[1, 3, 32, 31], data=[0])).encode(), {}, 400, "has shape"),
    ("wrong datatype", MODEL, json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                                      "data": [0.0] * 3072}]}).encode(), {}, 400, "takes UINT8"),
    ("unknown input", MODEL, json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1],
                                                     "data": [0]}]}).encode(), {}, 400, "unknown input"),
    ("unknown output", MODEL, json.dumps({**uint8_request(1, data=[0] * 3072), "outputs": [{"name": "probs"}]}).encode(), {},
     400, "unknown output"),
    ("unknown model", "resnet50", json.dumps(uint8_request(1, data=[0] * 3072)).encode(), {}, 404, "unknown model"),
    ("unknown version", f"{MODEL}/versions/3", json.dumps(uint8_request(1, data=[0] * 3072)).encode(), {}, 404,
     "no version"),
    ("values out of range", MODEL, json.dumps(uint8_request(1, data=[256] * 3072)).encode(), {}, 400, "0 to 255"),
    ("too few values", MODEL, json.dumps(uint8_request(1, data=[1, 2, 3])).encode(), {}, 400, "3,072 integers"),
    ("not JSON", MODEL, b"{inputs: nope", {}, 400, "not valid JSON"),
    ("header length beyond the body", MODEL, *header_and_binary(uint8_request(1), PIXELS, "9999999"), 400,
     "byte count of the JSON header"),
    ("negative header length", MODEL, *header_and_binary(uint8_request(1), PIXELS, "-12"), 400, "byte count"),
    ("huge header length", MODEL, *header_and_binary(uint8_request(1), PIXELS, "184467440737095516160"), 400, "byte count"),
    ("header length inside the JSON", MODEL, *header_and_binary(uint8_request(1), PIXELS, "10"), 400, "not valid JSON"),
    ("binary size disagrees", MODEL, *header_and_binary(uint8_request(1, parameters={"binary_data_size": 3071}), PIXELS),
     400, "binary_data_size is 3071"),
    ("binary size negative", MODEL, *header_and_binary(uint8_request(1, parameters={"binary_data_size": -1}), PIXELS),
     400, "binary_data_size is -1"),
    ("binary data nobody claims", MODEL, *header_and_binary(uint8_request(1, data=[0] * 3072), b"\0" * 8), 400,
     "no binary_data_size"),
    ("tensor of the wrong size", MODEL, *header_and_binary(uint8_request(2, parameters={"binary_data_size": 3072}), PIXELS),
     400, "6,144 bytes"),
    ("BYTES that are not images", MODEL, *header_and_binary(bytes_request(2, 24), element(b"12345678") * 2), 400,
     "input[0]"),
    ("BYTES length beyond the data", MODEL, *header_and_binary(bytes_request(1, 8), struct.pack("<I", 2**31) + b"abcd"),
     400, "remain"),
    ("BYTES fewer than the shape", MODEL, *header_and_binary(bytes_request(3, 12), element(b"12345678")), 400,
     "length is missing"),
    ("too many images", MODEL, *header_and_binary(bytes_request(65, 65 * 4), element(b"") * 65), 400, "1 to 64 images"),
    ("too many rows", MODEL, *header_and_binary(uint8_request(65, parameters={"binary_data_size": 65 * 3072}),
                                                PIXELS * 65), 400, "1 to 64 images"),
    ("sequence request", MODEL, json.dumps({**uint8_request(1, data=[0] * 3072), "parameters": {"sequence_id": 7}}).encode(),
     {}, 400, "not a sequence model"),
    ("gzip bomb", MODEL, gzip.compress(b"\0" * (9 * 2**20)), {"Content-Encoding": "gzip"}, 413, "decompresses to more"),
    ("unknown encoding", MODEL, b"{}", {"Content-Encoding": "br"}, 415, "unsupported Content-Encoding"),
]


def test_bad_requests_get_the_protocols_errors_and_nothing_else_is_affected(server: Server,
                                                                            real_images: np.ndarray) -> None:
    good = httpclient.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)
    try:
        reference = good.infer(MODEL, [uint8_input(real_images[:4])]).as_numpy("logits")
        with httpx.Client(base_url=server.url + "/v2/models/", timeout=60) as http:
            for what, path, body, headers, status, words in BAD_REQUESTS:
                response = http.post(f"{path}/infer", content=body, headers=headers)
                assert response.status_code == status, (what, response.text)
                assert list(response.json()) == ["error"] and words in response.json()["error"], (what, response.text)
        compressed = good.infer(MODEL, [uint8_input(real_images[:4])], request_compression_algorithm="gzip")
        np.testing.assert_array_equal(compressed.as_numpy("logits"), reference)
        np.testing.assert_array_equal(good.infer(MODEL, [uint8_input(real_images[:4])]).as_numpy("logits"), reference)
    finally:
        good.close()


# -- in-process: the other input contracts, the API key, the parser --------------------------------


def post_v2(c: TestClient, model: str, header: dict, binary: bytes = b"") -> tuple[dict, bytes]:
    body, headers = header_and_binary(header, binary)
    response = c.post(f"/v2/models/{model}/infer", content=body, headers=headers if binary else {})
    assert response.status_code == 200, response.text
    length = response.headers.get(oip.HEADER_LENGTH)
    return (json.loads(response.content[:int(length)]), response.content[int(length):]) if length else (response.json(), b"")


def test_float32_exports_and_checkpoints_keep_their_contracts(trained: Path, cifar_root: Path, tmp_path: Path) -> None:
    from vitdeploy.export.artifacts import ExportOptions, export_artifacts

    art = tmp_path / "art"
    manifest = export_artifacts(ExportOptions(source=trained, out=art, preprocess_in_graph=False, max_batch=8,
                                              data_dir=cifar_root), say=lambda _line: None)
    images = load_test(cifar_root).images[:4].numpy()
    rows = Preprocess(Preprocessing.from_dict(manifest["preprocessing"]))(torch.from_numpy(images)).numpy()
    with TestClient(create_app(ServeConfig(artifacts=art, max_batch=8))) as c:
        meta = c.get(f"/v2/models/{MODEL}").json()
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
        header = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(rows.shape),
                              "parameters": {"binary_data_size": rows.nbytes}}],
                  "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}
        answer, raw = post_v2(c, MODEL, header, rows.astype("<f4").tobytes())
        logits = np.frombuffer(raw, "<f4").reshape(answer["outputs"][0]["shape"])
        files = [png(image) for image in images]
        answer, raw = post_v2(c, MODEL, bytes_request(4, sum(4 + len(f) for f in files)), b"".join(map(element, files)))
        np.testing.assert_allclose(answer["outputs"][0]["data"], logits.ravel(), atol=1e-5)
        v1 = [c.post("/v1/predict?top_k=1", content=f).json()["predictions"][0]["class_index"] for f in files]
        assert logits.argmax(1).tolist() == v1
        refused = c.post(f"/v2/models/{MODEL}/infer", json=uint8_request(1, data=[0] * 3072))
        assert refused.status_code == 400 and "takes FP32" in refused.json()["error"]
        nan = c.post(f"/v2/models/{MODEL}/infer", content=b'{"inputs": [{"name": "input", "datatype": "FP32", '
                                                            b'"shape": [1, 3, 32, 32], "data": [NaN]}]}')
        assert nan.status_code == 400
    with TestClient(create_app(ServeConfig(artifacts=trained, backend="pytorch", max_batch=8))) as c:
        assert c.get("/v1/model").json()["open_inference_protocol"]["model"] == "vit_cifar_tiny"
        meta = c.get("/v2/models/vit_cifar_tiny").json()
        assert meta["platform"] == "pytorch" and meta["inputs"][0]["datatype"] == "UINT8"
        answer, _ = post_v2(c, "vit_cifar_tiny", uint8_request(4, data=images.ravel().tolist()))
        assert np.array(answer["outputs"][0]["data"]).reshape(4, 10).argmax(1).tolist() == v1


def test_the_api_key_guards_the_protocol_but_not_its_health(exported: Path) -> None:
    with TestClient(create_app(ServeConfig(artifacts=exported, api_key="s3cret-key", max_batch=4))) as c:
        assert c.get("/v2/health/live").status_code == 200 and c.get("/v2/health/ready").status_code == 200
        for path in ("/v2", f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/config", f"/v2/models/{MODEL}/stats"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        assert c.post(f"/v2/models/{MODEL}/infer", json=uint8_request(1, data=[0] * 3072)).status_code == 401


CONTRACT = {"name": "input", "dtype": "uint8", "shape": ["batch", 3, 4, 4]}


@settings(max_examples=300, deadline=None)
@given(header=st.binary(max_size=200) | st.builds(lambda d: json.dumps(d).encode(), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(
        ["inputs", "name", "datatype", "shape", "data", "parameters", "binary_data_size", "outputs", "classification",
         "binary_data", "id"]), inner, max_size=5), max_leaves=30)),
       binary=st.binary(max_size=64), length=st.none() | st.text(max_size=6))
def test_the_parser_accepts_or_refuses_with_a_400_never_anything_else(header: bytes, binary: bytes, length: str | None) -> None:
    body = header + binary
    try:
        request = oip.parse_infer(body, length, CONTRACT, num_classes=10, max_items=8)
    except ApiError as exc:
        assert exc.status == 400 and exc.message
        return
    assert 1 <= request.count <= 8
    if request.rows is not None:
        assert request.rows.dtype == np.uint8 and request.rows.shape[1:] == (3, 4, 4)
