"""Training throughput with real CIFAR-10 through the on-device pipeline versus ready
synthetic tensors: equal numbers mean the input pipeline never starves the device."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from vitdeploy.data import load_train
from vitdeploy.models import build_model, get_spec
from vitdeploy.preprocess import Preprocess
from vitdeploy.train.loop import DeviceData, StepContext, resolve_device, train_step
from vitdeploy.train.precision import choose_precision
from vitdeploy.train.schedule import build_optimizer
from vitdeploy.versions import device_record, versions


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    model_name: str,
    batch_size: int,
    steps: int,
    warmup_steps: int,
    sources: list[str],
    data_dir: Path,
    device_name: str = "auto",
    precision: str = "auto",
    compile: bool = False,
    json_out: Path | None = None,
) -> list[dict[str, Any]]:
    """One record per source: images/s over `steps` timed optimizer steps after `warmup_steps`.

    The device is synchronized before and after the timed steps, so the time covers the
    work, not just its launch. The JSON file is rewritten after each source.
    """
    spec = get_spec(model_name)
    device = resolve_device(device_name)
    precision = choose_precision(device, precision)
    torch.manual_seed(0)
    model = build_model(spec).to(device)
    optimizer = build_optimizer(model, spec.recipe.lr, spec.recipe.weight_decay, 1.0, spec.num_layers)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    ctx = StepContext(torch.compile(model) if compile else model, optimizer, scaler, device, precision, 1, 1.0, 0.1)
    records: list[dict[str, Any]] = []
    for source in sources:
        if source == "real":
            data = DeviceData(load_train(data_dir), Preprocess(spec.preprocessing()), device)
            order = torch.randperm(len(data))

            def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
                start = (i * batch_size) % (len(data) - batch_size + 1)
                return data.batch(order[start:start + batch_size], augment=(0, 0, 4))
        else:
            x = torch.randn(batch_size, 3, spec.input_size, spec.input_size, device=device)
            y = torch.randint(0, 10, (batch_size,), device=device)

            def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
                return x, y

        for i in range(warmup_steps):
            train_step(ctx, *batch(i))
        _sync(device)
        start = time.perf_counter()
        for i in range(steps):
            train_step(ctx, *batch(warmup_steps + i))
        _sync(device)
        seconds = time.perf_counter() - start
        records.append({
            "model": spec.name,
            "source": source,
            "precision": precision,
            "batch_size": batch_size,
            "input_px": spec.input_size,
            "compiled": compile,
            "timed_steps": steps,
            "warmup_steps": warmup_steps,
            "seconds": seconds,
            "step_ms_mean": 1000 * seconds / steps,
            "train_images_per_s": steps * batch_size / seconds,
            "device": device_record(device),
            "versions": versions(),
        })
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(records, indent=2) + "\n")
    return records
