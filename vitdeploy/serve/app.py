"""The FastAPI application of `vitdeploy serve`.

Requests are decoded off the event loop (the one image conversion of
`vitdeploy.images`), queued in the `Batcher` and answered from its batches. Every error
is a JSON `{"error": ...}` with a 4xx/5xx status and no traceback; a bad image is
refused before it is queued, so it never touches another request's batch.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vitdeploy import predictions
from vitdeploy.backends.base import Backend
from vitdeploy.backends.factory import model_input, open_backend
from vitdeploy.backends.graphs import power_of_two_buckets
from vitdeploy.errors import VitDeployError
from vitdeploy.explain import METHODS, class_index
from vitdeploy.manifest import MANIFEST, read_manifest, sha256_file
from vitdeploy.overlay import overlay_png
from vitdeploy.serve.batcher import Batcher, BatchStats, QueueFull
from vitdeploy.serve.config import ServeConfig
from vitdeploy.serve.decoder import Decoder
from vitdeploy.serve.explainer import ExplainBusy, Explainer
from vitdeploy.serve.metrics import Metrics

log = logging.getLogger("vitdeploy.serve")
OPEN_PATHS = ("/healthz", "/readyz", "/", "/favicon.ico", "/favicon.svg")  # no API key: liveness, readiness, the static page
RETRY_AFTER_S = "1"
CLIENT_CLOSED = 499  # counted in metrics for requests whose client went away (never sent)
T = TypeVar("T")


class ApiError(Exception):
    """An HTTP error answered as JSON."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


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


CHECKPOINT_MAX_BATCH = 1024  # a checkpoint served by PyTorch has no exported batch range; this bounds --max-batch


def model_description(config: ServeConfig) -> dict[str, Any]:
    """The manifest of an artifact folder, or, for the pytorch backend, the same description
    made from a training checkpoint (a run folder or a .pt file) without exporting it."""
    folder = Path(config.artifacts)
    if (folder / MANIFEST).is_file() or config.backend != "pytorch":
        return read_manifest(folder)
    from vitdeploy.checkpoint import load_checkpoint, resolve_checkpoint
    from vitdeploy.export.onnx_export import input_spec
    from vitdeploy.preprocess import Preprocessing

    path = resolve_checkpoint(folder)
    checkpoint = load_checkpoint(path)
    return {
        "model": {"name": checkpoint["model_name"], "num_classes": len(checkpoint["class_names"]),
                  "class_names": list(checkpoint["class_names"]),
                  "source_checkpoint": {"path": str(path.resolve()), "sha256": sha256_file(path)}},
        "preprocessing": checkpoint["preprocessing"],
        "input": input_spec(Preprocessing.from_dict(checkpoint["preprocessing"]), True),
        "batch": {"min": 1, "opt": 32, "max": CHECKPOINT_MAX_BATCH},
        "artifacts": [],
    }


def load_backend(config: ServeConfig, manifest: dict[str, Any]) -> Backend:
    """The served backend, activated and warmed up (first-call allocations, kernel choices)."""
    size: int = manifest["preprocessing"]["source_size"]
    buckets = power_of_two_buckets(config.max_batch) if config.cuda_graph else None
    backend = open_backend(config.artifacts, manifest, config.backend, config.precision, threads=config.threads,
                           checkpoint=config.checkpoint, cuda_graph=config.cuda_graph, graph_buckets=buckets,
                           say=log.warning)
    backend.activate()
    try:
        for n in buckets or sorted({1, config.max_batch}):  # with graphs, every bucket is captured and checked now
            backend.infer(model_input(manifest, np.zeros((n, 3, size, size), np.uint8), config.backend))
    except Exception as exc:  # noqa: BLE001 - each runtime raises its own types
        backend.deactivate()
        if isinstance(exc, VitDeployError):
            raise
        raise VitDeployError(f"the {config.backend} {config.precision} model failed on a warm-up batch "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                             "re-export it with `vitdeploy export`") from exc
    return backend


def create_app(config: ServeConfig) -> FastAPI:
    """The application for `config`, with its model loaded and warmed up.

    Loading happens here, before any server starts, so that a missing, damaged or refused
    model is one `error:` line and exit 1 rather than a failed server start-up. The
    lifespan starts the batcher and, at shutdown, answers what is queued and releases
    the backend.
    """
    manifest = model_description(config)
    config.check(manifest)
    classes: list[str] = manifest["model"]["class_names"]
    size: int = manifest["preprocessing"]["source_size"]
    metrics = Metrics()
    backend = load_backend(config, manifest)
    explainer, no_explainer = Explainer.open(config.artifacts, config.checkpoint, config.explain_queue,
                                             threads=None if config.backend == "pytorch" else 1)
    if explainer is None:
        log.warning("/v1/explain will answer 503: %s", no_explainer)
    state: dict[str, Any] = {"ready": False, "batcher": None, "in_flight": 0}
    decoder = Decoder(size)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        def infer(images: np.ndarray) -> np.ndarray:
            return backend.infer(model_input(manifest, images, config.backend))

        def on_batch(stats: BatchStats) -> None:
            metrics.batch_size.observe(stats.size)
            metrics.inference.observe(stats.seconds)
            metrics.images.inc(stats.size)

        batcher = Batcher(infer, config.max_batch, config.max_wait_ms, config.max_queue, on_batch)
        batcher.start()
        state.update(ready=True, batcher=batcher)
        log.info("ready: %s on %s %s", manifest["model"]["name"], config.backend, config.precision)
        try:
            yield
        finally:
            state["ready"] = False
            await batcher.close()  # answers everything still queued
            decoder.close()
            backend.deactivate()
            if explainer is not None:
                explainer.close()

    app = FastAPI(title="vitdeploy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own 404/405/...: the same {"error": ...} body as every other error."""
        return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)

    @app.middleware("http")
    async def _guard_and_measure(request: Request, call_next: Any) -> Response:
        start = time.perf_counter()
        path = request.url.path
        try:
            if config.api_key and path not in OPEN_PATHS and not _authorized(request, config.api_key):
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
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        return response

    if config.cors_origins:  # outermost: a browser's preflight is answered before the API-key check
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"])

    @asynccontextmanager
    async def admitted() -> AsyncIterator[None]:
        """Admission control: at most `max_queue` prediction requests are decoded or queued at once.

        Taken only once a request's body has arrived whole, so slow uploads (bounded by the
        server's read deadline) never hold a place that a complete request could use."""
        if state["in_flight"] >= config.max_queue:
            raise ApiError(503, f"server busy: {state['in_flight']} requests in progress (limit {config.max_queue}); "
                                "retry later", {"Retry-After": RETRY_AFTER_S})
        state["in_flight"] += 1
        metrics.in_flight.set(state["in_flight"])
        try:
            yield
        finally:
            state["in_flight"] -= 1
            metrics.in_flight.set(state["in_flight"])

    async def within_deadline(start: float, work: Awaitable[T]) -> T:
        """`work`, within what is left of --timeout-s for a request that reached the app at `start`: reading
        its body, decoding, queueing and inference all count."""
        left = config.timeout_s - (time.monotonic() - start)
        try:
            return await asyncio.wait_for(work, max(left, 0.001))
        except (asyncio.TimeoutError, TimeoutError):
            raise ApiError(504, f"no answer within {config.timeout_s:g} s") from None

    async def decode(items: list[tuple[str, bytes]]) -> list[np.ndarray]:
        images = []
        for name, data in items:
            try:
                images.append(await decoder.decode(data, name))
            except VitDeployError as exc:
                raise ApiError(400, str(exc)) from None
        return images

    async def predict_images(items: list[tuple[str, bytes]], top_k: int) -> list[dict[str, Any]]:
        return await predict_decoded(await decode(items), top_k)

    async def predict_decoded(images: list[np.ndarray], top_k: int) -> list[dict[str, Any]]:
        batcher: Batcher | None = state["batcher"]
        if batcher is None or not state["ready"]:
            raise ApiError(503, "the model is not loaded yet", {"Retry-After": RETRY_AFTER_S})
        try:
            futures = batcher.submit(images)
        except QueueFull as exc:
            raise ApiError(503, f"server busy: {exc}; retry later", {"Retry-After": RETRY_AFTER_S}) from None
        finally:
            metrics.queue_depth.set(batcher.depth)
        try:
            rows = await asyncio.gather(*futures)
        except asyncio.CancelledError:  # the request's deadline: its images leave the queue unanswered
            for future in futures:
                future.cancel()
            raise
        return [predictions.top_k(row, classes, top_k) for row in rows]

    @app.post("/v1/predict")
    async def predict(request: Request) -> dict[str, Any]:
        """One image: raw bytes as the body, or a multipart part named `file`."""
        start = time.monotonic()
        top_k = _top_k(request, len(classes))

        async def answer() -> dict[str, Any]:
            items = await _read_images(request, config, multiple=False)
            async with admitted():
                return {"model": manifest["model"]["name"], "predictions": (await predict_images(items, top_k))[0]}

        return await within_deadline(start, answer())

    @app.post("/v1/predict/batch")
    async def predict_batch(request: Request) -> dict[str, Any]:
        """Several images: multipart parts named `files` (or `file`), answered in order."""
        start = time.monotonic()
        top_k = _top_k(request, len(classes))

        async def answer() -> dict[str, Any]:
            items = await _read_images(request, config, multiple=True)
            async with admitted():
                results = await predict_images(items, top_k)
            return {"model": manifest["model"]["name"],
                    "results": [{"filename": name, "predictions": p} for (name, _), p in zip(items, results, strict=True)]}

        return await within_deadline(start, answer())

    @app.post("/v1/explain")
    async def explain(request: Request) -> Response:
        """Where the model looks for one image (body as for /v1/predict): the served backend's
        top-1 class (or ?class=NAME|INDEX) explained by the server's PyTorch copy of the model;
        ?method=rollout|grad-rollout; ?format=png for the overlay picture instead of JSON."""
        start = time.monotonic()
        if explainer is None:
            raise ApiError(503, no_explainer)
        if explainer.full():  # refused before the body is decoded or predicted
            raise ApiError(503, f"explainer busy: {explainer.pending} explanations in progress or waiting (limit "
                                f"{explainer.max_waiting}); retry later", {"Retry-After": RETRY_AFTER_S})
        fmt = request.query_params.get("format", "json")
        method = request.query_params.get("method", "rollout")
        if fmt not in ("json", "png"):
            raise ApiError(400, f"format must be json or png (got {fmt[:20]!r})")
        if method not in METHODS:
            raise ApiError(400, f"method must be {' or '.join(METHODS)} (got {method[:20]!r})")
        chosen = request.query_params.get("class")
        try:
            target = None if chosen is None else class_index(chosen, classes)
        except VitDeployError as exc:
            raise ApiError(400, str(exc).replace("--class", "class")) from None

        async def decoded_and_served() -> tuple[np.ndarray, dict[str, Any]]:
            items = await _read_images(request, config, multiple=False)
            async with admitted():
                image = (await decode(items))[0]
                return image, (await predict_decoded([image], 1))[0][0]

        image, served = await within_deadline(start, decoded_and_served())
        target = served["class_index"] if target is None else target
        try:
            record, heat, seconds = await explainer.explain(image, method, target)
        except ExplainBusy as exc:
            raise ApiError(503, f"explainer busy: {exc}; retry later", {"Retry-After": RETRY_AFTER_S}) from None
        metrics.explain_seconds.observe(seconds)
        if fmt == "png":
            return Response(overlay_png(image, heat), media_type="image/png")
        pytorch_top1 = record.pop("predictions")[0]
        return JSONResponse({
            "model": manifest["model"]["name"], **record,
            "served_top1": {**served, "backend": config.backend, "precision": config.precision},
            "pytorch_top1": pytorch_top1,
            "top1_differs": pytorch_top1["class_index"] != served["class_index"],
            "seconds": seconds,
        })

    @app.get("/favicon.svg")
    @app.get("/favicon.ico")
    async def favicon() -> Response:
        return Response(resources.files("vitdeploy.serve").joinpath("favicon.svg").read_bytes(), media_type="image/svg+xml",
                        headers={"Cache-Control": "max-age=86400"})

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.api_route("/readyz", methods=["GET", "HEAD"])
    async def readyz() -> JSONResponse:
        ready = state["ready"]
        return JSONResponse({"ready": ready}, 200 if ready else 503)

    @app.get("/v1/model")
    async def model_info() -> dict[str, Any]:
        return {
            "model": manifest["model"]["name"],
            "class_names": classes,
            "input": manifest["input"],
            "preprocessing": manifest["preprocessing"],
            "batch": manifest["batch"],
            "artifacts": [{k: a[k] for k in ("kind", "precision", "path", "sha256")} for a in manifest["artifacts"]],
            "backend": backend.describe(),
            "serving": {"max_batch": config.max_batch, "max_wait_ms": config.max_wait_ms, "max_queue": config.max_queue,
                        "max_body_bytes": config.max_body_bytes, "timeout_s": config.timeout_s,
                        "read_timeout_s": config.read_timeout_s, "write_timeout_s": config.write_timeout_s,
                        "cuda_graph": config.cuda_graph,
                        "explain": {"available": explainer is not None, "reason": no_explainer or None,
                                    "max_waiting": config.explain_queue, "methods": list(METHODS)}},
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        if state["batcher"] is not None:
            metrics.queue_depth.set(state["batcher"].depth)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("vitdeploy.serve").joinpath("page.html").read_text()

    return app


def _authorized(request: Request, key: str) -> bool:
    """The key from Authorization: Bearer or X-API-Key, compared in constant time as UTF-8 bytes
    (headers arrive as bytes; decoding them as Latin-1 would never match a non-ASCII key)."""
    headers = dict(request.scope["headers"])
    given = headers.get(b"x-api-key", b"")
    auth = headers.get(b"authorization", b"")
    if auth[:7].lower() == b"bearer ":
        given = auth[7:].strip()
    return hmac.compare_digest(given, key.encode("utf-8"))


def parse_count(raw: str, lo: int, hi: int) -> int | None:
    """An integer in lo..hi written in ASCII digits only (no signs, spaces or other scripts' digits), else None."""
    if not raw or len(raw) > 9 or not all("0" <= c <= "9" for c in raw):
        return None
    value = int(raw)
    return value if lo <= value <= hi else None


def _top_k(request: Request, num_classes: int) -> int:
    raw = request.query_params.get("top_k", "5")
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
