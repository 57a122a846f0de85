"""Backends by name, built from an artifact folder's manifest."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitdeploy.backends.base import Backend
from vitdeploy.errors import VitDeployError
from vitdeploy.manifest import artifact_path, find_artifact, recorded_checkpoint
from vitdeploy.preprocess import Preprocess, Preprocessing
from vitdeploy.tensorrt_runtime import default_profiles
from vitdeploy.versions import cpu_flags

BACKENDS = ("pytorch", "ort-cpu", "ort-cuda", "ort-trt", "trt")


GRAPH_BACKENDS = ("pytorch", "ort-cuda", "trt")


def check_cuda_graph(name: str, cuda_graph: bool) -> None:
    """Refuse --cuda-graph for a backend that cannot replay graphs here (before anything is loaded)."""
    if cuda_graph and (name not in GRAPH_BACKENDS or (name == "pytorch" and not torch.cuda.is_available())):
        where = "runs on the CPU here" if name == "pytorch" else "is not one of them"
        raise VitDeployError(f"--cuda-graph is for the GPU backends {', '.join(GRAPH_BACKENDS)}; {name} {where}")


def open_backend(folder: Path, manifest: dict[str, Any], name: str, precision: str = "fp32", threads: int | None = None,
                 compile: bool = False, checkpoint: Path | None = None, cuda_graph: bool = False,
                 graph_buckets: tuple[int, ...] | None = None, say: Callable[[str], None] = print) -> Backend:
    """The backend `name` for the artifact of `precision` in `folder` (not yet activated).

    `threads` sets the CPU threads of ort-cpu (intra-op) and of pytorch on the CPU;
    `checkpoint` overrides where the pytorch backend finds the training checkpoint;
    `cuda_graph` replays CUDA graphs per batch-size bucket (`graph_buckets`, or each batch
    size when None) on the GPU backends, saying through `say` where a graph cannot be used.
    """
    folder = Path(folder)
    if name not in BACKENDS:
        raise VitDeployError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    graphs = {"cuda_graph": cuda_graph, "graph_buckets": graph_buckets, "say": say}
    check_cuda_graph(name, cuda_graph)
    if name == "pytorch":
        return _pytorch(manifest, precision, threads, compile, checkpoint, graphs)
    if name == "ort-cuda" and precision == "int8":
        raise VitDeployError("ort-cuda does not run INT8: ONNX Runtime's CUDA provider runs these quantized graphs no "
                             "faster than fp16; use ort-cpu, ort-trt or trt for INT8, or ort-cuda with fp16")
    kind = "tensorrt" if name == "trt" else "onnx"
    artifact = find_artifact(manifest, kind, precision, name)
    if artifact is None:
        raise VitDeployError(f"{folder} has no {kind} {precision} artifact (it has: {describe_artifacts(manifest)}); "
                             f"{_missing_hint(name, kind, precision)}")
    if name == "trt":
        from vitdeploy.backends.trt import TrtBackend

        return TrtBackend(artifact_path(folder, artifact), artifact, **graphs)
    from vitdeploy.backends.ort import OrtBackend

    if name == "ort-cpu" and precision == "int8":
        required = artifact["int8"].get("cpu_int8_flags") or []
        if required and not (cpu_flags() & set(required)):
            say(f"warning: the INT8 graph was chosen for a CPU with {', '.join(required)}, which this CPU lacks: it runs, "
                "but may be slower than fp32 here (re-export with --int8 on this kind of CPU)")

    engine = find_artifact(manifest, "tensorrt", precision, name)
    profiles = engine["profiles"] if engine is not None else [
        {"min": lo, "opt": opt, "max": hi} for lo, opt, hi in default_profiles(manifest["batch"]["min"], manifest["batch"]["max"])]
    return OrtBackend(artifact_path(folder, artifact), name.split("-")[1], threads=threads, precision=precision,
                      max_batch=manifest["batch"]["max"], trt_profiles=profiles, input_shape=manifest["input"]["shape"], **graphs)


def describe_artifacts(manifest: dict[str, Any]) -> str:
    """The manifest's artifacts in one line, each named so that two INT8 graphs are told apart."""
    return ", ".join(f"{a['kind']} {a['precision']}" + (f" ({a['int8']['target']} graph)" if "int8" in a else "")
                     + f" = {a['path']}" for a in manifest["artifacts"])


def _missing_hint(name: str, kind: str, precision: str) -> str:
    """What to do when the artifact `name` needs is not in the folder."""
    if precision == "bf16":
        return "bf16 runs only on --backend pytorch (with a GPU); the exported files are fp32, fp16 or int8"
    if kind == "tensorrt":
        from vitdeploy.tensorrt_runtime import import_tensorrt

        try:
            import_tensorrt()
        except VitDeployError as exc:
            return f"none can be built here ({exc}); use an ONNX backend such as --backend ort-cpu"
        return "re-export with --trt"
    return {"fp16": "re-export with --fp16", "int8": "re-export with --int8"}.get(precision, "re-export")


def _pytorch(manifest: dict[str, Any], precision: str, threads: int | None, compile: bool, checkpoint: Path | None,
             graphs: dict[str, Any]) -> Backend:
    from vitdeploy.backends.pytorch import TorchBackend
    from vitdeploy.checkpoint import load_checkpoint
    from vitdeploy.models import model_from_checkpoint

    path = recorded_checkpoint(manifest, checkpoint, "the pytorch backend needs the training weights")
    state = load_checkpoint(path)
    _spec, model = model_from_checkpoint(state, str(path))
    device = "cuda" if precision != "fp32" or torch.cuda.is_available() else "cpu"
    if precision == "int8":
        raise VitDeployError("the pytorch backend has no INT8 path; INT8 runs on ort-cpu, ort-trt and trt "
                             "(--backend ort-cpu --precision int8)")
    if precision != "fp32" and not torch.cuda.is_available():
        raise VitDeployError(f"the pytorch backend in {precision} needs a CUDA GPU; use --precision fp32 here")
    if threads and device == "cpu":
        torch.set_num_threads(threads)
    return TorchBackend(model, Preprocessing.from_dict(manifest["preprocessing"]), device, precision, compile, **graphs)


def model_input(manifest: dict[str, Any], images: np.ndarray, backend: str) -> np.ndarray:
    """uint8 images as the backend expects them: unchanged when preprocessing is in the graph
    (and always for pytorch, which preprocesses itself), else preprocessed to float32."""
    if backend == "pytorch" or manifest["input"]["preprocessing_in_graph"]:
        return images
    with torch.no_grad():
        return _host_preprocess(Preprocessing.from_dict(manifest["preprocessing"]))(torch.from_numpy(images)).numpy()


@functools.lru_cache(maxsize=4)
def _host_preprocess(preprocessing: Preprocessing) -> Preprocess:
    return Preprocess(preprocessing)
