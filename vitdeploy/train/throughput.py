"""Training throughput with real images (CIFAR-10, or an image folder held on the device or
streamed from its memory-mapped cache) through the on-device pipeline versus ready synthetic
tensors: equal numbers mean the input pipeline never starves the device."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from vitdeploy.errors import VitDeployError
from vitdeploy.models import ModelSpec, build_model, get_spec
from vitdeploy.train.config import TrainConfig
from vitdeploy.train.datasource import RunData, load_run_data
from vitdeploy.train.distributed import DistContext
from vitdeploy.train.precision import choose_precision
from vitdeploy.train.schedule import build_optimizer
from vitdeploy.train.step import DeviceData, StepContext, resolve_device, train_step
from vitdeploy.versions import device_record, versions

Batches = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _real_batches(data: DeviceData, batch_size: int) -> Batches:
    """Batch i: a window of a fixed shuffled order, augmented as in epoch i (streamed sets read ahead)."""
    order = torch.randperm(len(data))

    def plan() -> Iterator[torch.Tensor]:
        i = 0
        while True:
            start = (i * batch_size) % (len(data) - batch_size + 1)
            yield order[start:start + batch_size]
            i += 1

    stream = data.batches(plan(), epoch=0)
    return lambda _i: next(stream)


def _real_data(config: TrainConfig, spec: ModelSpec, device: torch.device, batch: int) -> RunData:
    """The training images of `config` as a run holds them (every one: no validation or test split needed)."""
    if config.mixing and batch % 2:
        raise VitDeployError(f"the {config.recipe} recipe mixes images in pairs: use an even --batch-size (got {batch})")
    data = load_run_data(replace(config, test_size=0, val_size=1), spec, device, DistContext(), lambda _: None)
    if len(data.train) < batch:
        raise VitDeployError(f"{config.data_dir} has {len(data.train)} training images, fewer than one batch of {batch}")
    return data


def _synthetic_batches(input_size: int, device: torch.device, batch_size: int, num_classes: int) -> Batches:
    x = torch.randn(batch_size, 3, input_size, input_size, device=device)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    return lambda i: (x, y)


def _time_steps(ctx: StepContext, batches: Batches, steps: int, warmup_steps: int) -> float:
    """Seconds for `steps` optimizer steps after `warmup_steps`, device synchronized on both ends."""
    for i in range(warmup_steps):
        train_step(ctx, *batches(i))
    _sync(ctx.device)
    start = time.perf_counter()
    for i in range(steps):
        train_step(ctx, *batches(warmup_steps + i))
    _sync(ctx.device)
    return time.perf_counter() - start


def measure(
    models: list[str],
    batch_size: int | None,
    steps: int,
    warmup_steps: int,
    sources: list[str],
    data_dir: Path,
    device_name: str = "auto",
    precision: str = "auto",
    compile: bool = False,
    json_out: Path | None = None,
    recipe: str = "auto",
    folder: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One record per model and source: images/s over `steps` timed optimizer steps; real
    data goes through the augmentation of `recipe` (auto: the model's default recipe).

    The device is synchronized before and after the timed steps, so the time covers the
    work, not just its launch. The JSON file is rewritten after each measurement, so an
    interrupted run keeps what it measured. `folder` holds the image-folder options of
    TrainConfig (store_size, data_placement, data_memory_mb, cache_dir, decode_workers).
    """
    device = resolve_device(device_name)
    precision = choose_precision(device, precision)
    records: list[dict[str, Any]] = []
    for name in models:
        spec = get_spec(name)
        chosen = TrainConfig.from_options(name, recipe, data_dir=str(data_dir), **(folder or {}))
        recipe_name = chosen.recipe
        batch = batch_size or chosen.batch_size
        data = _real_data(chosen, spec, device, batch) if "real" in sources else None
        num_classes = len(data.class_names) if data is not None else 10
        torch.manual_seed(0)
        model = build_model(spec, num_classes).to(device)
        optimizer = build_optimizer(model, chosen.lr, chosen.weight_decay, 1.0, spec, fused=device.type == "cuda")
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        ctx = StepContext(torch.compile(model) if compile else model, optimizer, scaler, device, precision, 1, 1.0, 0.1)
        by_source = {}
        for source in sources:
            if source == "real":
                batches = _real_batches(data.train, batch)
            else:
                batches = _synthetic_batches(spec.input_size, device, batch, num_classes)
            seconds = _time_steps(ctx, batches, steps, warmup_steps)
            record = {
                "model": spec.name,
                "source": source,
                "recipe": recipe_name,
                "precision": precision,
                "batch_size": batch,
                "input_px": spec.input_size,
                **({"dataset": data.record["kind"], "placement": data.record["placement"]} if source == "real" else {}),
                "compiled": compile,
                "timed_steps": steps,
                "warmup_steps": warmup_steps,
                "seconds": seconds,
                "step_ms_mean": 1000 * seconds / steps,
                "train_images_per_s": steps * batch / seconds,
                "device": device_record(device),
                "versions": versions(),
            }
            by_source[source] = record
            records.append(record)
            if "real" in by_source and "synthetic" in by_source:
                by_source["real"]["real_over_synthetic"] = (
                    by_source["real"]["train_images_per_s"] / by_source["synthetic"]["train_images_per_s"]
                )
            if json_out is not None:
                json_out.parent.mkdir(parents=True, exist_ok=True)
                json_out.write_text(json.dumps(records, indent=2) + "\n")
        del model, optimizer, ctx, data
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records
