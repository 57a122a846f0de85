"""The TensorRT backend: a deserialized engine run with execute_async_v3 on its own CUDA
stream, device buffers held as torch CUDA tensors.

An engine may hold several optimization profiles (say 1:1:1 for latency and 2:32:256 for
throughput). One execution context per profile is created once, bound to its profile,
and all of them share one device-memory block sized for the largest (USER_MANAGED
allocation), since one backend never runs two at once. Each batch runs on the context of
the narrowest profile that holds it.

With `cuda_graph`, each batch-size bucket gets static buffers and one CUDA graph per
(context, bucket): shapes and addresses are set, `execute_async_v3` runs once (TensorRT
needs one run before capture), then the enqueue is captured on the backend's own
(non-default) stream; see `graphs.GraphSet` for the checks and the fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitdeploy.backends.base import Backend, OpenRequest
from vitdeploy.backends.graphs import GraphSet, TorchCudaGraph, load_padded
from vitdeploy.errors import VitDeployError
from vitdeploy.manifest import artifact_path
from vitdeploy.tensorrt_runtime import choose_profile, deserialize, import_tensorrt


def probe(_entry: Any) -> tuple[bool, str]:
    """Usable where TensorRT imports and there is a CUDA GPU."""
    try:
        trt = import_tensorrt()
    except VitDeployError:
        return False, "TensorRT is not installed; pip install 'vitdeploy[trt]' on a machine with an NVIDIA GPU"
    if not torch.cuda.is_available():
        return False, f"TensorRT {trt.__version__} is installed but there is no CUDA GPU"
    return True, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name(0)}"


def open_for(_entry: Any, request: OpenRequest) -> TrtBackend:
    """The request's engine, checked against the TensorRT version and GPU it was built for when activated."""
    return TrtBackend(artifact_path(request.folder, request.artifact), request.artifact, **request.graphs())


class TrtBackend(Backend):
    """One engine, one execution context per optimization profile, one stream."""

    name = "trt"
    device_mode = True

    def __init__(self, engine_path: Path, record: dict[str, Any], stream_factory: Callable[[], Any] | None = None, allocate: Callable[[int], Any] | None = None,
                 cuda_graph: bool = False, graph_buckets: tuple[int, ...] | None = None,
                 graph_factory: Callable[[], Any] | None = None, say: Callable[[str], None] = print) -> None:
        self.engine_path = Path(engine_path)
        self.record = record
        self.profiles: list[dict[str, int]] = list(record["profiles"])
        self.stream_factory = stream_factory or torch.cuda.Stream
        self.allocate = allocate or (lambda size: torch.empty(max(size, 1), dtype=torch.uint8, device="cuda"))
        self.engine = self.stream = self.memory = None
        self.contexts: list[Any] = []
        self.last_profile: int | None = None
        self.graphs = None
        if cuda_graph:
            self.graphs = GraphSet("trt", lambda bucket: _TrtStatic(self, bucket),
                                   graph_factory or (lambda: TorchCudaGraph(self.stream)), graph_buckets, exact=True, say=say)

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

    def active(self) -> bool:
        return bool(self.contexts)

    def _stage_eager(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch on the device, and an output buffer of its shape."""
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

    def execute(self, context: Any, x: torch.Tensor, out: torch.Tensor) -> None:
        """Enqueue `context` on the backend's stream with `x` in and `out` out (eager runs and graph buckets alike)."""
        self._set_shape(context, tuple(x.shape))
        context.set_tensor_address(self.input_name, x.data_ptr())
        context.set_tensor_address(self.output_name, out.data_ptr())
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise VitDeployError("TensorRT execution failed (see its log above)")

    def _infer_eager(self, images: np.ndarray) -> np.ndarray:
        x, out = self._stage_eager(images)
        with torch.cuda.stream(self.stream):
            self._run_staged_eager((x, out))
            result = out.cpu()  # copied on the engine's stream, then synchronized
        return result.numpy()

    def _run_staged_eager(self, staged: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, out = staged
        self.execute(self.context_for(x.shape[0]), x, out)

    def _wait(self) -> None:
        self.stream.synchronize()

    def deactivate(self) -> None:
        self.contexts = []
        self.engine = self.stream = self.memory = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "device": self.record.get("gpu"), "precision": self.record.get("precision"),
                "model": self.engine_path.name,
                "tensorrt": self.record.get("tensorrt_version"), "profiles": self.profiles,
                "last_profile": self.last_profile, "cuda_graph": self.graphs.describe() if self.graphs else False}


class _TrtStatic:
    """One bucket's static input/output and the context of the profile that holds it."""

    def __init__(self, backend: TrtBackend, bucket: int) -> None:
        self.backend, self.bucket = backend, bucket
        self.context = backend.context_for(bucket)
        self.x: torch.Tensor | None = None
        self.out: torch.Tensor | None = None

    def load(self, images: np.ndarray) -> None:
        with torch.cuda.stream(self.backend.stream):
            first = self.x is None
            self.x = load_padded(self.x, images, self.bucket, "cuda")
            if first:
                self.backend._set_shape(self.context, tuple(self.x.shape))
                self.out = torch.empty(tuple(self.context.get_tensor_shape(self.backend.output_name)),
                                       dtype=torch.float32, device="cuda")

    def _run(self) -> None:
        self.backend.execute(self.context, self.x, self.out)

    def reference(self) -> np.ndarray:
        self._run()  # also the run TensorRT needs before a capture
        return self.read(self.bucket)

    def capture(self, graph: Any) -> None:
        graph.capture(self._run)

    def read(self, rows: int) -> np.ndarray:
        self.backend.stream.synchronize()
        return self.out[:rows].cpu().numpy()
