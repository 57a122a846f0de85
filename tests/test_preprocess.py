"""The one preprocessing definition and the on-device augmentation, against reference computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitdeploy.errors import VitDeployError
from vitdeploy.preprocess import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    Preprocessing,
)
from vitdeploy.train.sampling import augment_params, epoch_permutation, random_crop_flip


def bilinear_reference(image: np.ndarray, size: int) -> np.ndarray:
    """Per-image bilinear resize with half-pixel centres (align_corners=False), in float64."""
    c, h, w = image.shape

    def axis(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(size) + 0.5) * n_in / size - 0.5
        pos = np.clip(pos, 0, None)
        lo = np.minimum(np.floor(pos).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, pos - lo

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    top = image[:, y0][:, :, x0] * (1 - fx) + image[:, y0][:, :, x1] * fx
    bottom = image[:, y1][:, :, x0] * (1 - fx) + image[:, y1][:, :, x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


def normalize_reference(image: np.ndarray, mean: tuple, std: tuple) -> np.ndarray:
    return (image.astype(np.float64) / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]


@pytest.mark.parametrize("size", [32, 224])
def test_preprocess_matches_reference(size: int) -> None:
    spec = Preprocessing(32, size, "bilinear", IMAGENET_MEAN, IMAGENET_STD)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    out = Preprocess(spec)(images)
    assert out.dtype == torch.float32 and out.shape == (3, 3, size, size)
    for i in range(3):
        ref = normalize_reference(images[i].numpy(), IMAGENET_MEAN, IMAGENET_STD)
        if size != 32:
            ref = bilinear_reference(ref, size)
        np.testing.assert_allclose(out[i].numpy(), ref, atol=2e-5)


def test_preprocessing_round_trips_and_validates() -> None:
    spec = Preprocessing(32, 224, "bicubic", CIFAR_MEAN, CIFAR_STD)
    assert Preprocessing.from_dict(spec.to_dict()) == spec
    with pytest.raises(VitDeployError, match="resize mode"):
        Preprocessing(32, 224, "lanczos", CIFAR_MEAN, CIFAR_STD)
    with pytest.raises(VitDeployError, match="only enlarges"):
        Preprocessing(32, 16, "bilinear", CIFAR_MEAN, CIFAR_STD)
    with pytest.raises(VitDeployError, match="invalid preprocessing"):
        Preprocessing.from_dict({"input_size": 32})


def test_crop_flip_matches_per_image_reference() -> None:
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    dy, dx, flip = augment_params(seed=3, epoch=1, sample_ids=torch.arange(100, 116), pad=4)
    out = random_crop_flip(images, dy, dx, flip, pad=4)
    assert out.dtype == torch.uint8
    for i in range(16):
        padded = np.pad(images[i].numpy(), ((0, 0), (4, 4), (4, 4)))
        ref = padded[:, dy[i]: dy[i] + 32, dx[i]: dx[i] + 32]
        if flip[i]:
            ref = ref[:, :, ::-1]
        np.testing.assert_array_equal(out[i].numpy(), ref)


def test_augmentation_depends_only_on_seed_epoch_and_sample() -> None:
    ids = torch.arange(5000)
    dy, dx, flip = augment_params(7, 2, ids, pad=4)
    # The same samples asked for in another order and batch get the same parameters.
    perm = torch.randperm(5000)
    dy2, dx2, flip2 = augment_params(7, 2, ids[perm][:64], pad=4)
    assert torch.equal(dy[perm][:64], dy2) and torch.equal(dx[perm][:64], dx2) and torch.equal(flip[perm][:64], flip2)
    # Another epoch differs; values cover the range evenly.
    assert not torch.equal(augment_params(7, 3, ids, pad=4)[0], dy)
    assert set(dy.tolist()) == set(range(9)) and set(dx.tolist()) == set(range(9))
    assert 0.45 < flip.float().mean().item() < 0.55


def test_epoch_permutation() -> None:
    a = epoch_permutation(0, 0, 1000)
    assert sorted(a.tolist()) == list(range(1000))
    assert torch.equal(a, epoch_permutation(0, 0, 1000))
    assert not torch.equal(a, epoch_permutation(0, 1, 1000))
    assert not torch.equal(a, epoch_permutation(1, 0, 1000))
