"""Which dataset a data folder holds (CIFAR-10's batch files or an image folder) and the images
export and bench read from it: the parity set and the INT8 calibration images, fitted the way
a deployed model fits a picture. The one place inference code asks "what is in --data-dir"."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy import data as cifar
from vitdeploy.errors import VitDeployError
from vitdeploy.images import Fit, fit_array


def is_image_folder(data_dir: Path) -> bool:
    from vitdeploy.imagefolder.listing import is_image_folder as found

    return found(Path(data_dir))


def parity_set(data_dir: Path, limit: int, fit: Fit, class_names: Sequence[str],
               dataset: dict[str, Any] | None = None) -> cifar.ParitySet:
    """The first `limit` test images of `data_dir` as the model takes them (`dataset`: the run's record,
    which says where its validation split came from when an image folder has no test/)."""
    if is_image_folder(data_dir):
        from vitdeploy.imagefolder import samples

        return samples.parity_set(Path(data_dir), limit, fit, class_names, dataset)
    return cifar.parity_set(Path(data_dir), limit, fit, class_names)


def calibration_images(data_dir: Path, count: int, seed: int, fit: Fit, config: dict[str, Any] | None,
                       dataset: dict[str, Any] | None = None) -> np.ndarray:
    """`count` training images outside the run's validation split (`config`: the run's; None for a model
    without a run: any training image), drawn by `seed`, as the model takes them."""
    if is_image_folder(data_dir):
        from vitdeploy.imagefolder import samples

        return samples.calibration_images(Path(data_dir), count, seed, fit, dataset)
    try:
        if config is None:
            train = cifar.load_train(data_dir)
        else:
            train = cifar.load_splits(data_dir, int(config.get("val_size") or cifar.DEFAULT_VAL_SIZE), int(config.get("seed", 0)), test_size=0).train
    except VitDeployError as exc:
        raise VitDeployError(f"--int8 calibrates on CIFAR-10 training images, which could not be read ({exc}); "
                             "pass --data-dir with the training batches, or an image folder") from None
    if count > len(train):
        raise VitDeployError(f"--calib-images {count} exceeds the {len(train)} training images outside the validation "
                             f"split of {data_dir}; lower it")
    order = np.random.default_rng(seed).permutation(len(train))[:count]
    return fit_array(train.images.numpy()[np.sort(order)], fit)
