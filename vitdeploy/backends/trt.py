"""The TensorRT backend: a deserialized engine run with execute_async_v3 on its own CUDA
stream, device buffers held as torch CUDA tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitdeploy.backends.base import Backend
from vitdeploy.errors import VitDeployError
from vitdeploy.tensorrt_runtime import deserialize, import_tensorrt


class TrtBackend(Backend):
    """One engine, one execution context, profile 0; inputs copied in and logits out on the same stream."""

    name = "trt"
    device_mode = True

    def __init__(self, engine_path: Path, record: dict[str, Any], input_name: str = "input", output_name: str = "logits") -> None:
        self.engine_path = Path(engine_path)
        self.record = record
        self.input_name, self.output_name = input_name, output_name
        self.engine = self.context = self.stream = None

    def activate(self) -> None:
        if not torch.cuda.is_available():
            raise VitDeployError("the trt backend needs a CUDA GPU; PyTorch sees none here")
        trt = import_tensorrt()
        self.engine = deserialize(trt, self.engine_path.read_bytes(), self.record)
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()

    def stage(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch on the device and an output buffer of the engine's shape for it."""
        if self.context is None:
            raise RuntimeError("activate() the backend first")
        with torch.cuda.stream(self.stream):
            x = torch.from_numpy(np.ascontiguousarray(images)).to("cuda", non_blocking=True)
            self._set_shape(tuple(x.shape))
            out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=torch.float32, device="cuda")
        self.stream.synchronize()
        return x, out

    def _set_shape(self, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(self.input_name, shape):
            raise VitDeployError(
                f"batch shape {shape} is outside the engine's profile {self.record['profile']}; "
                "re-export with a wider --min-batch/--max-batch"
            )

    def _execute(self, x: torch.Tensor, out: torch.Tensor) -> None:
        self._set_shape(tuple(x.shape))
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise VitDeployError("TensorRT execution failed (see its log above)")

    def infer(self, images: np.ndarray) -> np.ndarray:
        x, out = self.stage(images)
        with torch.cuda.stream(self.stream):
            self._execute(x, out)
            result = out.cpu()  # copied on the engine's stream, then synchronized
        return result.numpy()

    def run_staged(self, staged: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._execute(*staged)
        self.stream.synchronize()

    def deactivate(self) -> None:
        self.context = self.engine = self.stream = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "device": self.record.get("gpu"), "precision": self.record.get("precision"),
                "tensorrt": self.record.get("tensorrt_version")}
