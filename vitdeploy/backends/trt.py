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
from vitdeploy.backends.graphs import GraphSet, TorchCudaGraph
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

    def __init__(self, engine_path: Path, record: dict[str, Any], input_name: str = "input", output_name: str = "logits",
                 stream_factory: Callable[[], Any] | None = None, allocate: Callable[[int], Any] | None = None,
                 cuda_graph: bool = False, graph_buckets: tuple[int, ...] | None = None,
                 graph_factory: Callable[[], Any] | None = None, say: Callable[[str], None] = print) -> None:
        self.engine_path = Path(engine_path)
        self.record = record
        self.profiles: list[dict[str, int]] = list(record["profiles"])
        self.input_name, self.output_name = input_name, output_name
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

    def stage(self, images: np.ndarray) -> Any:
        """The batch on the device (and an output buffer), or its loaded CUDA-graph bucket."""
        if self.graphs is not None:
            entry = self.graphs.staged(images)
            if entry is not None:
                return entry
        return self._stage_eager(images)

    def _stage_eager(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
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
        if self.graphs is not None:
            logits = self.graphs.run(images)
            if logits is not None:
                return logits
        x, out = self._stage_eager(images)
        with torch.cuda.stream(self.stream):
            self._execute(x, out)
            result = out.cpu()  # copied on the engine's stream, then synchronized
        return result.numpy()

    def run_staged(self, staged: Any) -> None:
        if isinstance(staged, tuple):
            self._execute(*staged)
        else:
            staged.graph.replay()
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
        host = torch.from_numpy(np.ascontiguousarray(images))
        with torch.cuda.stream(self.backend.stream):
            if self.x is None:
                self.x = torch.zeros((self.bucket, *host.shape[1:]), dtype=host.dtype, device="cuda")
                self.backend._set_shape(self.context, tuple(self.x.shape))
                self.out = torch.empty(tuple(self.context.get_tensor_shape(self.backend.output_name)),
                                       dtype=torch.float32, device="cuda")
            self.x.zero_()
            self.x[: len(images)].copy_(host, non_blocking=False)

    def _run(self) -> None:
        b = self.backend
        b._set_shape(self.context, tuple(self.x.shape))
        self.context.set_tensor_address(b.input_name, self.x.data_ptr())
        self.context.set_tensor_address(b.output_name, self.out.data_ptr())
        if not self.context.execute_async_v3(b.stream.cuda_stream):
            raise VitDeployError("TensorRT execution failed (see its log above)")

    def reference(self) -> np.ndarray:
        self._run()  # also the run TensorRT needs before a capture
        return self.read(self.bucket)

    def capture(self, graph: Any) -> None:
        graph.capture(self._run)

    def read(self, rows: int) -> np.ndarray:
        self.backend.stream.synchronize()
        return self.out[:rows].cpu().numpy()
