"""CUDA checks, run by scripts/gpu_check.sh on a GPU machine and skipped elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vitdeploy.data import load_train
from vitdeploy.models import build_model, get_spec
from vitdeploy.preprocess import Preprocess
from vitdeploy.train import TrainConfig, run_training
from vitdeploy.train.augment import Augmenter, AugmentSettings
from vitdeploy.train.precision import choose_precision, native_bf16
from vitdeploy.train.step import DeviceData, evaluate

pytestmark = pytest.mark.gpu


def test_device_pipeline_matches_cpu(cifar_root: Path) -> None:
    images = load_train(cifar_root)
    spec = get_spec("vit_b_16")
    indices = torch.arange(0, 64)
    settings = AugmentSettings(crop_padding=4)
    cpu = DeviceData(images, Preprocess(spec.preprocessing()), torch.device("cpu"),
                     Augmenter(settings, Preprocess(spec.preprocessing()), 10, seed=1)).batch(indices, epoch=2)
    gpu = DeviceData(images, Preprocess(spec.preprocessing()), torch.device("cuda"),
                     Augmenter(settings, Preprocess(spec.preprocessing()).cuda(), 10, seed=1)).batch(indices, epoch=2)
    assert gpu[0].shape == (64, 3, 224, 224)
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(gpu[1].cpu(), cpu[1])


def test_long_recipe_augmentation_matches_cpu(cifar_root: Path) -> None:
    """TrivialAugmentWide, erasing, mixup and cutmix on the GPU give the CPU's batch (uint8
    arithmetic may round a rare pixel one level apart, and a sampling point that falls
    exactly on a pixel border may pick the neighbour)."""
    images = load_train(cifar_root)
    spec = get_spec("vit_cifar_small")
    settings = AugmentSettings(crop_padding=4, augment="trivial", erase_prob=0.25, mixup_alpha=0.8, cutmix_alpha=1.0,
                               fill=(125, 123, 114))
    indices = torch.arange(0, 256)
    outputs = []
    for device in ("cpu", "cuda"):
        augmenter = Augmenter(settings, Preprocess(spec.preprocessing()).to(device), 10, seed=3)
        outputs.append(DeviceData(images, Preprocess(spec.preprocessing()), torch.device(device), augmenter).batch(indices, epoch=1))
    (cpu_x, cpu_y), (gpu_x, gpu_y) = outputs
    one_level = 1 / (255 * min(spec.std)) + 1e-4
    diff = (gpu_x.cpu() - cpu_x).abs()
    assert (diff > one_level).float().mean() < 1e-4 and (diff > 1e-4).float().mean() < 1e-3
    torch.testing.assert_close(gpu_y.cpu(), cpu_y)


def test_auto_precision_on_this_gpu() -> None:
    capability = torch.cuda.get_device_capability()
    assert choose_precision(torch.device("cuda")) == ("bf16" if native_bf16(capability) else "fp16")


def test_short_training_run_on_gpu(cifar_root: Path, tmp_path: Path) -> None:
    config = TrainConfig.from_options("vit_cifar_tiny", data_dir=str(cifar_root), out=str(tmp_path / "run"), epochs=3,
                                      batch_size=16, val_size=40, log_every=1, device="cuda")
    result = run_training(config)
    summary = result.summary
    assert summary["device"]["type"] == "cuda" and summary["precision"] in ("bf16", "fp16")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["type"] == "step"]
    assert sum(losses[-3:]) < sum(losses[:3])


def test_mixed_precision_eval_agrees_with_fp32(cifar_root: Path) -> None:
    spec = get_spec("vit_cifar_small")
    torch.manual_seed(0)
    model = build_model(spec).cuda()
    data = DeviceData(load_train(cifar_root), Preprocess(spec.preprocessing()), torch.device("cuda"))
    precision = choose_precision(torch.device("cuda"))
    fp32, mixed = evaluate(model, data, 64, "fp32"), evaluate(model, data, 64, precision)
    assert abs(fp32["loss"] - mixed["loss"]) < 0.05


def test_bench_pytorch_on_gpu_times_both_modes(exported: Path, cifar_root: Path) -> None:
    from vitdeploy.bench.run import BenchOptions, run_bench
    from vitdeploy.bench.timing import TimingPolicy

    options = BenchOptions(artifacts=exported, backends=("pytorch",), batch_sizes=(1, 8), data_dir=cifar_root,
                           policy=TimingPolicy(warmup=1, min_iters=3, min_seconds=0, max_seconds=1))
    report = run_bench(options, say=lambda _line: None)
    assert {(r["precision"], r["mode"]) for r in report["records"]} == {
        (p, m) for p in ("fp32", "fp16", "bf16") for m in ("end-to-end", "device")}
    assert all(p["passed"] for p in report["parity"]), report["parity"]
    assert report["environment"]["gpu"]["name"] == torch.cuda.get_device_name(0)
