"""The PyTorch reference backend: the trained model plus the checkpoint's preprocessing."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from vitdeploy import tome
from vitdeploy.backends.base import Backend, OpenRequest
from vitdeploy.backends.graphs import GraphSet, TorchCudaGraph, load_padded
from vitdeploy.errors import VitDeployError
from vitdeploy.precision import TORCH_DTYPES
from vitdeploy.preprocess import Preprocess, Preprocessing


def probe(_entry: Any) -> tuple[bool, str]:
    """Always usable: PyTorch is the reference; says whether it has a GPU."""
    return True, f"torch {torch.__version__} on {'CUDA and CPU' if torch.cuda.is_available() else 'CPU only'}"


def open_for(_entry: Any, request: OpenRequest) -> TorchBackend:
    """The training checkpoint the manifest records, on the GPU when there is one."""
    from vitdeploy.manifest import recorded_checkpoint
    from vitdeploy.models import load_model

    path = recorded_checkpoint(request.manifest, request.checkpoint, "the pytorch backend needs the training weights")
    loaded = load_model(path)
    model = tome.apply(loaded.module, tome.plan(loaded.spec, request.tome)) if request.tome is not None else loaded.module
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return TorchBackend(model, Preprocessing.from_dict(request.manifest["preprocessing"]), device, request.precision,
                        request.compile, threads=request.threads if device == "cpu" else None, **request.graphs())


class TorchBackend(Backend):
    """Eager (or `torch.compile`d) PyTorch on uint8 images, in fp32 (the reference), fp16 or bf16.

    fp32 on a GPU is strict fp32: TF32 is turned off while the backend is active, so the
    reference is not itself a reduced-precision result. With `cuda_graph`, eager runs
    replay one captured `torch.cuda.graph` per batch-size bucket (`graphs.GraphSet`), and
    compiled runs use `torch.compile(mode="reduce-overhead")`, which captures its own.
    """

    name = "pytorch"

    def __init__(self, model: nn.Module, preprocessing: Preprocessing, device: str = "cpu", precision: str = "fp32",
                 compile: bool = False, threads: int | None = None, cuda_graph: bool = False,
                 graph_buckets: tuple[int, ...] | None = None, say: Any = print) -> None:
        self.model = model
        self.threads = threads  # torch's CPU threads while active (a process-wide setting, restored on deactivate)
        self._saved_threads: int | None = None
        self.preprocess = Preprocess(preprocessing)
        self.device = torch.device(device)
        self.precision = precision
        self.compile = compile
        self.cuda_graph = cuda_graph
        if cuda_graph and self.device.type != "cuda":
            raise VitDeployError("--cuda-graph needs a GPU backend; pytorch runs on the CPU here")
        self.device_mode = self.device.type == "cuda"
        self.graphs = None
        if cuda_graph and not compile:
            self.graphs = GraphSet("pytorch", self._static, self._new_graph, graph_buckets, exact=False, say=say)
        self._forward = None
        self._tf32: tuple[bool, bool] | None = None
        self._stream = None

    def activate(self) -> None:
        if self.threads:
            self._saved_threads = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        self.model.eval().to(self.device)
        self.preprocess.to(self.device)
        if self.device.type == "cuda" and self.precision == "fp32":
            self._tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        if self.compile:
            self._forward = torch.compile(self.model, mode="reduce-overhead" if self.cuda_graph else "default")
        else:
            self._forward = self.model
        if self.graphs is not None:
            self._stream = torch.cuda.Stream(self.device)

    @torch.no_grad()
    def _logits(self, images: torch.Tensor, cache_enabled: bool = True) -> torch.Tensor:
        x = self.preprocess(images)
        if self.precision == "fp32":
            return self._forward(x)
        # Autocast's weight cast cache must be off while a CUDA graph is captured.
        with torch.autocast(self.device.type, dtype=TORCH_DTYPES[self.precision], cache_enabled=cache_enabled):
            return self._forward(x)

    def active(self) -> bool:
        return self._forward is not None

    def _infer_eager(self, images: np.ndarray) -> np.ndarray:
        return self._logits(self._stage_eager(images)).float().cpu().numpy()

    def _stage_eager(self, images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(images)).to(self.device)

    def _run_staged_eager(self, staged: torch.Tensor) -> None:
        self._logits(staged)

    def _wait(self) -> None:
        torch.cuda.synchronize(self.device)

    def _new_graph(self) -> TorchCudaGraph:
        return TorchCudaGraph(self._stream)

    def _static(self, bucket: int) -> _TorchStatic:
        return _TorchStatic(self, bucket)

    def deactivate(self) -> None:
        if self._tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._tf32
            self._tf32 = None
        if self._saved_threads is not None:
            torch.set_num_threads(self._saved_threads)
            self._saved_threads = None
        self._forward = None

    def describe(self) -> dict[str, Any]:
        graph: Any = False
        if self.cuda_graph:
            graph = "torch.compile mode=reduce-overhead" if self.compile else self.graphs.describe()
        return {"name": self.name, "device": str(self.device), "precision": self.precision, "torch": torch.__version__,
                "model": "the training checkpoint (PyTorch)", "tome": _tome_label(self.model),
                "compiled": self.compile, "threads": torch.get_num_threads() if self.device.type == "cpu" else None,
                "cuda_graph": graph}


def _tome_label(model: nn.Module) -> str | None:
    """The token merging the model runs with (its label), None when unmerged or not a ViT tome knows."""
    try:
        merging = tome.merging_of(model)
    except VitDeployError:
        return None
    return merging.label if merging else None


class _TorchStatic:
    """One bucket's static input and output for a captured eager forward pass."""

    def __init__(self, backend: TorchBackend, bucket: int) -> None:
        self.backend, self.bucket = backend, bucket
        self.x: torch.Tensor | None = None
        self.out: torch.Tensor | None = None

    def load(self, images: np.ndarray) -> None:
        self.x = load_padded(self.x, images, self.bucket, self.backend.device)

    def _run(self) -> None:
        self.out = self.backend._logits(self.x, cache_enabled=False)

    def reference(self) -> np.ndarray:
        self._run()
        return self.out.float().cpu().numpy()

    def capture(self, graph: TorchCudaGraph) -> None:
        side = graph.stream
        side.wait_stream(torch.cuda.current_stream(self.backend.device))
        with torch.cuda.stream(side):  # warm-up on the capture stream, as torch.cuda.graph asks
            for _ in range(2):
                self._run()
        torch.cuda.current_stream(self.backend.device).wait_stream(side)
        graph.capture(self._run)

    def read(self, rows: int) -> np.ndarray:
        torch.cuda.synchronize(self.backend.device)
        return self.out[:rows].float().cpu().numpy()
