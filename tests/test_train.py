"""Training on small CIFAR-format data: learning, checkpoints, summary, and exact resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vitdeploy.train.loop as loop
from tests.conftest import REPO
from vitdeploy.checkpoint import load_checkpoint
from vitdeploy.errors import VitDeployError
from vitdeploy.models import model_from_checkpoint
from vitdeploy.train import StopRequest, TrainConfig, run_training


def config(cifar_root: Path, out: Path, **overrides) -> TrainConfig:
    base = dict(data_dir=str(cifar_root), out=str(out), epochs=2, batch_size=16, lr=1e-3, val_size=40,
                log_every=1, device="cpu", keep_checkpoints=0, crop_padding=4)  # crops on: resume must replay them
    return TrainConfig.from_options("vit_cifar_tiny", **{**base, **overrides})


def step_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["type"] == "step"}


def assert_same_losses(a: dict[int, float], b: dict[int, float]) -> None:
    assert sorted(a) == sorted(b)
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])


@pytest.fixture(scope="module")
def full_run(cifar_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted two-epoch run, the reference for the resume tests."""
    out = tmp_path_factory.mktemp("full") / "run"
    result = run_training(config(cifar_root, out))
    assert result.interrupted is None
    return out


def test_training_lowers_the_loss_and_writes_its_files(full_run: Path) -> None:
    losses = list(step_losses(full_run).values())
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    for name in ("config.json", "metrics.jsonl", "summary.json", "last.pt", "best.pt", "checkpoints/epoch-0001.pt", "checkpoints/epoch-0002.pt"):
        assert (full_run / name).is_file(), name
    summary = json.loads((full_run / "summary.json").read_text())
    assert summary["epochs_completed"] == summary["ended_in_epoch"] == 2 and summary["steps"] == 20
    assert summary["train_images"] == 320 and summary["weights"] == "model" and summary["recipe"] == "short"
    assert summary["train_images_per_s"] == pytest.approx(summary["train_images"] / summary["train_loop_seconds"])
    assert "evaluation and checkpointing excluded" in summary["train_images_per_s_definition"]
    assert summary["test_images"] == 50 and 0 <= summary["final_test_acc"] <= 1
    assert summary["device"]["type"] == "cpu" and summary["versions"]["torch"] == torch.__version__


def test_checkpoint_describes_how_to_feed_the_model(full_run: Path) -> None:
    ckpt = load_checkpoint(full_run / "last.pt")  # weights_only=True inside
    assert ckpt["model_name"] == "vit_cifar_tiny" and ckpt["epoch"] == 2 and ckpt["step"] == 20
    assert ckpt["preprocessing"] == {"source_size": 32, "input_size": 32, "resize_mode": "bilinear",
                                     "mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.2435, 0.2616],
                                     "crop_fraction": None}
    assert ckpt["class_names"][0] == "airplane" and len(ckpt["class_names"]) == 10
    assert ckpt["config"]["batch_size"] == 16 and ckpt["precision"] == "fp32"
    for key in ("model", "optimizer", "scheduler", "scaler", "rng", "progress"):
        assert key in ckpt
    assert (full_run / "last.pt").samefile(full_run / "checkpoints" / "epoch-0002.pt")


def test_stop_mid_epoch_then_resume_matches_uninterrupted(cifar_root: Path, tmp_path: Path, full_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stop = StopRequest()
    calls = {"n": 0}
    real_step = loop.train_step

    def counting_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 13:  # step 13 of 20: in the middle of epoch 2
            stop.set(signal.SIGTERM)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", counting_step)
    out = tmp_path / "run"
    result = run_training(config(cifar_root, out), stop=stop)
    assert result.interrupted == signal.SIGTERM and result.summary is None
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 13 and ckpt["progress"]["batch"] == 3
    monkeypatch.setattr(loop, "train_step", real_step)
    cfg = TrainConfig.from_dict(ckpt["config"])
    resumed = run_training(cfg, resume=ckpt, resume_dir=out)
    assert_same_losses(step_losses(full_run), step_losses(out))
    reference = json.loads((full_run / "summary.json").read_text())
    assert resumed.summary["final_test_acc"] == reference["final_test_acc"]
    assert resumed.summary["best_val_acc"] == reference["best_val_acc"]


def test_resume_from_epoch_one_checkpoint_into_new_folder(full_run: Path, tmp_path: Path) -> None:
    ckpt = load_checkpoint(full_run / "checkpoints" / "epoch-0001.pt")
    cfg = TrainConfig.from_dict(ckpt["config"]).resumed({"out": str(tmp_path / "again")})
    result = run_training(cfg, resume=ckpt, resume_dir=full_run)
    reference = json.loads((full_run / "summary.json").read_text())
    assert result.summary["final_test_acc"] == reference["final_test_acc"]
    assert_same_losses(step_losses(full_run), step_losses(tmp_path / "again"))


def test_resume_refuses_changed_settings(full_run: Path) -> None:
    saved = TrainConfig.from_dict(load_checkpoint(full_run)["config"])
    with pytest.raises(VitDeployError, match="trained with --model vit_cifar_tiny, not vit_cifar_small"):
        saved.resumed({"model": "vit_cifar_small"})
    with pytest.raises(VitDeployError, match="--lr"):
        saved.resumed({"lr": 0.5})
    assert saved.resumed({"epochs": 4, "lr": saved.lr}).epochs == 4


def test_max_steps_and_subset(cifar_root: Path, tmp_path: Path) -> None:
    result = run_training(config(cifar_root, tmp_path / "run", max_steps=3, subset=64))
    assert result.summary["steps"] == 3 and result.summary["train_images"] == 48
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["progress"]["batch"] == 3 and ckpt["epoch"] == 0  # resumable inside epoch 1
    summary = result.summary  # 4 steps per epoch: stopped inside the first
    assert (summary["epochs_completed"], summary["ended_in_epoch"], summary["best_epoch"]) == (0, 1, 1)


def test_summary_fields_agree_for_a_run_cut_inside_its_second_epoch(cifar_root: Path, tmp_path: Path) -> None:
    """3 steps per epoch, stopped at step 4: one epoch completed, ended (and best) in epoch 2;
    --test-size 0 skips the test pass and says so; --val-size and --test-size counts are reported."""
    summary = run_training(config(cifar_root, tmp_path / "a", max_steps=4, subset=48, test_size=0, val_size=30)).summary
    assert (summary["epochs_completed"], summary["ended_in_epoch"], summary["steps"]) == (1, 2, 4)
    assert 1 <= summary["best_epoch"] <= summary["ended_in_epoch"] and summary["best_step"] in (3, 4)
    assert summary["test_images"] == 0 and summary["final_test_acc"] is None and summary["best_test_acc"] is None
    assert summary["val_images"] == 30
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if r["type"] == "test"]
    summary = run_training(config(cifar_root, tmp_path / "b", max_steps=1, test_size=7, test_each_epoch=True)).summary
    assert summary["test_images"] == 7 and summary["final_test_acc"] is not None
    epoch = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines() if '"epoch"' in line][-1]
    assert epoch["test_acc"] == summary["final_test_acc"] and epoch["train_seconds"] > 0


def test_test_and_val_sizes_are_checked(cifar_root: Path, tmp_path: Path) -> None:
    with pytest.raises(VitDeployError, match=r"--test-size must be between 0 \(no test pass\) and 50"):
        run_training(config(cifar_root, tmp_path / "t", test_size=51))
    with pytest.raises(VitDeployError, match="--val-size must be between 1 and 199"):
        run_training(config(cifar_root, tmp_path / "v", val_size=200))
    assert not (tmp_path / "t").exists() and not (tmp_path / "v").exists()


def test_long_recipe_stop_and_resume_matches_uninterrupted(cifar_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every augmentation and the EMA on: a run stopped mid-epoch and resumed logs the same
    losses, ends with the same EMA (update count included) and reports the same accuracy."""
    def long_config(out: Path) -> TrainConfig:
        return config(cifar_root, out, recipe="long", erase_prob=0.5, test_size=20)

    full = run_training(long_config(tmp_path / "full")).summary
    assert full["recipe"] == "long" and full["weights"] == "ema" and full["ema_decay"] == 0.5  # 20 steps: the floor
    stop = StopRequest()
    real_step = loop.train_step
    calls = {"n": 0}

    def stopping_step(ctx, inputs, targets):
        assert targets.dtype == torch.float32 and targets.shape == (16, 10)  # mixed labels
        calls["n"] += 1
        if calls["n"] == 13:
            stop.set(signal.SIGTERM)
        return real_step(ctx, inputs, targets)

    monkeypatch.setattr(loop, "train_step", stopping_step)
    assert run_training(long_config(tmp_path / "cut"), stop=stop).interrupted == signal.SIGTERM
    monkeypatch.setattr(loop, "train_step", real_step)
    ckpt = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert ckpt["step"] == 13 and ckpt["ema"]["updates"] == 13
    resumed = run_training(TrainConfig.from_dict(ckpt["config"]), resume=ckpt, resume_dir=tmp_path / "cut").summary
    assert_same_losses(step_losses(tmp_path / "full"), step_losses(tmp_path / "cut"))
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    assert a["ema"]["updates"] == b["ema"]["updates"] == 20
    for key, value in a["ema"]["state"].items():
        torch.testing.assert_close(b["ema"]["state"][key], value, rtol=1e-5, atol=1e-6)
    assert resumed["final_test_acc"] == full["final_test_acc"] and resumed["best_val_acc"] == full["best_val_acc"]
    _spec, model = model_from_checkpoint(a, "last.pt")  # what export and the pytorch backend load: the EMA
    assert torch.equal(model.state_dict()["heads.head.weight"], a["ema"]["state"]["heads.head.weight"])
    assert not torch.equal(a["model"]["heads.head.weight"], a["ema"]["state"]["heads.head.weight"])


def test_grad_accum_keeps_the_global_batch(cifar_root: Path, tmp_path: Path) -> None:
    result = run_training(config(cifar_root, tmp_path / "run", max_steps=2, grad_accum=4))
    assert result.summary["train_images"] == 32
    with pytest.raises(VitDeployError, match="divisible by --grad-accum"):
        config(cifar_root, tmp_path / "x", grad_accum=3)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vitdeploy", "train", "--model", "vit_cifar_tiny", "--device", "cpu",
            "--epochs", "2", "--batch-size", "16", "--val-size", "40", "--log-every", "1", "--crop-padding", "4", *args]


def test_sigterm_mid_epoch_then_resume_matches_uninterrupted(cifar_root: Path, tmp_path: Path) -> None:
    """Real processes and a real SIGTERM, as a user or a cluster scheduler would send it."""
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    ref, run = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_cli("--data-dir", str(cifar_root), "--out", str(ref)), check=True, env=env, capture_output=True, timeout=300)
    proc = subprocess.Popen(_cli("--data-dir", str(cifar_root), "--out", str(run)), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "resumable checkpoint" in output
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["step"] < 20 and ckpt["progress"]["batch"] > 0  # stopped inside an epoch
    resumed = subprocess.run([sys.executable, "-m", "vitdeploy", "train", "--resume", str(run)],
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_losses(step_losses(ref), step_losses(run))
    assert json.loads((ref / "summary.json").read_text())["final_test_acc"] == json.loads((run / "summary.json").read_text())["final_test_acc"]


def test_recipes_resolve_from_the_epochs_and_stay_overridable() -> None:
    short, long = TrainConfig.from_options("vit_cifar_tiny", epochs=2), TrainConfig.from_options("vit_cifar_tiny", epochs=10)
    assert (short.recipe, short.augment, short.mixup, short.ema, short.batch_size) == ("short", "none", False, False, 128)
    assert (long.recipe, long.augment, long.mixup, long.cutmix, long.ema) == ("long", "trivial", True, True, True)
    assert TrainConfig.from_options("vit_cifar_tiny", recipe="long", epochs=2, ema=False, mixup=False).ema is False
    assert TrainConfig.from_options("vit_b_16").recipe == "short" and TrainConfig.from_options("vit_cifar_small").recipe == "long"
    with pytest.raises(VitDeployError, match="unknown recipe 'medium'; use auto, short or long"):
        TrainConfig.from_options("vit_cifar_tiny", recipe="medium")
    for bad, message in (({"mixup": True, "mixup_alpha": 0.0}, "--mixup-alpha must be positive"),
                         ({"cutmix": True, "cutmix_alpha": -1.0}, "--cutmix-alpha must be positive"),
                         ({"ema": True, "ema_decay": 1.0}, "--ema-decay must be in \\(0, 1\\)"),
                         ({"test_size": -1}, "--test-size must be 0"), ({"val_size": -5}, "--val-size must be at least 1"),
                         ({"erase_prob": 1.0}, "--erase-prob"), ({"augment": "auto"}, "--augment must be one of")):
        with pytest.raises(VitDeployError, match=message):
            TrainConfig.from_options("vit_cifar_tiny", **bad)
    with pytest.raises(VitDeployError, match="even share"):
        TrainConfig.from_options("vit_cifar_tiny", recipe="long", batch_size=12).check_ranks(4)


def test_random_crops_default_on_only_for_long_runs(cifar_root: Path, tmp_path: Path) -> None:
    assert TrainConfig.from_options("vit_cifar_tiny", epochs=2).crop_padding == 0
    assert TrainConfig.from_options("vit_cifar_tiny", epochs=10).crop_padding == 4
    assert TrainConfig.from_options("vit_cifar_tiny").crop_padding == 4  # the recipe's 100 epochs
    assert TrainConfig.from_options("vit_cifar_tiny", epochs=2, crop_padding=2).crop_padding == 2
    with pytest.raises(VitDeployError, match="--crop-padding must not be negative"):
        TrainConfig.from_options("vit_cifar_tiny", crop_padding=-1)
    saved = TrainConfig.from_options("vit_cifar_tiny", epochs=2)
    with pytest.raises(VitDeployError, match="trained with --crop-padding 0, not 4"):
        saved.resumed({"crop_padding": 4})
