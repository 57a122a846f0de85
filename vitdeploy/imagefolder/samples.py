"""Images of an image-folder dataset decoded straight from their files, the way `serve` and
`predict` decode a picture (`images.Fit` of the model): export's and bench's parity set and
INT8 calibration. Files that cannot be decoded are left out and counted."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.data import ParitySet
from vitdeploy.errors import VitDeployError
from vitdeploy.imagefolder.listing import ImageFile, Listing, scan
from vitdeploy.imagefolder.splits import stratified_split
from vitdeploy.images import Fit, load_image_file


def _decode(listing: Listing, files: Sequence[ImageFile], limit: int, fit: Fit) -> tuple[np.ndarray, np.ndarray, int]:
    """Up to `limit` of `files` in order, decoded by `fit`: (images, labels, files left out)."""
    images, labels, bad = [], [], 0
    for f in files:
        if len(images) >= limit:
            break
        try:
            images.append(load_image_file(listing.root / f.path, fit))
            labels.append(f.label)
        except VitDeployError:
            bad += 1
    if not images:
        raise VitDeployError(f"no readable images in {listing.root} for parity or calibration ({bad} files could not be "
                             "decoded); `vitdeploy train --data-dir` on the folder names them, or pass --data-dir with another")
    return np.stack(images), np.array(labels, dtype=np.int64), bad


def _validation_positions(listing: Listing, record: dict[str, Any] | None) -> np.ndarray:
    """The training positions the run held out for validation (none when ROOT has val/ or no run is known)."""
    val_from = (record or {}).get("val_from") or {}
    if "val" in listing.splits or val_from.get("split") != "train":
        return np.zeros(0, dtype=np.int64)
    labels = np.array([f.label for f in listing.splits["train"]], dtype=np.int64)
    return stratified_split(labels, int(val_from["val_size"]), int(val_from["seed"]), len(listing.class_names))[1]


def parity_set(root: Path, limit: int, fit: Fit, class_names: Sequence[str], record: dict[str, Any] | None = None) -> ParitySet:
    """The first `limit` images of ROOT/test (else ROOT/val, else the run's validation split), class-interleaved."""
    listing = scan(root)
    if "test" in listing.splits:
        split, files = "test", listing.splits["test"]
    elif "val" in listing.splits:
        split, files = "val", listing.splits["val"]
    else:
        val = _validation_positions(listing, record)
        if not len(val):
            raise VitDeployError(f"{root} has no test/ or val/ folder and the run that held out validation images is not "
                                 "known; add ROOT/test (or ROOT/val) to check parity on")
        split, files = "train (the run's validation split)", [listing.splits["train"][i] for i in val]
    images, labels, bad = _decode(listing, files, limit, fit)
    same = tuple(class_names) == listing.class_names
    what = f"first {len(images)} images of {root} {split} (class-interleaved)" + (f", {bad} unreadable files left out" if bad else "")
    return ParitySet(images, labels if same else None, what)


def calibration_images(root: Path, count: int, seed: int, fit: Fit, record: dict[str, Any] | None = None) -> np.ndarray:
    """`count` training images outside the run's validation split, drawn by `seed`, decoded by `fit`."""
    listing = scan(root)
    train = listing.splits["train"]
    held = set(_validation_positions(listing, record).tolist())
    pool = np.array([i for i in range(len(train)) if i not in held], dtype=np.int64)
    if count > len(pool):
        raise VitDeployError(f"--calib-images {count} exceeds the {len(pool)} training images outside the validation "
                             f"split of {root}; lower it")
    order = np.random.default_rng(seed).permutation(pool)  # the first `count` of it that decode
    return _decode(listing, [train[i] for i in order], count, fit)[0]
