"""The FastAPI application of `vitdeploy serve`.

Requests are decoded off the event loop (the one image conversion of
`vitdeploy.images`), queued in the `Batcher` and answered from its batches. Every error
is a JSON `{"error": ...}` with a 4xx/5xx status and no traceback; a bad image is
refused before it is queued, so it never touches another request's batch.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vitdeploy import predictions
from vitdeploy.choices import EXPLAIN_METHODS
from vitdeploy.errors import VitDeployError
from vitdeploy.explain import class_index
from vitdeploy.overlay import overlay_png
from vitdeploy.serve import oip, v2
from vitdeploy.serve.config import ServeConfig
from vitdeploy.serve.service import ApiError, Service, log, parse_count

# no API key: liveness, readiness (both protocols), the static page
OPEN_PATHS = ("/healthz", "/readyz", *v2.HEALTH_PATHS, "/", "/favicon.ico", "/favicon.svg")
CLIENT_CLOSED = 499  # counted in metrics for requests whose client went away (never sent)


class BodyLimit:
    """Refuses bodies over `limit` bytes with 413: by Content-Length before reading, and
    while reading for bodies that do not declare their length."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await JSONResponse({"error": self._message()}, 413)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise ApiError(413, self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"request body larger than {self.limit:,} bytes"


def create_app(config: ServeConfig) -> FastAPI:
    """The application for `config`, with its model loaded and warmed up (`Service.open`): a bad
    model fails here, before any server starts. The lifespan starts the batcher and, at
    shutdown, answers what is queued and releases the backend."""
    app = FastAPI(title="vitdeploy", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = Service.open(config)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.middleware("http")(_guard_and_measure)
    if config.cors_origins:  # outermost: a browser's preflight is answered before the API-key check
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type", "Content-Encoding", oip.HEADER_LENGTH],
                           expose_headers=[oip.HEADER_LENGTH])
    app.include_router(router)
    app.include_router(v2.router)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    service: Service = app.state.service
    service.start()
    try:
        yield
    finally:
        await service.close()


def _service(request: Request) -> Service:
    return request.app.state.service


async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, exc.status, headers=exc.headers)


async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own 404/405/...: the same {"error": ...} body as every other error."""
    return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)


async def _guard_and_measure(request: Request, call_next: Any) -> Response:
    """The API key, an answer for every failure, and the request metrics."""
    service, start, path = _service(request), time.perf_counter(), request.url.path
    key = service.config.api_key
    try:
        if key and path not in OPEN_PATHS and not _authorized(request, key):
            response: Response = JSONResponse({"error": "missing or wrong API key (Authorization: Bearer KEY or X-API-Key)"},
                                              401, headers={"WWW-Authenticate": "Bearer"})
        else:
            response = await call_next(request)
    except ClientDisconnect:  # the client left, or the read deadline closed its connection
        response = Response(status_code=CLIENT_CLOSED)
    except Exception:  # noqa: BLE001 - answered here so that it is counted like every other answer
        log.exception("unexpected error")
        response = JSONResponse({"error": "internal server error"}, 500)
    route = request.scope.get("route")
    endpoint = route.path if route is not None else "other"
    service.metrics.requests.labels(endpoint, str(response.status_code)).inc()
    service.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
    return response


router = APIRouter()


@router.post("/v1/predict")
async def predict(request: Request) -> dict[str, Any]:
    """One image: raw bytes as the body, or a multipart part named `file`."""
    return await _predict(request, multiple=False)


@router.post("/v1/predict/batch")
async def predict_batch(request: Request) -> dict[str, Any]:
    """Several images: multipart parts named `files` (or `file`), answered in order."""
    return await _predict(request, multiple=True)


async def _predict(request: Request, multiple: bool) -> dict[str, Any]:
    service, start = _service(request), time.monotonic()
    top_k = _top_k(request, len(service.classes))

    async def answer() -> dict[str, Any]:
        items = await _read_images(request, service.config, multiple=multiple)
        async with service.admitted():
            results = await service.predict(items, top_k)
        if not multiple:
            return {"model": service.model_name, "predictions": results[0]}
        return {"model": service.model_name,
                "results": [{"filename": name, "predictions": p} for (name, _), p in zip(items, results, strict=True)]}

    return await service.within_deadline(start, answer())


@router.post("/v1/explain")
async def explain(request: Request) -> Response:
    """Where the model looks for one image (body as for /v1/predict): the served backend's
    top-1 class (or ?class=NAME|INDEX) explained by the server's PyTorch copy of the model;
    ?method=rollout|grad-rollout; ?format=png for the overlay picture instead of JSON."""
    service, start = _service(request), time.monotonic()
    service.check_explainer()  # refused before the body is read or decoded
    fmt, method, target = _explain_query(request, service.classes)

    async def decoded_and_served() -> tuple[np.ndarray, dict[str, Any]]:
        items = await _read_images(request, service.config, multiple=False)
        async with service.admitted():
            image = (await service.decode(items))[0]
            return image, (await service.predict_decoded([image], 1))[0][0]

    image, served = await service.within_deadline(start, decoded_and_served())
    answer, heat = await service.explain(image, served, method, target)
    if fmt == "png":
        return Response(overlay_png(image, heat), media_type="image/png")
    return JSONResponse(answer)


def _explain_query(request: Request, classes: list[str]) -> tuple[str, str, int | None]:
    """(format, method, class index or None) from /v1/explain's query, each checked."""
    fmt = request.query_params.get("format", "json")
    method = request.query_params.get("method", "rollout")
    if fmt not in ("json", "png"):
        raise ApiError(400, f"format must be json or png (got {fmt[:20]!r})")
    if method not in EXPLAIN_METHODS:
        raise ApiError(400, f"method must be {' or '.join(EXPLAIN_METHODS)} (got {method[:20]!r})")
    chosen = request.query_params.get("class")
    try:
        return fmt, method, None if chosen is None else class_index(chosen, classes)
    except VitDeployError as exc:
        raise ApiError(400, str(exc).replace("--class", "class")) from None


@router.get("/favicon.svg")
@router.get("/favicon.ico")
async def favicon() -> Response:
    return Response(resources.files("vitdeploy.serve").joinpath("favicon.svg").read_bytes(), media_type="image/svg+xml",
                    headers={"Cache-Control": "max-age=86400"})


@router.api_route("/healthz", methods=["GET", "HEAD"])
async def healthz() -> dict[str, str]:
    return {"status": "alive"}


@router.api_route("/readyz", methods=["GET", "HEAD"])
async def readyz(request: Request) -> JSONResponse:
    ready = _service(request).ready
    return JSONResponse({"ready": ready}, 200 if ready else 503)


@router.get("/v1/model")
async def model_info(request: Request) -> dict[str, Any]:
    return _service(request).describe()


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    service = _service(request)
    if service.batcher is not None:
        service.metrics.queue_depth.set(service.batcher.depth)
    return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/", response_class=HTMLResponse)
async def page() -> str:
    return resources.files("vitdeploy.serve").joinpath("page.html").read_text()


def _authorized(request: Request, key: str) -> bool:
    """The key from Authorization: Bearer or X-API-Key, compared in constant time as UTF-8 bytes
    (headers arrive as bytes; decoding them as Latin-1 would never match a non-ASCII key)."""
    headers = dict(request.scope["headers"])
    given = headers.get(b"x-api-key", b"")
    auth = headers.get(b"authorization", b"")
    if auth[:7].lower() == b"bearer ":
        given = auth[7:].strip()
    return hmac.compare_digest(given, key.encode("utf-8"))


def _top_k(request: Request, num_classes: int) -> int:
    raw = request.query_params.get("top_k", str(predictions.default_top_k(num_classes)))
    value = parse_count(raw, 1, num_classes)
    if value is None:
        raise ApiError(400, f"top_k must be an integer from 1 to {num_classes} (got {raw[:20]!r})")
    return value


async def _read_images(request: Request, config: ServeConfig, multiple: bool) -> list[tuple[str, bytes]]:
    """(name, bytes) of the images in the request body."""
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=config.images_per_request, max_fields=16)
        except (ApiError, ClientDisconnect):
            raise
        except Exception as exc:  # noqa: BLE001 - the multipart parser's own errors
            raise ApiError(400, f"malformed multipart body: {exc}") from None
        parts = form.getlist("file") + (form.getlist("files") if multiple else [])
        files = [p for p in parts if isinstance(p, UploadFile)]
        if not files:
            raise ApiError(400, "the multipart body has no file part named " + ("'files' or 'file'" if multiple else "'file'"))
        if not multiple and len(files) > 1:
            raise ApiError(400, "send one image to /v1/predict; /v1/predict/batch takes several")
        return [(f.filename or f"file{i}", await f.read()) for i, f in enumerate(files)]
    if multiple:
        raise ApiError(415, "/v1/predict/batch takes multipart/form-data with one 'files' part per image")
    if kind and not kind.startswith("image/") and kind != "application/octet-stream":
        raise ApiError(415, f"unsupported content type {kind!r}: send image bytes (image/png, image/jpeg, image/webp) "
                            "or multipart/form-data with a 'file' part")
    return [("body", await request.body())]
