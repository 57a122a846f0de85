"""ONNX Runtime backends: `ort-cpu`, and `ort-cuda`, which refuses to run if the session
silently fell back to the CPU and feeds the session through I/O binding to device buffers
(torch CUDA tensors), so that copies are explicit and device mode copies nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch  # imported before onnxruntime: loads the CUDA libraries from the torch wheels before onnxruntime looks for them

from vitdeploy.backends.base import Backend
from vitdeploy.errors import VitDeployError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def _ort():  # noqa: ANN202 - the module
    try:
        import onnxruntime
    except ImportError as exc:
        raise VitDeployError("onnxruntime is not installed; pip install onnxruntime-gpu (or onnxruntime)") from exc
    return onnxruntime


def session_options(threads: int | None = None, optimization: str = "all") -> Any:
    """Session options: graph optimization level ('basic', 'extended', 'all') and intra-op threads."""
    ort = _ort()
    options = ort.SessionOptions()
    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options.graph_optimization_level = levels[optimization]
    if threads:
        options.intra_op_num_threads = threads
    return options


class OrtBackend(Backend):
    """An InferenceSession on one ONNX file with one execution provider."""

    def __init__(self, onnx_path: Path, device: str = "cpu", threads: int | None = None, optimization: str = "all",
                 input_name: str = "input", output_name: str = "logits", precision: str = "fp32",
                 max_batch: int | None = None) -> None:
        if device not in PROVIDERS:
            raise VitDeployError(f"unknown ONNX Runtime device {device!r}; use cpu or cuda")
        self.name = f"ort-{device}"
        self.onnx_path = Path(onnx_path)
        self.device = device
        self.threads = threads
        self.optimization = optimization
        self.input_name, self.output_name = input_name, output_name
        self.precision = precision
        self.max_batch = max_batch
        self.device_mode = device == "cuda"
        self.session = None
        self.num_classes = 0

    def activate(self) -> None:
        ort = _ort()
        provider = PROVIDERS[self.device]
        if provider not in ort.get_available_providers():
            raise VitDeployError(f"ONNX Runtime {ort.__version__} here has no {provider}; install onnxruntime-gpu on a CUDA machine")
        try:
            self.session = ort.InferenceSession(
                str(self.onnx_path), sess_options=session_options(self.threads, self.optimization), providers=[provider]
            )
        except Exception as exc:  # ORT raises its own exception types
            raise VitDeployError(f"ONNX Runtime could not load {self.onnx_path.name}: {str(exc).splitlines()[0]}") from exc
        if self.session.get_providers()[0] != provider:
            used = ", ".join(self.session.get_providers())
            self.session = None
            raise VitDeployError(
                f"ONNX Runtime fell back to {used} instead of {provider} (CUDA libraries missing or no GPU); "
                "the ort-cuda numbers would be CPU numbers, so nothing was run"
            )
        self.num_classes = int(self.session.get_outputs()[0].shape[1])

    def _check(self, images: np.ndarray) -> None:
        if self.session is None:
            raise RuntimeError("activate() the backend first")
        if self.max_batch is not None and len(images) > self.max_batch:
            raise VitDeployError(f"batch of {len(images)} exceeds the exported maximum {self.max_batch}; re-export with a larger --max-batch")

    def infer(self, images: np.ndarray) -> np.ndarray:
        if self.device == "cpu":
            self._check(images)
            return self.session.run([self.output_name], {self.input_name: images})[0]
        binding, _, out = self.stage(images)  # checks the batch
        self.session.run_with_iobinding(binding)
        return out.cpu().numpy()

    def stage(self, images: np.ndarray) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """An I/O binding whose input and output are CUDA buffers (the tensors are kept alive with it)."""
        self._check(images)
        x = torch.from_numpy(np.ascontiguousarray(images)).to("cuda")
        out = torch.empty((len(images), self.num_classes), dtype=torch.float32, device="cuda")
        torch.cuda.current_stream().synchronize()  # the input is on the device before ONNX Runtime's stream reads it
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", x.device.index or 0, images.dtype, tuple(x.shape), x.data_ptr())
        binding.bind_output(self.output_name, "cuda", out.device.index or 0, np.float32, tuple(out.shape), out.data_ptr())
        return binding, x, out

    def run_staged(self, staged: tuple[Any, torch.Tensor, torch.Tensor]) -> None:
        self.session.run_with_iobinding(staged[0])  # returns when the CUDA work has finished

    def deactivate(self) -> None:
        self.session = None

    def describe(self) -> dict[str, Any]:
        ort = _ort()
        return {"name": self.name, "device": self.device, "precision": self.precision, "onnxruntime": ort.__version__,
                "threads": self.threads, "graph_optimization": self.optimization, "model": self.onnx_path.name}
