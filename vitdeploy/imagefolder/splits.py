"""The splits of an image-folder dataset as training, export and bench read them: from the
decode cache (memory-mapped), with a seeded, stratified validation split of the listed
training files when ROOT has no val/ (files that fail to decode drop out of whichever side
they fell on), bad files refused or (with --skip-bad-images) counted, and the record of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitdeploy.data import DEFAULT_VAL_SIZE
from vitdeploy.errors import VitDeployError
from vitdeploy.imagefolder import cache as image_cache
from vitdeploy.imagefolder.listing import Listing, describe_bad, scan
from vitdeploy.preprocess import MAX_SIDE, Preprocessing

MIN_STORE = 8
LOAD_CHUNK = 4096  # images read from the cache at a time when a set is loaded whole


@dataclass(frozen=True)
class StoredSet:
    """Images of one split where they lie (a memory-mapped cache file), `rows` of it in order, and labels."""

    images: np.ndarray
    labels: torch.Tensor  # int64, one per row
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        return len(self.rows) * int(np.prod(self.images.shape[1:]))

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def gather(self, indices: np.ndarray) -> torch.Tensor:
        """uint8 images of positions `indices` (read from the file now), in that order."""
        return torch.from_numpy(np.ascontiguousarray(self.images[self.rows[indices]]))

    def take(self, positions: np.ndarray) -> StoredSet:
        return StoredSet(self.images, self.labels[torch.from_numpy(positions)], self.rows[positions])

    def on(self, device: torch.device) -> torch.Tensor:
        """Every image of the set, read onto `device` a chunk at a time (no second copy in host memory)."""
        out = torch.empty((len(self), *self.images.shape[1:]), dtype=torch.uint8, device=device)
        for start in range(0, len(self), LOAD_CHUNK):
            out[start:start + LOAD_CHUNK] = self.gather(np.arange(start, min(start + LOAD_CHUNK, len(self))))
        return out


@dataclass(frozen=True)
class FolderData:
    """What a run trains, validates and tests on, and the record of it (checkpoint and manifest)."""

    train: StoredSet
    val: StoredSet
    test: StoredSet | None
    class_names: tuple[str, ...]
    record: dict[str, Any]


def default_store_size(input_size: int) -> int:
    """The model's input size plus a margin for random crops (about 1/0.875 of it, an even number of px more)."""
    return input_size + 2 * round((input_size / 0.875 - input_size) / 2)


def check_store_size(store_size: int, input_size: int) -> None:
    if not MIN_STORE <= store_size <= MAX_SIDE:
        raise VitDeployError(f"--store-size must lie in {MIN_STORE}..{MAX_SIDE} px (got {store_size})")
    if store_size > input_size and (store_size - input_size) % 2:
        raise VitDeployError(f"--store-size {store_size} is larger than the model's {input_size} px input by an odd "
                             f"number of px, so its centre crop would not fall on whole pixels; use {store_size - 1} "
                             f"or {store_size + 1}")


def train_preprocessing(store_size: int, input_size: int, resize_mode: str, mean: tuple[float, float, float],
                        std: tuple[float, float, float]) -> Preprocessing:
    """What a model trained on images stored at `store_size` takes: crops of min(store, input) px (random in
    training, the centre one in evaluation and deployment), enlarged to the input size when smaller. A
    picture at deployment is fitted the same way: shorter side to the store size, centre crop."""
    crop = min(store_size, input_size)
    return Preprocessing(crop, input_size, resize_mode, mean, std, crop_fraction=crop / store_size)


def stratified_split(labels: np.ndarray, val_size: int, seed: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(train positions, validation positions), both sorted: `val_size` positions drawn by `seed` with each
    class's share of them as close to its share of the images as whole numbers allow (largest remainders),
    and every class keeping at least one training image."""
    n = len(labels)
    if not 0 < val_size <= n - num_classes:
        raise VitDeployError(f"--val-size must be between 1 and {n - num_classes} here (the training folder has {n} images "
                             f"in {num_classes} classes, each keeping one at least); or add ROOT/val")
    counts = np.bincount(labels, minlength=num_classes)
    exact = val_size * counts / n
    take = np.minimum(np.floor(exact).astype(np.int64), counts - 1)
    order = np.argsort(-(exact - take), kind="stable")
    for c in order:
        if take.sum() >= val_size:
            break
        if take[c] < counts[c] - 1:
            take[c] += 1
    while take.sum() < val_size:  # classes capped at counts - 1: others take the rest
        c = int(np.argmax(counts - 1 - take))
        take[c] += 1
    rng = np.random.default_rng(seed)
    val = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:take[c]] for c in range(num_classes)])
    val = np.sort(val)
    train = np.setdiff1d(np.arange(n), val)
    return train, val


def open_folder(root: Path, store_size: int, resample: str, cache_dir: Path | None, workers: int,
                say: Callable[[str], None] = print,
                progress: Callable[[int, int], None] | None = None) -> tuple[Listing, image_cache.Cache]:
    """The listing of ROOT and its decode cache at `store_size` (built now if it is not there yet)."""
    listing = scan(root)
    cache = image_cache.open_or_build(listing, image_cache.StoreRule(store_size, resample), cache_dir, workers, say, progress)
    return listing, cache


def check_bad(listing: Listing, cache: image_cache.Cache, skip_bad: bool) -> int:
    """The number of files left out; an error naming them unless `skip_bad`."""
    if cache.bad_count and not skip_bad:
        total = sum(listing.counts().values()) + len(listing.bad)
        raise VitDeployError(f"{listing.root}: {describe_bad(cache.bad, total)}"
                             + (f" (first {len(cache.bad)} recorded)" if len(cache.bad) < cache.bad_count else "")
                             + "; fix or remove them, or pass --skip-bad-images to leave them out (counted in the run)")
    return cache.bad_count


def load_folder(root: Path, store_size: int, resample: str, val_size: int | None, seed: int, subset: int | None = None,
                test_size: int | None = None, cache_dir: Path | None = None, workers: int = 1, skip_bad: bool = False,
                say: Callable[[str], None] = print, progress: Callable[[int, int], None] | None = None) -> FolderData:
    """Train/validation/test of ROOT (see the module docstring); `val_size` None holds out a tenth of train/
    (at most DEFAULT_VAL_SIZE); `subset` and `test_size` keep the first N."""
    listing, cache = open_folder(root, store_size, resample, cache_dir, workers, say, progress)
    skipped = check_bad(listing, cache, skip_bad)
    names = listing.class_names

    def whole(split: str) -> StoredSet:
        stored = cache.splits[split]
        return StoredSet(stored.images, torch.from_numpy(np.array(stored.labels)), np.arange(len(stored.labels)))

    train = whole("train")
    if "val" in cache.splits:
        val, val_from = whole("val"), {"split": "val"}
    else:
        # drawn over the listing, not the decoded images, so that export can redraw it from the files alone
        listed = np.array([f.label for f in listing.splits["train"]], dtype=np.int64)
        val_size = val_size or max(1, min(DEFAULT_VAL_SIZE, round(len(listed) / 10)))
        in_val = np.isin(cache.splits["train"].index, stratified_split(listed, val_size, seed, len(names))[1])
        train, val = train.take(np.flatnonzero(~in_val)), train.take(np.flatnonzero(in_val))
        val_from = {"split": "train", "val_size": val_size, "seed": seed}
    if subset is not None:
        train = train.take(np.arange(min(subset, len(train))))
    test = whole("test") if "test" in cache.splits and test_size != 0 else None
    if test is not None and test_size is not None:
        if test_size > len(test):
            raise VitDeployError(f"--test-size must be between 0 (no test pass) and {len(test)} (ROOT/test has {len(test)} images)")
        test = test.take(np.arange(test_size))
    for name, part in (("train", train), ("val", val)):
        if len(part) == 0:
            raise VitDeployError(f"{root}: the {name} split has no usable images (those drawn for it could not be decoded); "
                                 + ("raise --val-size or add ROOT/val" if name == "val" else "add training images"))
    record = {
        "kind": "image-folder",
        "root": str(root),
        "class_names": list(names),
        "splits": {"train": len(train), "val": len(val), "test": len(test) if test is not None else 0},
        "val_from": val_from,
        "cache_key": cache.key,
        "store": cache.rule.to_dict(),
        "skipped_bad_files": skipped,
    }
    return FolderData(train, val, test, names, record)

