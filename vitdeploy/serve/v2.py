"""The Open Inference Protocol (KServe v2; Triton's HTTP API) routes of `vitdeploy serve`: server
and model metadata, health, readiness, Triton's model configuration and statistics
extensions, and inference (codec in `oip`).

The served model is known by its Triton name (`triton_model.model_name`, the folder name
`export --triton` gives the same artifact) at version 1, so one client talks to this server
and to Triton serving the exported repository alike. Inference goes through the same
admission limit, deadline, batcher, API key and metrics as /v1/predict.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from vitdeploy import __version__
from vitdeploy.serve import oip
from vitdeploy.serve.service import ApiError, Service
from vitdeploy.triton_model import DATATYPES, VERSION

EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration", "statistics")
HEALTH_PATHS = ("/v2/health/live", "/v2/health/ready")  # open without an API key, as /healthz and /readyz

router = APIRouter(prefix="/v2")


def _service(request: Request, name: str | None = None, version: str | None = None) -> Service:
    """The service, once `name` (and `version`, if given) name the model it serves; else 404."""
    service: Service = request.app.state.service
    served = service.triton_name
    if name is not None and name != served:
        raise ApiError(404, f"unknown model {name[:100]!r}: this server serves {served!r}, version {VERSION}")
    if version is not None and version != VERSION:
        raise ApiError(404, f"model {served!r} has no version {version[:20]!r}: this server serves version {VERSION}")
    return service


@router.get("")
async def server_metadata() -> dict[str, Any]:
    return {"name": "vitdeploy", "version": __version__, "extensions": list(EXTENSIONS)}


@router.get("/health/live")
async def live() -> Response:
    return Response(status_code=200)


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    return _readiness(_service(request))


def _readiness(service: Service) -> Response:
    """200 when ready, 400 (the protocol's 'false') otherwise."""
    if service.ready:
        return Response(status_code=200)
    return JSONResponse({"error": "the model is not loaded yet or the server is shutting down"}, 400)


@router.get("/models/stats")
async def all_stats(request: Request) -> dict[str, Any]:
    service = _service(request)
    return {"model_stats": [service.stats.to_json(service.triton_name, VERSION)]}


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def model_metadata(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
    service = _service(request, name, version)

    def tensor(record: dict[str, Any]) -> dict[str, Any]:
        return {"name": record["name"], "datatype": DATATYPES[record["dtype"]], "shape": [-1, *record["shape"][1:]]}

    return {"name": service.triton_name, "versions": [VERSION], "platform": service.triton_config["platform"],
            "inputs": [tensor(service.input)], "outputs": [tensor(service.manifest["output"])]}


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(request: Request, name: str, version: str | None = None) -> Response:
    return _readiness(_service(request, name, version))


@router.get("/models/{name}/config")
@router.get("/models/{name}/versions/{version}/config")
async def model_config(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
    return _service(request, name, version).triton_config


@router.get("/models/{name}/stats")
@router.get("/models/{name}/versions/{version}/stats")
async def model_stats(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
    service = _service(request, name, version)
    return {"model_stats": [service.stats.to_json(service.triton_name, VERSION)]}


@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
async def infer(request: Request, name: str, version: str | None = None) -> Response:
    """One inference request: JSON, or JSON and binary data (Inference-Header-Content-Length)."""
    service, start = _service(request, name, version), time.monotonic()

    async def answer() -> tuple[bytes, int | None]:
        body = await request.body()
        async with service.admitted():
            parsed = await asyncio.to_thread(_parse, body, request.headers, service)
            if parsed.rows is not None:
                logits = await service.infer_rows(list(parsed.rows))
            else:
                images = await service.decode([(f"input[{i}]", data) for i, data in enumerate(parsed.images)])
                logits = await service.infer_images(images)
        return oip.encode_response(service.triton_name, VERSION, parsed.id, logits, parsed.output, service.classes)

    body, header_length = await service.within_deadline(start, answer())
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream", headers={oip.HEADER_LENGTH: str(header_length)})


def _parse(body: bytes, headers: Any, service: Service) -> oip.InferRequest:
    limit = service.config.max_body_bytes
    plain = inflate(body, headers.get("content-encoding", ""), limit)
    return oip.parse_infer(plain, headers.get(oip.HEADER_LENGTH), service.input, len(service.classes),
                           service.config.images_per_request)


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """The body as sent uncompressed (tritonclient's gzip and deflate request compression), at most `limit` bytes."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise ApiError(415, f"unsupported Content-Encoding {encoding[:20]!r}: send gzip, deflate or an uncompressed body")
    inflater = zlib.decompressobj(wbits)
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ApiError(400, f"the {encoding} body does not decompress ({exc})") from None
    if len(plain) > limit:
        raise ApiError(413, f"the request body decompresses to more than {limit:,} bytes")
    if not inflater.eof or inflater.unused_data:
        raise ApiError(400, f"the {encoding} body is cut off or has bytes after its end")
    return plain
