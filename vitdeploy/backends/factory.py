"""Backends by name (see `registry`), opened on an artifact folder's manifest."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitdeploy import tome as tomes
from vitdeploy.backends import registry
from vitdeploy.backends.base import Backend, OpenRequest
from vitdeploy.errors import VitDeployError
from vitdeploy.manifest import find_artifact, input_spec
from vitdeploy.preprocess import Preprocess, Preprocessing


def open_backend(folder: Path, manifest: dict[str, Any], name: str, precision: str = "fp32", threads: int | None = None,
                 compile: bool = False, checkpoint: Path | None = None, cuda_graph: bool = False,
                 graph_buckets: tuple[int, ...] | None = None, say: Callable[[str], None] = print,
                 tome: int | tuple[int, ...] | None = None) -> Backend:
    """The backend `name` for the artifact of `precision` in `folder` (not yet activated); the
    options are those of `OpenRequest`. A precision the backend does not run, or an artifact the
    folder lacks, is refused here with what to do instead."""
    folder = Path(folder)
    entry = registry.get(name)
    registry.check_cuda_graph(name, cuda_graph)
    if precision not in entry.precisions_here():
        raise VitDeployError(entry.why_not(precision))
    artifact = served_artifact(manifest, name, precision, tome)
    if artifact is None and entry.kind != "checkpoint":
        merged = f" merging tokens with r={tomes.label_of(tome)}" if tome is not None else ""
        raise VitDeployError(f"{folder} has no {entry.kind} {precision} artifact{merged} (it has: "
                             f"{describe_artifacts(manifest)}); {missing_hint(entry.kind, precision, tome)}")
    return entry.open(OpenRequest(folder, manifest, precision, artifact, threads, compile, checkpoint, cuda_graph,
                                  graph_buckets, say, tome))


def served_artifact(manifest: dict[str, Any], name: str, precision: str,
                    tome: int | tuple[int, ...] | None = None) -> dict[str, Any] | None:
    """The manifest's record of the file backend `name` runs at `precision` (merging tokens by `tome`);
    None for the pytorch backend (it runs the training checkpoint) or when the folder lacks it."""
    entry = registry.get(name)
    return None if entry.kind == "checkpoint" else find_artifact(manifest, entry.kind, precision, entry.int8_target,
                                                                 tomes.label_of(tome))


def served_input(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    """The input contract of backend `name` (what `model_input` hands it): the manifest's, except for the
    pytorch backend, which takes raw uint8 images at the source size whatever the export's graphs take."""
    if registry.get(name).kind == "checkpoint":
        return input_spec(Preprocessing.from_dict(manifest["preprocessing"]), True)
    return manifest["input"]


def describe_artifacts(manifest: dict[str, Any]) -> str:
    """The manifest's artifacts in one line, each named so that two INT8 graphs are told apart."""
    return ", ".join(f"{a['kind']} {a['precision']}" + (f" ({a['int8']['target']} graph)" if "int8" in a else "")
                     + (f" r={a['tome']['label']}" if "tome" in a else "") + f" = {a['path']}" for a in manifest["artifacts"])


def missing_hint(kind: str, precision: str, tome: int | tuple[int, ...] | None = None) -> str:
    """What to do when the artifact a backend needs is not in the folder (open_backend, bench)."""
    if tome is not None and kind != "tensorrt":
        flag = {"fp16": " --fp16", "int8": " --int8"}.get(precision, "")
        return f"re-export with --tome {','.join(tomes.label_of(tome).split('-'))}{flag}, or use --backend pytorch, which merges tokens itself"
    if kind == "tensorrt":
        from vitdeploy.tensorrt_runtime import import_tensorrt

        try:
            import_tensorrt()
        except VitDeployError as exc:
            return f"none can be built here ({exc}); use an ONNX backend such as --backend ort-cpu"
        return "re-export with --trt"
    return {"fp16": "re-export with --fp16", "int8": "re-export with --int8"}.get(precision, "re-export")


def model_input(manifest: dict[str, Any], images: np.ndarray, backend: str) -> np.ndarray:
    """uint8 images as the backend expects them: unchanged when preprocessing is in the graph
    (and always for pytorch, which preprocesses itself), else preprocessed to float32."""
    if registry.get(backend).kind == "checkpoint" or manifest["input"]["preprocessing_in_graph"]:
        return images
    with torch.no_grad():
        return _host_preprocess(Preprocessing.from_dict(manifest["preprocessing"]))(torch.from_numpy(images)).numpy()


@functools.lru_cache(maxsize=4)
def _host_preprocess(preprocessing: Preprocessing) -> Preprocess:
    return Preprocess(preprocessing)
