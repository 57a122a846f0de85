"""The one definition of how uint8 CIFAR images become model input.

Training, evaluation, export, benchmarking and serving all feed the model through
`Preprocess`, built from the `Preprocessing` stored in every checkpoint, so no
component re-implements resizing or normalization. (Training's random sampling, crops
and flips are in `vitdeploy.train.sampling`: inference never needs them.)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitdeploy.choices import RESIZE_MODES
from vitdeploy.errors import VitDeployError

MAX_SIDE = 1024  # the largest image side any registry model takes (224 px), with room; bounds every allocation sized by it
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How to feed a model: uint8 RGB NCHW images of `source_size` px are scaled to
    [0, 1], normalized per channel with `mean`/`std`, then resized to `input_size` px
    with `resize_mode` (align_corners=False, no antialiasing: the resize only enlarges).

    `crop_fraction` says how a picture of any size becomes the `source_size` square
    (`images.to_rgb`): None squeezes the whole picture into it (CIFAR-style training); a
    fraction f resizes the shorter side to floor(source_size / f) with `resize_mode`, then
    takes the centre square, as a model published with that crop (timm's crop_pct,
    Hugging Face's crop) was evaluated.
    """

    source_size: int
    input_size: int
    resize_mode: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_fraction: float | None = None

    def __post_init__(self) -> None:
        if not 2 <= self.source_size <= MAX_SIDE or not 2 <= self.input_size <= MAX_SIDE:
            raise VitDeployError(f"preprocessing sizes must lie in 2..{MAX_SIDE} px (got source {self.source_size}, "
                                 f"input {self.input_size})")
        if self.resize_mode not in RESIZE_MODES:
            raise VitDeployError(f"unknown resize mode {self.resize_mode!r}; use one of {', '.join(RESIZE_MODES)}")
        if self.input_size < self.source_size:
            raise VitDeployError("preprocessing only enlarges images: input_size must be >= source_size")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(math.isfinite(v) for v in (*self.mean, *self.std)) \
                or min(self.std) <= 0:
            raise VitDeployError("preprocessing needs 3 finite means and 3 positive standard deviations")
        if self.crop_fraction is not None and not (math.isfinite(self.crop_fraction) and 0.25 <= self.crop_fraction <= 1):
            raise VitDeployError(f"the crop fraction must lie in [0.25, 1] (got {self.crop_fraction})")

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so checkpoints stay loadable with weights_only=True."""
        data = asdict(self)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        try:
            return cls(
                source_size=int(data["source_size"]),
                input_size=int(data["input_size"]),
                resize_mode=str(data["resize_mode"]),
                mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
                std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
                crop_fraction=None if data.get("crop_fraction") is None else float(data["crop_fraction"]),
            )
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as exc:
            raise VitDeployError(f"invalid preprocessing record {str(data)[:200]}: {exc}") from exc


class Preprocess(nn.Module):
    """uint8 NCHW images in, normalized float32 model input out (see `Preprocessing`)."""

    def __init__(self, spec: Preprocessing) -> None:
        super().__init__()
        self.spec = spec
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
        # (x / 255 - mean) / std folded into one multiply-add.
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32) * self.scale + self.shift
        if self.spec.input_size != x.shape[-1] or self.spec.input_size != x.shape[-2]:
            size = (self.spec.input_size, self.spec.input_size)
            if self.spec.resize_mode == "nearest":
                x = F.interpolate(x, size=size, mode="nearest")
            else:
                x = F.interpolate(x, size=size, mode=self.spec.resize_mode, align_corners=False, antialias=False)
        return x
