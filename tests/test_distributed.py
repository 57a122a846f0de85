"""Data-parallel training under torch.distributed with gloo on the CPU, 2 processes
started by the tests: same weights as 1 process, exact sharded evaluation, resume across
world sizes, SIGTERM on one rank stops all, a killed rank ends the job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import REPO, free_port, write_cifar
from vitdeploy.data import ImageSet
from vitdeploy.models import build_model, get_spec
from vitdeploy.preprocess import Preprocess
from vitdeploy.train import distributed
from vitdeploy.train.step import DeviceData, evaluate

TRAIN = ["train", "--model", "vit_cifar_tiny", "--device", "cpu", "--epochs", "2", "--batch-size", "16",
         "--val-size", "41", "--subset", "137", "--log-every", "1", "--crop-padding", "4"]  # augmentation on
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "VITDEPLOY_DIST_TIMEOUT_S": "30"}


def torchrun(*args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "vitdeploy", *args]
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def single(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitdeploy", *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def ranks(*args: str, world: int = 2) -> list[subprocess.Popen]:
    """The ranks of a job started directly (as torchrun would), so a test can signal one of them."""
    port = str(free_port())
    return [subprocess.Popen([sys.executable, "-m", "vitdeploy", *args], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env={**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(world),
                                  "RANK": str(r), "LOCAL_RANK": str(r)})
            for r in range(world)]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=2e-5, rtol=1e-4, msg=key)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cifar(tmp_path_factory.mktemp("ddp-data"), per_batch=40, test_size=101)


@pytest.fixture(scope="module")
def runs(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The same 2-epoch run on 1 rank and on 2 ranks (global batch 16 both times)."""
    root = tmp_path_factory.mktemp("ddp-runs")
    one = single(*TRAIN, "--data-dir", str(data), "--out", str(root / "one"))
    assert one.returncode == 0, one.stderr
    two = torchrun(*TRAIN, "--data-dir", str(data), "--out", str(root / "two"))
    assert two.returncode == 0, two.stderr
    return {1: root / "one", 2: root / "two"}


def test_two_ranks_train_the_same_weights_as_one(runs: dict[int, Path]) -> None:
    assert_same_weights(runs[1] / "last.pt", runs[2] / "last.pt")
    one, two = (json.loads((runs[n] / "summary.json").read_text()) for n in (1, 2))
    assert two["world_size"] == 2 and len(two["replica_parameter_sums"]) == 2
    assert two["replica_parameter_sums"][0] == two["replica_parameter_sums"][1]  # both ranks hold the same weights
    assert one["steps"] == two["steps"] == 2 * (137 // 16)  # --subset counts training images
    assert one["train_images"] == two["train_images"]
    losses = [[json.loads(line)["loss"] for line in (runs[n] / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["type"] == "step"] for n in (1, 2)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)  # rank 0 logs the global batch's loss
    assert one["final_test_acc"] == two["final_test_acc"] and one["best_val_acc"] == two["best_val_acc"]


@pytest.mark.parametrize(("trained_on", "resumed_on"), [(2, 1), (1, 2)])
def test_checkpoints_resume_on_another_number_of_ranks(runs: dict[int, Path], tmp_path: Path, data: Path,
                                                       trained_on: int, resumed_on: int) -> None:
    checkpoint = runs[trained_on] / "checkpoints" / "epoch-0001.pt"
    args = ["train", "--resume", str(checkpoint), "--out", str(tmp_path / "resumed"), "--data-dir", str(data)]
    result = single(*args) if resumed_on == 1 else single(*args, "--nproc-per-node", "2")  # the relaunch convenience
    assert result.returncode == 0, result.stderr
    assert_same_weights(runs[trained_on] / "last.pt", tmp_path / "resumed" / "last.pt")


def _sharded_eval(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), VITDEPLOY_DIST_TIMEOUT_S="30")
    torch.set_num_threads(1)
    ctx = distributed.setup("cpu")
    try:
        torch.manual_seed(0)
        spec = get_spec("vit_cifar_tiny")
        model = build_model(spec)
        torch.nn.init.normal_(model.heads.head.weight, std=0.1)  # a head that is not all zeros
        generator = torch.Generator().manual_seed(1)
        images = ImageSet(torch.randint(0, 256, (1001, 3, 32, 32), dtype=torch.uint8, generator=generator),
                          torch.randint(0, 10, (1001,), generator=generator))
        data = DeviceData(images, Preprocess(spec.preprocessing()), torch.device("cpu"))
        result = evaluate(model, data, 64, "fp32", ctx if world > 1 else None)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        distributed.teardown(ctx)


def test_sharded_evaluation_of_an_odd_set_equals_one_process(tmp_path: Path) -> None:
    mp.spawn(_sharded_eval, args=(2, free_port(), str(tmp_path / "two.json")), nprocs=2, join=True)
    _sharded_eval(0, 1, free_port(), str(tmp_path / "one.json"))
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["images"] == one["images"] == 1001
    assert two["acc"] == one["acc"]  # counts of correct images: exact
    # float32 logits: shards of another size may take other CPU kernels (AVX-512 machines do), which move the
    # mean loss in its 8th digit; every image is counted once (above), so more than float32 rounding would fail
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)


def wait_for_steps(run: Path, steps: int, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.time() + timeout
    metrics = run / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.is_file() and sum('"type": "step"' in line for line in metrics.read_text().splitlines()) >= steps:
            return
        assert all(p.poll() is None for p in procs), [p.stdout.read() for p in procs]
        time.sleep(0.1)
    raise AssertionError("the job made no progress")


def test_sigterm_to_one_rank_stops_all_with_a_resumable_checkpoint(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    procs = ranks(*TRAIN[:5], "--epochs", "40", *TRAIN[7:], "--data-dir", str(data), "--out", str(run))
    wait_for_steps(run, 3, procs)
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=60) for p in procs]
    assert codes == [128 + signal.SIGTERM] * 2, [p.stdout.read() for p in procs]
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    assert 3 <= checkpoint["step"] < 40 * (137 // 16)
    resumed = single("train", "--resume", str(run), "--max-steps", str(checkpoint["step"] + 2))
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(run / "last.pt", weights_only=True)["step"] == checkpoint["step"] + 2


def test_a_killed_rank_ends_the_job(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    procs = ranks(*TRAIN[:5], "--epochs", "40", *TRAIN[7:], "--data-dir", str(data), "--out", str(run))
    wait_for_steps(run, 3, procs)
    start = time.time()
    procs[1].kill()
    code = procs[0].wait(timeout=90)
    assert code != 0 and time.time() - start < 60


def test_a_batch_that_does_not_split_over_the_ranks_is_refused_before_launch(data: Path, tmp_path: Path) -> None:
    result = single("train", "--model", "vit_cifar_tiny", "--data-dir", str(data), "--out", str(tmp_path / "x"),
                    "--batch-size", "15", "--nproc-per-node", "2", timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: --batch-size 15 is global and must split evenly over 2 ranks x --grad-accum 1; choose a multiple of 2"]
