"""The `openvino` backend: OpenVINO's CPU plugin on the exported ONNX files (fp32, the fp16
graph, and the symmetric Q/DQ INT8 graph made for TensorRT, which OpenVINO runs with INT8
kernels).

OpenVINO chooses its own inference precision by default (bf16 on CPUs with AVX512_BF16 or
AMX, so an "fp32" run would silently be a bf16 one); this backend sets f32, checks that
the compiled model kept it, and records it with the number of layers that run in INT8.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.backends.base import Backend, OpenRequest
from vitdeploy.errors import VitDeployError
from vitdeploy.manifest import artifact_path

DEVICE = "CPU"
INFERENCE_PRECISION = "f32"  # what every layer that is not quantized computes in
INT8_PRECISIONS = ("i8", "u8")  # runtime precisions of layers that run with INT8 kernels
WEIGHTED_LAYERS = ("FullyConnected", "MatMul", "Convolution")  # the compiled layers that carry the arithmetic


def _openvino():  # noqa: ANN202 - the module
    try:
        import openvino
    except ImportError as exc:
        raise VitDeployError("OpenVINO is not installed; pip install openvino (or 'vitdeploy[openvino]')") from exc
    return openvino


def probe(_entry: Any) -> tuple[bool, str]:
    """Usable where OpenVINO imports and lists its CPU device."""
    try:
        ov = _openvino()
    except VitDeployError as exc:
        return False, str(exc)
    devices = ov.Core().available_devices
    if DEVICE not in devices:
        return False, f"OpenVINO {ov.__version__} has no {DEVICE} device (it has: {', '.join(devices) or 'none'})"
    return True, f"OpenVINO {ov.__version__} on the CPU"


def open_for(_entry: Any, request: OpenRequest) -> OpenVinoBackend:
    return OpenVinoBackend(artifact_path(request.folder, request.artifact), request.precision, request.threads,
                           request.manifest["batch"]["max"])


class OpenVinoBackend(Backend):
    """One compiled model with one infer request (latency hint: one stream), inputs and outputs on the host."""

    name = "openvino"

    def __init__(self, onnx_path: Path, precision: str = "fp32", threads: int | None = None,
                 max_batch: int | None = None) -> None:
        self.onnx_path = Path(onnx_path)
        self.precision = precision
        self.threads = threads
        self.max_batch = max_batch
        self.compiled = self.request = None
        self.version = ""
        self.int8_layers = self.weighted_layers = 0

    def activate(self) -> None:
        ov = _openvino()
        self.version = ov.__version__
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION, "PERFORMANCE_HINT": "LATENCY"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        core = ov.Core()
        try:
            self.compiled = core.compile_model(core.read_model(str(self.onnx_path)), DEVICE, config)
        except Exception as exc:  # OpenVINO raises RuntimeError and its own types
            raise VitDeployError(f"OpenVINO could not load {self.onnx_path.name}: {str(exc).splitlines()[0][:300]}; "
                                 "re-export the folder with `vitdeploy export`, or use --backend ort-cpu") from exc
        kept = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if kept != INFERENCE_PRECISION:
            self.compiled = None
            raise VitDeployError(f"OpenVINO compiled {self.onnx_path.name} for inference precision {kept}, not "
                                 f"{INFERENCE_PRECISION}; its numbers would not be {self.precision}, so nothing was run "
                                 "(use --backend ort-cpu, or an OpenVINO release that honours INFERENCE_PRECISION_HINT)")
        self.int8_layers, self.weighted_layers = _layer_precisions(self.compiled)
        if self.precision == "int8" and self.int8_layers == 0:
            self.compiled = None
            raise VitDeployError(f"OpenVINO runs no layer of {self.onnx_path.name} in INT8 here, so its numbers would "
                                 "not be INT8 ones; nothing was run (use --backend ort-cpu --precision int8)")
        self.request = self.compiled.create_infer_request()

    def active(self) -> bool:
        return self.request is not None

    def _infer_eager(self, images: np.ndarray) -> np.ndarray:
        self.request.infer({0: np.ascontiguousarray(images)})
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32)

    def deactivate(self) -> None:
        self.compiled = self.request = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "device": "cpu", "precision": self.precision, "openvino": self.version,
                "threads": self.threads, "inference_precision": INFERENCE_PRECISION, "int8_layers": self.int8_layers,
                "weighted_layers": self.weighted_layers, "model": self.onnx_path.name}


def _layer_precisions(compiled: Any) -> tuple[int, int]:
    """(layers running INT8 kernels, all weighted layers) of a compiled model, read from the runtime
    graph OpenVINO reports (what it runs, not what the ONNX file asks for)."""
    int8 = weighted = 0
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in WEIGHTED_LAYERS:
            weighted += 1
            int8 += info["runtimePrecision"].astype(str) in INT8_PRECISIONS
    return int8, weighted
