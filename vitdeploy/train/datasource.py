"""What a run trains on, ready on the device: CIFAR-10 or an image folder (chosen by what
--data-dir holds), the model's preprocessing for it, where the images live (in device memory
or streamed from the memory-mapped cache) and the record of it all for checkpoints."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vitdeploy.data import DEFAULT_VAL_SIZE, ImageSet, load_splits
from vitdeploy.errors import VitDeployError
from vitdeploy.imagefolder.listing import is_image_folder
from vitdeploy.imagefolder.splits import StoredSet, check_store_size, default_store_size, load_folder, train_preprocessing
from vitdeploy.models import ModelSpec
from vitdeploy.preprocess import Preprocess, Preprocessing
from vitdeploy.train import distributed
from vitdeploy.train.augment import Augmenter, AugmentSettings
from vitdeploy.train.config import TrainConfig
from vitdeploy.train.distributed import DistContext
from vitdeploy.train.step import DeviceData, StreamData

MEMORY_SHARE = 0.5  # of the free memory the images may take in place (the model, activations and the rest need the others)


@dataclass
class RunData:
    """The splits on their device, with what the model is fed and the record of where they came from."""

    train: DeviceData
    val: DeviceData
    test: DeviceData | None
    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    record: dict[str, Any]


def free_memory(device: torch.device) -> tuple[int, str]:
    """Free bytes where the images would be held, and what that number is."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]), f"free memory of {device}"
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024, "MemAvailable of this machine"
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available pages of this machine"


def choose_placement(nbytes: int, device: torch.device, requested: str, memory_mb: int | None) -> dict[str, Any]:
    """Memory when the images fit in MEMORY_SHARE of the free memory (or in --data-memory-mb), else stream;
    --data-placement memory|stream decides outright. The record says which, and from what numbers."""
    if memory_mb is not None:
        budget, source = memory_mb * 2**20, "--data-memory-mb"
    else:
        free, what = free_memory(device)
        budget, source = int(free * MEMORY_SHARE), f"{MEMORY_SHARE:.0%} of the {what}"
    placement = requested if requested != "auto" else ("memory" if nbytes <= budget else "stream")
    return {"placement": placement, "requested": requested, "images_bytes": nbytes, "budget_bytes": budget, "budget_from": source}


def load_run_data(config: TrainConfig, spec: ModelSpec, device: torch.device, dist: DistContext,
                  say: Callable[[str], None], progress: Callable[[int, int], None] | None = None) -> RunData:
    """The run's splits (see the module docstring)."""
    root = Path(config.data_dir)
    if is_image_folder(root):
        return _folder(config, spec, device, dist, say, progress)
    if config.store_size is not None or config.skip_bad_images:
        raise VitDeployError(f"{root} holds no image folder (ROOT/train/CLASS/IMAGE): --store-size and --skip-bad-images "
                             "are for image folders; CIFAR-10 is stored at 32 px")
    splits = load_splits(root, config.val_size or DEFAULT_VAL_SIZE, config.seed, config.subset, config.download, config.test_size)
    preprocessing = spec.preprocessing()
    _check_padding(config, 32)
    record = {"kind": "cifar10", "class_names": list(splits.class_names),
              "splits": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test) if splits.test else 0},
              "placement": {"placement": "memory", "requested": "memory"}}
    made = _device_sets(config, device, preprocessing, (splits.train, splits.val, splits.test), "memory", None,
                        len(splits.class_names))
    return RunData(*made, splits.class_names, preprocessing, record)


def _check_padding(config: TrainConfig, stored: int) -> None:
    if config.crop_padding > stored:
        raise VitDeployError(f"--crop-padding must not be above {stored} px, the size of the stored images (got {config.crop_padding})")


def _folder(config: TrainConfig, spec: ModelSpec, device: torch.device, dist: DistContext,
            say: Callable[[str], None], progress: Callable[[int, int], None] | None) -> RunData:
    if config.download:
        raise VitDeployError("--download fetches CIFAR-10; an image folder is read where it is (drop --download)")
    store = config.store_size or default_store_size(spec.input_size)
    check_store_size(store, spec.input_size)
    _check_padding(config, store)
    workers = config.decode_workers or min(8, os.cpu_count() or 1)

    def load(quiet: bool) -> Any:
        return load_folder(Path(config.data_dir), store, spec.interpolation, config.val_size, config.seed, config.subset,
                           config.test_size, Path(config.cache_dir) if config.cache_dir else None, workers,
                           config.skip_bad_images, (lambda _: None) if quiet else say, None if quiet else progress)

    if dist.active and not dist.is_main:  # rank 0 decodes; the others open its cache
        distributed.barrier(dist)
        folder = load(quiet=True)
    else:
        folder = load(quiet=False)
        if dist.active:
            distributed.barrier(dist)
    preprocessing = train_preprocessing(store, spec.input_size, spec.interpolation, spec.mean, spec.std)
    sets = (folder.train, folder.val, folder.test)
    nbytes = sum(s.nbytes for s in sets if s is not None)
    placement = choose_placement(nbytes, device, config.data_placement, config.data_memory_mb)
    made = _device_sets(config, device, preprocessing, sets, placement["placement"], preprocessing.source_size,
                        len(folder.class_names))
    if folder.record["skipped_bad_files"]:
        say(f"--skip-bad-images: {folder.record['skipped_bad_files']} files of {config.data_dir} left out")
    say(f"images stored at {store} px ({nbytes / 2**20:,.0f} MiB): {placement['placement']} "
        f"(budget {placement['budget_bytes'] / 2**20:,.0f} MiB from {placement['budget_from']})")
    return RunData(*made, folder.class_names, preprocessing, {**folder.record, "placement": placement})


def _device_sets(config: TrainConfig, device: torch.device, preprocessing: Preprocessing,
                 sets: tuple[Any, Any, Any], placement: str, crop: int | None,
                 num_classes: int) -> tuple[DeviceData, DeviceData, DeviceData | None]:
    """train (with its augmenter), val and test on the device: held there, or streamed from their file;
    `crop` (None: the stored size) is the square the model sees of each image."""
    preprocess = Preprocess(preprocessing)
    if crop is not None and crop == sets[0].size:
        crop = None  # the stored images are the crop
    augmenter = Augmenter(AugmentSettings.of(config, preprocessing.mean, crop), preprocess.to(device), num_classes, config.seed)

    def made(data: Any, aug: Augmenter | None) -> DeviceData:
        if isinstance(data, StoredSet):
            if placement == "stream":
                return StreamData(data, preprocess, device, aug, crop)
            data = ImageSet(data.on(device), data.labels)
        return DeviceData(data, preprocess, device, aug, crop)

    return made(sets[0], augmenter), made(sets[1], None), made(sets[2], None) if sets[2] is not None else None
