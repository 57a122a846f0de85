"""The PyTorch reference backend: the trained model plus the checkpoint's preprocessing."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from vitdeploy.backends.base import Backend
from vitdeploy.preprocess import Preprocess, Preprocessing
from vitdeploy.train.precision import DTYPES


class TorchBackend(Backend):
    """Eager PyTorch on uint8 images, in fp32 (the reference), fp16 or bf16."""

    name = "pytorch"

    def __init__(self, model: nn.Module, preprocessing: Preprocessing, device: str = "cpu", precision: str = "fp32") -> None:
        self.model = model
        self.preprocess = Preprocess(preprocessing)
        self.device = torch.device(device)
        self.precision = precision

    def activate(self) -> None:
        self.model.eval().to(self.device)
        self.preprocess.to(self.device)

    @torch.no_grad()
    def infer(self, images: np.ndarray) -> np.ndarray:
        x = self.preprocess(torch.from_numpy(np.ascontiguousarray(images)).to(self.device))
        if self.precision == "fp32":
            logits = self.model(x)
        else:
            with torch.autocast(self.device.type, dtype=DTYPES[self.precision]):
                logits = self.model(x)
        return logits.float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "device": str(self.device), "precision": self.precision, "torch": torch.__version__}
