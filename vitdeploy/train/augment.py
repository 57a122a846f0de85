"""Per-sample training augmentation on the device: random crops and flips,
TrivialAugmentWide, random erasing, mixup and cutmix.

torchvision's v2 transform classes draw one parameter set per call (one op for a whole
batch, one mixing weight per batch), so a sample's augmentation would depend on the batch
it lands in. Here every choice (op, magnitude, erased box, mixing weight and box) comes
from `sample_uniforms(seed, epoch, sample id, stream)`, and the ops run over a whole uint8
batch with per-sample magnitudes (v2's functional kernels where one call fits a group of
samples). Mixing partners are fixed pairs of the epoch order (positions 2k and 2k+1), so
the same sample in the same epoch is augmented identically under any batching, resume,
gradient accumulation or sharding over ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from vitdeploy.preprocess import Preprocess
from vitdeploy.train.sampling import augment_params, random_crop_flip, sample_uniforms

_TRIVIAL, _ERASE, _MIX = 2, 3, 4  # hash streams (1 is the crop/flip stream)

# TrivialAugmentWide (Mueller & Hutter 2021), as torchvision defines it: op, magnitude of
# the top bin (None: a fixed rule below), signed. Magnitudes grow linearly over 31 bins.
_OPS = (
    ("identity", None, False), ("shear_x", 0.99, True), ("shear_y", 0.99, True),
    ("translate_x", 32.0, True), ("translate_y", 32.0, True), ("rotate", 135.0, True),
    ("brightness", 0.99, True), ("color", 0.99, True), ("contrast", 0.99, True), ("sharpness", 0.99, True),
    ("posterize", None, False), ("solarize", None, False), ("autocontrast", None, False), ("equalize", None, False),
)
OP_NAMES = tuple(op[0] for op in _OPS)
NUM_BINS = 31
_GEOMETRIC = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")
ERASE_SCALE = (0.02, 1 / 3)  # erased area as a fraction of the image (torchvision RandomErasing)
ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))


@dataclass(frozen=True)
class AugmentSettings:
    """Which augmentations a run applies (see TrainConfig)."""

    crop_padding: int = 0
    augment: str = "none"
    erase_prob: float = 0.0
    mixup_alpha: float | None = None  # None: off
    cutmix_alpha: float | None = None
    fill: tuple[int, int, int] = (0, 0, 0)  # uint8 colour of erased boxes: the normalization mean
    crop_size: int | None = None  # random crops of this size from larger stored images (None: the stored size)

    @property
    def mixing(self) -> bool:
        return self.mixup_alpha is not None or self.cutmix_alpha is not None

    @classmethod
    def of(cls, knobs: Any, mean: tuple[float, float, float], crop_size: int | None = None) -> AugmentSettings:
        """The settings a TrainConfig describes; erased boxes take the colour of the normalization `mean`;
        `crop_size` below the stored images' size makes the random crops windows of it."""
        return cls(
            crop_padding=knobs.crop_padding, augment=knobs.augment, erase_prob=knobs.erase_prob,
            mixup_alpha=knobs.mixup_alpha if knobs.mixup else None, cutmix_alpha=knobs.cutmix_alpha if knobs.cutmix else None,
            fill=tuple(round(255 * m) for m in mean), crop_size=crop_size,
        )


def trivial_params(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(op index, signed magnitude) per sample from 3 uniforms each."""
    op = np.minimum((u[:, 0] * len(_OPS)).astype(np.int64), len(_OPS) - 1)
    level = np.minimum((u[:, 1] * NUM_BINS).astype(np.int64), NUM_BINS - 1)
    magnitude = np.zeros(len(op))
    for k, (name, top, signed) in enumerate(_OPS):
        chosen = op == k
        if top is not None:
            magnitude[chosen] = top * level[chosen] / (NUM_BINS - 1)
            if signed:
                magnitude[chosen] *= np.where(u[chosen, 2] <= 0.5, -1.0, 1.0)
        elif name == "posterize":
            magnitude[chosen] = np.round(8 - level[chosen] / ((NUM_BINS - 1) / 6))
        elif name == "solarize":
            magnitude[chosen] = 255.0 * (1 - level[chosen] / (NUM_BINS - 1))
    return op, magnitude


def _affine_grid(rows: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """grid_sample coordinates for per-sample 2x3 maps from output to input pixel
    coordinates (continuous: pixel (i, j) has its centre at (j + 0.5, i + 0.5))."""
    ys, xs = torch.meshgrid(torch.arange(h, device=rows.device) + 0.5, torch.arange(w, device=rows.device) + 0.5, indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).reshape(1, -1, 3).to(rows.dtype)  # 1 x HW x 3
    source = points @ rows.transpose(1, 2)  # N x HW x 2
    scale = torch.tensor([2.0 / w, 2.0 / h], device=rows.device, dtype=rows.dtype)
    return (source * scale - 1).reshape(-1, h, w, 2)


def affine_rows(names: list[str], magnitude: np.ndarray, h: int, w: int) -> np.ndarray:
    """Per-sample 2x3 maps from output to input pixel coordinates for shear (about the
    top-left corner), translation (whole pixels) or rotation (degrees, about the centre)."""
    rows = np.tile(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), (len(names), 1, 1))
    for i, (name, m) in enumerate(zip(names, magnitude, strict=True)):
        if name == "shear_x":
            rows[i, 0, 1] = -m
        elif name == "shear_y":
            rows[i, 1, 0] = -m
        elif name == "translate_x":
            rows[i, 0, 2] = -math.trunc(m)
        elif name == "translate_y":
            rows[i, 1, 2] = -math.trunc(m)
        else:  # rotate: input = R(-angle) (output - centre) + centre
            c, s = math.cos(math.radians(m)), math.sin(math.radians(m))
            cx, cy = w / 2, h / 2
            rows[i] = [[c, -s, cx - c * cx + s * cy], [s, c, cy - s * cx - c * cy]]
    return rows


def geometric(images: torch.Tensor, names: list[str], magnitude: np.ndarray) -> torch.Tensor:
    """The geometric ops of `names` per sample, nearest-neighbour, uncovered pixels black."""
    _, _, h, w = images.shape
    rows = torch.from_numpy(affine_rows(names, magnitude, h, w)).to(device=images.device, dtype=torch.float32)
    out = F.grid_sample(images.float(), _affine_grid(rows, h, w), mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round().to(torch.uint8)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * images + (1 - factor) * other, clamped and truncated to uint8 as torchvision does."""
    return (images.float() * factor + other * (1 - factor)).clamp_(0, 255).to(torch.uint8)


def _gray(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.float().unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=images.device) / 13
    x = images.float()
    blurred = F.conv2d(x, kernel.expand(3, 1, 3, 3), groups=3).round_()
    out = x.clone()
    inner = out[..., 1:-1, 1:-1]
    out[..., 1:-1, 1:-1] = inner + (blurred - inner) * (1 - factor)
    return out.clamp_(0, 255).to(torch.uint8)


def _color_op(name: str, images: torch.Tensor, magnitude: np.ndarray) -> torch.Tensor:
    """One colour op over a group of samples with their magnitudes (host values: posterize
    groups by them without reading anything back from the device)."""
    if name == "posterize":
        out = images.clone()
        for bits in np.unique(magnitude):
            chosen = torch.from_numpy(magnitude == bits).to(images.device)
            out[chosen] = TF.posterize(images[chosen], int(bits))
        return out
    m = torch.from_numpy(magnitude).to(device=images.device, dtype=torch.float32)
    factor = (1 + m).view(-1, 1, 1, 1)
    if name == "brightness":
        return (images.float() * factor).clamp_(0, 255).to(torch.uint8)
    if name == "color":
        return _blend(images, _gray(images).floor_(), factor)
    if name == "contrast":
        return _blend(images, _gray(images).floor_().mean(dim=(1, 2, 3), keepdim=True), factor)
    if name == "sharpness":
        return _sharpness(images, factor)
    if name == "solarize":
        return torch.where(images >= m.view(-1, 1, 1, 1), 255 - images, images)
    if name == "autocontrast":
        return TF.autocontrast(images)
    if name == "equalize":
        return TF.equalize(images)
    raise ValueError(name)


def trivial_augment(images: torch.Tensor, op: np.ndarray, magnitude: np.ndarray) -> torch.Tensor:
    """Apply each sample's TrivialAugmentWide op (uint8 N x 3 x H x W in and out)."""
    out = images.clone()
    geo = np.flatnonzero(np.isin(op, [OP_NAMES.index(g) for g in _GEOMETRIC]))
    if len(geo):
        idx = torch.from_numpy(geo).to(images.device)
        out[idx] = geometric(images[idx], [OP_NAMES[k] for k in op[geo]], magnitude[geo])
    for k, name in enumerate(OP_NAMES):
        if name == "identity" or name in _GEOMETRIC:
            continue
        chosen = np.flatnonzero(op == k)
        if len(chosen):
            idx = torch.from_numpy(chosen).to(images.device)
            out[idx] = _color_op(name, images[idx], magnitude[chosen])
    return out


def erase_boxes(u: np.ndarray, prob: float, h: int, w: int) -> np.ndarray:
    """(top, left, height, width) per sample, all zero where nothing is erased; from 5 uniforms each."""
    area = h * w * (ERASE_SCALE[0] + u[:, 1] * (ERASE_SCALE[1] - ERASE_SCALE[0]))
    ratio = np.exp(ERASE_LOG_RATIO[0] + u[:, 2] * (ERASE_LOG_RATIO[1] - ERASE_LOG_RATIO[0]))
    bh = np.clip(np.round(np.sqrt(area * ratio)), 1, h - 1).astype(np.int64)
    bw = np.clip(np.round(np.sqrt(area / ratio)), 1, w - 1).astype(np.int64)
    top = (u[:, 3] * (h - bh + 1)).astype(np.int64)
    left = (u[:, 4] * (w - bw + 1)).astype(np.int64)
    boxes = np.stack([top, left, bh, bw], axis=1)
    boxes[u[:, 0] >= prob] = 0
    return boxes


def box_mask(boxes: np.ndarray, h: int, w: int, device: torch.device) -> torch.Tensor:
    """N x 1 x H x W booleans, true inside each sample's (top, left, height, width) box."""
    b = torch.from_numpy(boxes).to(device)
    rows = torch.arange(h, device=device)[None, :]
    cols = torch.arange(w, device=device)[None, :]
    inside_r = (rows >= b[:, :1]) & (rows < b[:, :1] + b[:, 2:3])
    inside_c = (cols >= b[:, 1:2]) & (cols < b[:, 1:2] + b[:, 3:4])
    return (inside_r[:, :, None] & inside_c[:, None, :]).unsqueeze(1)


@lru_cache(maxsize=16)
def _beta_table(alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """CDF of the symmetric Beta(alpha, alpha) on [0, 1/2], tabulated in s = x**alpha, in
    which the density (1/alpha)(1 - x)**(alpha - 1) is bounded for every alpha > 0."""
    s = np.linspace(0.0, 0.5**alpha, 8193)
    density = (1 / alpha) * (1 - s ** (1 / alpha)) ** (alpha - 1)
    cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(s))])
    return cdf * (0.5 / cdf[-1]), s


def beta_quantile(alpha: float, u: np.ndarray) -> np.ndarray:
    """Beta(alpha, alpha) draws from uniforms u (inverse CDF), so a mixing weight is a
    function of its sample's hash alone."""
    cdf, s = _beta_table(float(alpha))
    lower = np.interp(np.minimum(u, 1 - u), cdf, s) ** (1 / alpha)
    return np.where(u < 0.5, lower, 1 - lower)


@dataclass(frozen=True)
class MixPlan:
    """Per sample: the weight of its own image and label, and its cutmix box (all zero for mixup)."""

    lam: np.ndarray
    boxes: np.ndarray

    @property
    def cut(self) -> np.ndarray:
        return self.boxes[:, 2] > 0


def mix_plan(u: np.ndarray, mixup_alpha: float | None, cutmix_alpha: float | None, h: int, w: int) -> MixPlan:
    """Mixup or cutmix per sample (an even choice when both are on), from 4 uniforms each.
    A cutmix box covers about 1 - lambda of the image; lambda is then its exact share."""
    if cutmix_alpha is None:
        cut = np.zeros(len(u), dtype=bool)
    elif mixup_alpha is None:
        cut = np.ones(len(u), dtype=bool)
    else:
        cut = u[:, 0] < 0.5
    lam = np.ones(len(u))
    boxes = np.zeros((len(u), 4), dtype=np.int64)
    if mixup_alpha is not None:
        lam[~cut] = beta_quantile(mixup_alpha, u[~cut, 1])
    if cutmix_alpha is not None and cut.any():
        ratio = np.sqrt(1 - beta_quantile(cutmix_alpha, u[cut, 1]))
        bh, bw = (ratio * h).astype(np.int64), (ratio * w).astype(np.int64)
        cy, cx = (u[cut, 2] * h).astype(np.int64), (u[cut, 3] * w).astype(np.int64)
        y0, y1 = np.clip(cy - bh // 2, 0, h), np.clip(cy + bh // 2, 0, h)
        x0, x1 = np.clip(cx - bw // 2, 0, w), np.clip(cx + bw // 2, 0, w)
        boxes[cut] = np.stack([y0, x0, y1 - y0, x1 - x0], axis=1)
        lam[cut] = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    return MixPlan(lam, boxes)


def partners(n: int) -> torch.Tensor:
    """Each position's mixing partner: 2k <-> 2k+1 (n is even; see TrainConfig.check_ranks)."""
    return torch.arange(n) ^ 1


class Augmenter:
    """Training batches: uint8 images and labels in, augmented model input and targets out
    (class indices, or probability rows when samples are mixed)."""

    def __init__(self, settings: AugmentSettings, preprocess: Preprocess, num_classes: int, seed: int) -> None:
        self.settings = settings
        self.preprocess = preprocess
        self.num_classes = num_classes
        self.seed = seed

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, sample_ids: torch.Tensor,
                 epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, seed = self.settings, self.seed
        n, _, stored, _ = images.shape
        h = w = cfg.crop_size or stored
        dy, dx, flip = augment_params(seed, epoch, sample_ids, cfg.crop_padding, stored - h)
        images = random_crop_flip(images, dy, dx, flip, cfg.crop_padding, h)
        if cfg.augment == "trivial":
            images = trivial_augment(images, *trivial_params(sample_uniforms(seed, epoch, sample_ids, _TRIVIAL, 3)))
        if cfg.erase_prob > 0:
            boxes = erase_boxes(sample_uniforms(seed, epoch, sample_ids, _ERASE, 5), cfg.erase_prob, h, w)
            fill = torch.tensor(cfg.fill, dtype=torch.uint8, device=images.device).view(1, 3, 1, 1)
            images = torch.where(box_mask(boxes, h, w, images.device), fill, images)
        if not cfg.mixing:
            return self.preprocess(images), labels
        if n % 2:
            raise ValueError(f"mixup/cutmix need an even batch, got {n}")
        plan = mix_plan(sample_uniforms(seed, epoch, sample_ids, _MIX, 4), cfg.mixup_alpha, cfg.cutmix_alpha, h, w)
        other = partners(n).to(images.device)
        partner = images[other]  # the partner's own augmented image, before any mixing
        blend = torch.from_numpy(np.where(plan.cut, 1.0, plan.lam)).to(device=images.device, dtype=torch.float32)
        # cutmix: the partner inside the box; mixup: lam * own + (1 - lam) * partner. Mixing before
        # preprocessing equals mixing after it: normalization and bilinear resizing are affine.
        cut = torch.where(box_mask(plan.boxes, h, w, images.device), partner, images)
        x = self.preprocess(cut.float() * blend.view(-1, 1, 1, 1) + partner.float() * (1 - blend.view(-1, 1, 1, 1)))
        lam = torch.from_numpy(plan.lam).to(device=labels.device, dtype=torch.float32)[:, None]
        onehot = F.one_hot(labels, self.num_classes).float()
        targets = lam * onehot + (1 - lam) * onehot[other]
        return x, targets
