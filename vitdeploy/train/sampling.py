"""Training's per-sample randomness, on the device: the epoch order, crop offsets and flips,
and uniform streams for the augmentations, each a pure function of (seed, epoch, sample
index) so that runs are reproducible and resumable mid-epoch, whatever the batch layout
or number of processes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

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


def augment_params(seed: int, epoch: int, sample_ids: torch.Tensor, pad: int,
                   slack: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop offsets (0..2*pad + slack, where `slack` is how much larger the stored image is than the
    crop) and flip flags for each sample, from (seed, epoch, sample id) alone.

    Independent of batch composition, so any batching, resumption or sharding of an
    epoch augments every sample identically.
    """
    ids = sample_ids.cpu().numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        bits = _splitmix64(ids ^ _stream_key(seed, epoch, 1))
    span = np.uint64(2 * pad + slack + 1)
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


def random_crop_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int,
                     size: int | None = None) -> torch.Tensor:
    """Zero-pad by `pad`, crop a `size` square (default: the original size) at (dy, dx), mirror where `flip`.

    Works on uint8 NCHW batches on any device, in one gather for the whole batch.
    """
    n, _, h, w = images.shape
    size = h if size is None else size
    if pad == 0 and size == h == w:
        crops = images
    else:
        device = images.device
        padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
        rows = dy.to(device)[:, None] + torch.arange(size, device=device)[None, :]
        cols = dx.to(device)[:, None] + torch.arange(size, device=device)[None, :]
        batch = torch.arange(n, device=device)[:, None, None]
        # Advanced indexing yields N, H, W, C; move channels back.
        crops = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    flip = flip.to(images.device)[:, None, None, None]
    return torch.where(flip, crops.flip(-1), crops).contiguous()


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The centre `size` square of uint8 NCHW images (evaluation's view of images stored larger)."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top:top + size, left:left + size].contiguous()
