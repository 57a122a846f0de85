"""The one definition of how uint8 CIFAR images become model input.

Training, evaluation, export, benchmarking and serving all feed the model through
`Preprocess`, built from the `Preprocessing` stored in every checkpoint, so no
component re-implements resizing or normalization. Training augmentation (random crop
with padding, horizontal flip) also runs here, on the device, with parameters that are
a pure function of (seed, epoch, sample index) so that runs are reproducible and
resumable mid-epoch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitdeploy.errors import VitDeployError

RESIZE_MODES = ("bilinear", "bicubic", "nearest")
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
    """

    source_size: int
    input_size: int
    resize_mode: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

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
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
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


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A counter-based hash: well-mixed 64-bit values from consecutive integers."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def _stream_key(seed: int, epoch: int, stream: int) -> np.uint64:
    key = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    key = _splitmix64(key ^ np.uint64(epoch))
    return _splitmix64(key ^ np.uint64(stream))[0]


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order of the n training samples in `epoch`, fixed by (seed, epoch)."""
    generator = torch.Generator().manual_seed(int(_stream_key(seed, epoch, 0) & np.uint64(0x7FFFFFFFFFFFFFFF)))
    return torch.randperm(n, generator=generator)


def augment_params(seed: int, epoch: int, sample_ids: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop offsets (0..2*pad) and flip flags for each sample, from (seed, epoch, sample id) alone.

    Independent of batch composition, so any batching, resumption or sharding of an
    epoch augments every sample identically.
    """
    ids = sample_ids.cpu().numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        bits = _splitmix64(ids ^ _stream_key(seed, epoch, 1))
    span = np.uint64(2 * pad + 1)
    dy = (bits % span).astype(np.int64)
    dx = ((bits >> np.uint64(16)) % span).astype(np.int64)
    flip = ((bits >> np.uint64(32)) & np.uint64(1)).astype(bool)
    return torch.from_numpy(dy), torch.from_numpy(dx), torch.from_numpy(flip)


def sample_uniforms(seed: int, epoch: int, sample_ids: torch.Tensor, stream: int, count: int) -> np.ndarray:
    """`count` uniform numbers in [0, 1) per sample (an N x count float64 array), from
    (seed, epoch, sample id, stream) alone: each augmentation draws from a stream of its own."""
    ids = sample_ids.cpu().numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        base = _splitmix64(ids ^ _stream_key(seed, epoch, stream))
        bits = _splitmix64(base[:, None] + np.arange(count, dtype=np.uint64)[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def random_crop_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad by `pad`, crop back to the original size at (dy, dx), mirror where `flip`.

    Works on uint8 NCHW batches on any device, in one gather for the whole batch.
    """
    if pad == 0:
        crops = images
    else:
        n, _, h, w = images.shape
        device = images.device
        padded = F.pad(images, (pad, pad, pad, pad))
        rows = dy.to(device)[:, None] + torch.arange(h, device=device)[None, :]
        cols = dx.to(device)[:, None] + torch.arange(w, device=device)[None, :]
        batch = torch.arange(n, device=device)[:, None, None]
        # Advanced indexing yields N, H, W, C; move channels back.
        crops = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    flip = flip.to(images.device)[:, None, None, None]
    return torch.where(flip, crops.flip(-1), crops).contiguous()
