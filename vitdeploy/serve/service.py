"""What `vitdeploy serve` does, without HTTP: the loaded model and its explicit state
(ready, the batcher, requests admitted), and the four jobs a request needs: decode,
admit, predict, explain. The FastAPI routes in `app` only translate HTTP to these calls
and their `ApiError`s back to responses, so this class is what the server tests exercise
and what another protocol front end would reuse.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import numpy as np

from vitdeploy import predictions, triton_model
from vitdeploy import tome as tomes
from vitdeploy.backends import registry
from vitdeploy.backends.base import Backend
from vitdeploy.backends.factory import model_input, open_backend, served_artifact, served_input
from vitdeploy.backends.graphs import power_of_two_buckets
from vitdeploy.choices import EXPLAIN_METHODS
from vitdeploy.errors import VitDeployError
from vitdeploy.images import Fit
from vitdeploy.manifest import read_or_describe, tome_label
from vitdeploy.preprocess import Preprocessing
from vitdeploy.serve.batcher import Batcher, BatchStats, QueueFull, Row
from vitdeploy.serve.config import ServeConfig
from vitdeploy.serve.decoder import Decoder
from vitdeploy.serve.explainer import ExplainBusy, Explainer
from vitdeploy.serve.metrics import Metrics
from vitdeploy.serve.stats import ModelStats

log = logging.getLogger("vitdeploy.serve")
RETRY_AFTER_S = "1"
CHECKPOINT_MAX_BATCH = 1024  # a checkpoint served by PyTorch has no exported batch range; this bounds --max-batch
T = TypeVar("T")


class ApiError(Exception):
    """An error answered over HTTP as JSON `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def busy(message: str) -> ApiError:
    return ApiError(503, message, {"Retry-After": RETRY_AFTER_S})


def parse_count(raw: str, lo: int, hi: int) -> int | None:
    """An integer in lo..hi written in ASCII digits only (no signs, spaces or other scripts' digits), else None."""
    if not raw or len(raw) > 9 or not all("0" <= c <= "9" for c in raw):
        return None
    value = int(raw)
    return value if lo <= value <= hi else None


def model_description(config: ServeConfig) -> dict[str, Any]:
    """The manifest of an artifact folder, or, for the pytorch backend, the same description
    made from a training checkpoint (a run folder or a .pt file) without exporting it."""
    return read_or_describe(config.artifacts, allow_checkpoint=config.backend == "pytorch",
                            max_batch=CHECKPOINT_MAX_BATCH)


def load_backend(config: ServeConfig, manifest: dict[str, Any]) -> Backend:
    """The served backend, activated and warmed up (first-call allocations, kernel choices)."""
    size: int = manifest["preprocessing"]["source_size"]
    buckets = power_of_two_buckets(config.max_batch) if config.cuda_graph else None
    backend = open_backend(config.artifacts, manifest, config.backend, config.precision, threads=config.threads,
                           checkpoint=config.checkpoint, cuda_graph=config.cuda_graph, graph_buckets=buckets,
                           say=log.warning, tome=config.tome)
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


class Service:
    """The served model: built (loaded, warmed up) by `open`, started and closed by the server's lifespan."""

    def __init__(self, config: ServeConfig, manifest: dict[str, Any], backend: Backend, explainer: Explainer | None,
                 no_explainer: str) -> None:
        self.config, self.manifest, self.backend = config, manifest, backend
        self.explainer, self.no_explainer = explainer, no_explainer
        self.classes: list[str] = manifest["model"]["class_names"]
        self.model_name: str = manifest["model"]["name"]
        self.metrics = Metrics()
        self.stats = ModelStats()
        self.input = served_input(manifest, config.backend)  # what the batcher's rows are
        artifact = served_artifact(manifest, config.backend, config.precision, config.tome)
        self.triton_name = triton_model.model_name(self.model_name, artifact, tomes.label_of(config.tome))
        self.triton_config = triton_model.model_config(
            self.triton_name, triton_model.PLATFORMS[registry.get(config.backend).kind], config.max_batch, [self.input],
            [manifest["output"]], triton_model.parameters(artifact, config.precision),
            max_queue_delay_us=round(config.max_wait_ms * 1000))
        self.decoder = Decoder(Fit.of(Preprocessing.from_dict(manifest["preprocessing"])))
        self.batcher: Batcher | None = None
        self.ready = False
        self.in_flight = 0

    @classmethod
    def open(cls, config: ServeConfig) -> Service:
        """Load the model before any server starts: a missing, damaged or refused model is one
        `error:` line and exit 1 rather than a failed server start-up."""
        manifest = model_description(config)
        config.check(manifest)
        backend = load_backend(config, manifest)
        if config.tome is not None:  # its tokens hold several patches each: the explainer's maps are of the unmerged model
            explainer, no_explainer = None, ("explanations are not available for a model that merges tokens (--tome): "
                                             "attention maps need one token per patch; serve without --tome to explain")
        else:
            explainer, no_explainer = Explainer.open(config.artifacts, config.checkpoint, config.explain_queue,
                                                     threads=None if config.backend == "pytorch" else 1)
        if explainer is None:
            log.warning("/v1/explain will answer 503: %s", no_explainer)
        return cls(config, manifest, backend, explainer, no_explainer)

    def start(self) -> None:
        config = self.config
        self.batcher = Batcher(self._infer, config.max_batch, config.max_wait_ms, config.max_queue, self._on_batch)
        self.batcher.start()
        self.ready = True
        log.info("ready: %s on %s %s; Open Inference Protocol: /v2/models/%s", self.model_name, config.backend,
                 config.precision, self.triton_name)

    async def close(self) -> None:
        """Answer everything still queued, then release the backend, decoder and explainer."""
        self.ready = False
        if self.batcher is not None:
            await self.batcher.close()
        self.decoder.close()
        self.backend.deactivate()
        if self.explainer is not None:
            self.explainer.close()

    def _infer(self, rows: np.ndarray) -> np.ndarray:
        return self.backend.infer(rows)

    def _on_batch(self, stats: BatchStats) -> None:
        self.metrics.batch_size.observe(stats.size)
        self.metrics.inference.observe(stats.seconds)
        self.metrics.images.inc(stats.size)
        self.stats.batch(stats)

    @asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        """Admission control: at most `max_queue` prediction requests are decoded or queued at once.

        Taken only once a request's body has arrived whole, so slow uploads (bounded by the
        server's read deadline) never hold a place that a complete request could use."""
        if self.in_flight >= self.config.max_queue:
            raise busy(f"server busy: {self.in_flight} requests in progress (limit {self.config.max_queue}); retry later")
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)

    async def within_deadline(self, start: float, work: Awaitable[T]) -> T:
        """`work`, within what is left of --timeout-s for a request that reached the app at `start`: reading
        its body, decoding, queueing and inference all count."""
        left = self.config.timeout_s - (time.monotonic() - start)
        try:
            return await asyncio.wait_for(work, max(left, 0.001))
        except (asyncio.TimeoutError, TimeoutError):
            raise ApiError(504, f"no answer within {self.config.timeout_s:g} s") from None

    async def decode(self, items: list[tuple[str, bytes]]) -> list[np.ndarray]:
        """Each (name, bytes) as an image at the model's source size; a bad image is a 400 naming it."""
        images = []
        for name, data in items:
            try:
                images.append(await self.decoder.decode(data, name))
            except VitDeployError as exc:
                raise ApiError(400, str(exc)) from None
        return images

    async def predict(self, items: list[tuple[str, bytes]], top_k: int) -> list[dict[str, Any]]:
        return await self.predict_decoded(await self.decode(items), top_k)

    async def predict_decoded(self, images: list[np.ndarray], top_k: int) -> list[dict[str, Any]]:
        """Top-k of each decoded image."""
        return [predictions.top_k(row, self.classes, top_k) for row in await self.infer_images(images)]

    async def infer_images(self, images: list[np.ndarray]) -> np.ndarray:
        """Logits of uint8 images at the source size, preprocessed on a worker thread when the served
        graph takes float32 input."""
        if self.input["dtype"] != "uint8":
            images = list(await asyncio.to_thread(model_input, self.manifest, np.stack(images), self.config.backend))
        return await self.infer_rows(images)

    async def infer_rows(self, rows: list[np.ndarray]) -> np.ndarray:
        """Logits (one row each) of inputs in the served input contract, from the batcher; a request whose
        deadline passes takes its rows out of the queue."""
        batcher = self.batcher
        if batcher is None or not self.ready:
            raise busy("the model is not loaded yet")
        try:
            futures = batcher.submit(rows)
        except QueueFull as exc:
            raise busy(f"server busy: {exc}; retry later") from None
        finally:
            self.metrics.queue_depth.set(batcher.depth)
        start = time.perf_counter()
        try:
            answered: list[Row] = await asyncio.gather(*futures)
        except BaseException:  # cancelled (deadline, client gone) or the backend failed
            for future in futures:
                future.cancel()
            self.stats.failed(time.perf_counter() - start)
            raise
        gathered = time.perf_counter()
        logits = np.stack([row.logits for row in answered])
        done = time.perf_counter()
        self.stats.answered(answered, done - start, done - gathered)
        return logits

    def check_explainer(self) -> Explainer:
        """The explainer, or 503 before the body is read or decoded (off, or too many waiting)."""
        if self.explainer is None:
            raise ApiError(503, self.no_explainer)
        if self.explainer.full():
            raise busy(f"explainer busy: {self.explainer.pending} explanations in progress or waiting (limit "
                       f"{self.explainer.max_waiting}); retry later")
        return self.explainer

    async def explain(self, image: np.ndarray, served: dict[str, Any], method: str,
                      target: int | None) -> tuple[dict[str, Any], np.ndarray]:
        """(the JSON answer, the heat map) for `image`, whose served top-1 is `served`; `target` None
        explains that class."""
        explainer = self.check_explainer()  # None or full: checked again, since the body took time to arrive
        target = served["class_index"] if target is None else target
        try:
            record, heat, seconds = await explainer.explain(image, method, target)
        except ExplainBusy as exc:
            raise busy(f"explainer busy: {exc}; retry later") from None
        self.metrics.explain_seconds.observe(seconds)
        pytorch_top1 = record.pop("predictions")[0]
        return {
            "model": self.model_name, **record,
            "served_top1": {**served, "backend": self.config.backend, "precision": self.config.precision},
            "pytorch_top1": pytorch_top1,
            "top1_differs": pytorch_top1["class_index"] != served["class_index"],
            "seconds": seconds,
        }, heat

    def describe(self) -> dict[str, Any]:
        """What /v1/model answers: the model, its input contract, the backend and the serving settings."""
        config, manifest = self.config, self.manifest
        return {
            "model": self.model_name,
            "class_names": self.classes,
            "input": manifest["input"],
            "preprocessing": manifest["preprocessing"],
            "batch": manifest["batch"],
            "artifacts": [{**{k: a[k] for k in ("kind", "precision", "path", "sha256")}, "tome": tome_label(a)}
                          for a in manifest["artifacts"]],
            "backend": self.backend.describe(),
            "open_inference_protocol": {"model": self.triton_name, "version": triton_model.VERSION,
                                        "infer": f"/v2/models/{self.triton_name}/infer", "input": self.input},
            "serving": {"max_batch": config.max_batch, "max_wait_ms": config.max_wait_ms, "max_queue": config.max_queue,
                        "max_body_bytes": config.max_body_bytes, "timeout_s": config.timeout_s,
                        "read_timeout_s": config.read_timeout_s, "write_timeout_s": config.write_timeout_s,
                        "cuda_graph": config.cuda_graph,
                        "explain": {"available": self.explainer is not None, "reason": self.no_explainer or None,
                                    "max_waiting": config.explain_queue, "methods": list(EXPLAIN_METHODS)}},
        }
