"""The TensorRT backend: a deserialized engine run with execute_async_v3 on its own CUDA
stream, device buffers held as torch CUDA tensors.

An engine may hold several optimization profiles (say 1:1:1 for latency and 2:32:256 for
throughput). One execution context per profile is created once, bound to its profile,
and all of them share one device-memory block sized for the largest (USER_MANAGED
allocation), since one backend never runs two at once. Each batch runs on the context of
the narrowest profile that holds it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitdeploy.backends.base import Backend
from vitdeploy.errors import VitDeployError
from vitdeploy.tensorrt_runtime import choose_profile, deserialize, import_tensorrt


class TrtBackend(Backend):
    """One engine, one execution context per optimization profile, one stream."""

    name = "trt"
    device_mode = True

    def __init__(self, engine_path: Path, record: dict[str, Any], input_name: str = "input", output_name: str = "logits",
                 stream_factory: Callable[[], Any] | None = None, allocate: Callable[[int], Any] | None = None) -> None:
        self.engine_path = Path(engine_path)
        self.record = record
        self.profiles: list[dict[str, int]] = list(record["profiles"])
        self.input_name, self.output_name = input_name, output_name
        self.stream_factory = stream_factory or torch.cuda.Stream
        self.allocate = allocate or (lambda size: torch.empty(max(size, 1), dtype=torch.uint8, device="cuda"))
        self.engine = self.stream = self.memory = None
        self.contexts: list[Any] = []
        self.last_profile: int | None = None

    def activate(self) -> None:
        if self.stream_factory is torch.cuda.Stream and not torch.cuda.is_available():
            raise VitDeployError("the trt backend needs a CUDA GPU; PyTorch sees none here")
        trt = import_tensorrt()
        self.engine = deserialize(trt, self.engine_path.read_bytes(), self.record)
        if self.engine.num_optimization_profiles != len(self.profiles):
            raise VitDeployError(f"the engine has {self.engine.num_optimization_profiles} optimization profiles, its record "
                                 f"{len(self.profiles)}; rebuild it with `vitdeploy export ... --trt`")
        self.stream = self.stream_factory()
        strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None)
        size = int(getattr(self.engine, "device_memory_size_v2", 0) or self.engine.device_memory_size)
        if strategy is not None:
            self.memory = self.allocate(size)  # one block for every context: they never run at once
        for index in range(len(self.profiles)):
            if strategy is not None:
                context = self.engine.create_execution_context(strategy)
                context.set_device_memory(self.memory.data_ptr(), size)
            else:
                context = self.engine.create_execution_context()
            if not context.set_optimization_profile_async(index, self.stream.cuda_stream):
                raise VitDeployError(f"TensorRT could not select optimization profile {index}; rebuild the engine")
            self.contexts.append(context)
        self.stream.synchronize()

    def context_for(self, batch: int) -> Any:
        """The execution context of the narrowest profile that holds `batch` (recorded in `last_profile`)."""
        if not self.contexts:
            raise RuntimeError("activate() the backend first")
        index = choose_profile(self.profiles, batch)
        if index is None:
            ranges = ", ".join(f"{p['min']}..{p['max']}" for p in self.profiles)
            raise VitDeployError(f"batch {batch} is outside every optimization profile of the engine ({ranges}); "
                                 "re-export with a --trt-profile that holds it")
        self.last_profile = index
        return self.contexts[index]

    def stage(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch on the device and an output buffer of the engine's shape for it."""
        context = self.context_for(len(images))
        with torch.cuda.stream(self.stream):
            x = torch.from_numpy(np.ascontiguousarray(images)).to("cuda", non_blocking=True)
            self._set_shape(context, tuple(x.shape))
            out = torch.empty(tuple(context.get_tensor_shape(self.output_name)), dtype=torch.float32, device="cuda")
        self.stream.synchronize()
        return x, out

    def _set_shape(self, context: Any, shape: tuple[int, ...]) -> None:
        if not context.set_input_shape(self.input_name, shape):
            raise VitDeployError(f"TensorRT refused the input shape {shape}; re-export with a --trt-profile that holds it")

    def _execute(self, x: torch.Tensor, out: torch.Tensor) -> None:
        context = self.context_for(x.shape[0])
        self._set_shape(context, tuple(x.shape))
        context.set_tensor_address(self.input_name, x.data_ptr())
        context.set_tensor_address(self.output_name, out.data_ptr())
        if not context.execute_async_v3(self.stream.cuda_stream):
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
        self.contexts = []
        self.engine = self.stream = self.memory = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "device": self.record.get("gpu"), "precision": self.record.get("precision"),
                "tensorrt": self.record.get("tensorrt_version"), "profiles": self.profiles,
                "last_profile": self.last_profile}
