"""The PyTorch reference backend: the trained model plus the checkpoint's preprocessing."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from vitdeploy.backends.base import Backend
from vitdeploy.preprocess import Preprocess, Preprocessing
from vitdeploy.precision import DTYPES


class TorchBackend(Backend):
    """Eager (or `torch.compile`d) PyTorch on uint8 images, in fp32 (the reference), fp16 or bf16.

    fp32 on a GPU is strict fp32: TF32 is turned off while the backend is active, so the
    reference is not itself a reduced-precision result.
    """

    name = "pytorch"

    def __init__(self, model: nn.Module, preprocessing: Preprocessing, device: str = "cpu", precision: str = "fp32",
                 compile: bool = False) -> None:
        self.model = model
        self.preprocess = Preprocess(preprocessing)
        self.device = torch.device(device)
        self.precision = precision
        self.compile = compile
        self.device_mode = self.device.type == "cuda"
        self._forward = None
        self._tf32: tuple[bool, bool] | None = None

    def activate(self) -> None:
        self.model.eval().to(self.device)
        self.preprocess.to(self.device)
        if self.device.type == "cuda" and self.precision == "fp32":
            self._tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        self._forward = torch.compile(self.model) if self.compile else self.model

    @torch.no_grad()
    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        if self.precision == "fp32":
            return self._forward(x)
        with torch.autocast(self.device.type, dtype=DTYPES[self.precision]):
            return self._forward(x)

    def infer(self, images: np.ndarray) -> np.ndarray:
        if self._forward is None:
            raise RuntimeError("activate() the backend first")
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        return self._logits(x).float().cpu().numpy()

    def stage(self, images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(images)).to(self.device)

    def run_staged(self, staged: torch.Tensor) -> None:
        self._logits(staged)
        torch.cuda.synchronize(self.device)

    def deactivate(self) -> None:
        if self._tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._tf32
            self._tf32 = None
        self._forward = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "device": str(self.device), "precision": self.precision, "torch": torch.__version__,
                "compiled": self.compile, "threads": torch.get_num_threads() if self.device.type == "cpu" else None}
