"""Image-folder datasets end to end: a folder made from real CIFAR-10 test images (PNG, JPEG
and WebP at 48-300 px, grayscale, non-square, EXIF-rotated, and a few bad files) trained at a
64 px store size, resumed exactly, streamed from the memory-mapped cache with the same
batches, exported with INT8, benchmarked and served with the folder's class names; and every
bad layout named."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitdeploy.train.loop as loop
from tests.conftest import SHARED_CIFAR, run_cli, serve_client
from tests.image_folders import picture, source_images, write_image_folder
from tests.test_distributed import assert_same_weights, torchrun
from tests.test_train import assert_same_losses, step_losses
from vitdeploy.bench.run import BenchOptions, run_bench
from vitdeploy.bench.timing import TimingPolicy
from vitdeploy.checkpoint import load_checkpoint
from vitdeploy.data import CLASS_NAMES
from vitdeploy.errors import VitDeployError
from vitdeploy.export.artifacts import ExportOptions, export_artifacts
from vitdeploy.export.int8 import Int8Options
from vitdeploy.imagefolder import cache as image_cache
from vitdeploy.imagefolder.listing import scan
from vitdeploy.imagefolder.splits import StoredSet, default_store_size, load_folder, stratified_split
from vitdeploy.images import Fit
from vitdeploy.preprocess import Preprocess, Preprocessing
from vitdeploy.train import StopRequest, TrainConfig, run_training
from vitdeploy.train.augment import Augmenter, AugmentSettings
from vitdeploy.train.step import DeviceData, StreamData

CLASSES = list(CLASS_NAMES[:4])
QUIET = {"say": lambda _line: None}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images") / "pets", SHARED_CIFAR, classes=4, train_per_class=20,
                              test_per_class=5, bad=True)


def train_args(folder: Path, out: Path) -> list[str]:
    return ["train", "--model", "vit_cifar_tiny", "--data-dir", str(folder), "--store-size", "64", "--epochs", "2",
            "--batch-size", "16", "--val-size", "12", "--recipe", "long", "--skip-bad-images", "--device", "cpu",
            "--log-every", "1", "--out", str(out)]


@pytest.fixture(scope="module")
def run(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`vitdeploy train` as a user runs it: 2 epochs at a 64 px store, every augmentation of the long recipe."""
    out = tmp_path_factory.mktemp("runs") / "pets"
    result = run_cli(*train_args(folder, out))
    assert result.returncode == 0, result.stderr
    assert "--skip-bad-images: 3 files" in result.stdout and "images stored at 64 px" in result.stdout
    return out


def test_the_run_records_the_dataset_and_feeds_the_model_its_crop(run: Path, folder: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    dataset = summary["dataset"]
    assert dataset["kind"] == "image-folder" and dataset["class_names"] == CLASSES
    assert dataset["splits"] == {"train": 68, "val": 12, "test": 20}  # 80 training images (and 3 bad files), 12 held out
    assert dataset["skipped_bad_files"] == 3 and dataset["store"]["size"] == 64
    assert dataset["val_from"] == {"split": "train", "val_size": 12, "seed": 0}
    assert dataset["placement"]["placement"] == "memory"
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["class_names"] == CLASSES and ckpt["dataset"]["cache_key"] == dataset["cache_key"]
    # 32 px crops of 64 px stored images: a picture is fitted shorter side to 64, centre 32 (crop fraction 0.5)
    preprocessing = Preprocessing.from_dict(ckpt["preprocessing"])
    assert (preprocessing.source_size, preprocessing.input_size, preprocessing.crop_fraction) == (32, 32, 0.5)
    assert Fit.of(preprocessing).scale_size == 64
    assert summary["final_test_acc"] is not None and summary["test_images"] == 20
    caches = [p for p in (folder / image_cache.DEFAULT_FOLDER).iterdir()]
    assert [p.name for p in caches] == [dataset["cache_key"]]  # nothing temporary left behind


def test_streamed_stopped_and_resumed_run_equals_the_run_in_memory(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache forced larger than the memory allowed (0 MiB): every split streams from the memory-mapped
    file; stopped mid-epoch and resumed, the run logs the losses of the in-memory run bit for bit."""
    saved = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    streamed = TrainConfig.from_dict({**saved.to_dict(), "out": str(tmp_path / "cut"), "data_memory_mb": 0})
    stop, real_step, calls = StopRequest(), loop.train_step, {"n": 0}

    def stopping_step(ctx, inputs, targets):
        calls["n"] += 1
        if calls["n"] == 3:
            stop.set(signal.SIGTERM)
        return real_step(ctx, inputs, targets)

    monkeypatch.setattr(loop, "train_step", stopping_step)
    assert run_training(streamed, stop=stop).interrupted == signal.SIGTERM
    monkeypatch.setattr(loop, "train_step", real_step)
    ckpt = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert ckpt["step"] == 3 and ckpt["dataset"]["placement"]["placement"] == "stream"
    resumed = run_training(TrainConfig.from_dict(ckpt["config"]), resume=ckpt, resume_dir=tmp_path / "cut").summary
    assert resumed["dataset"]["placement"] == {"placement": "stream", "requested": "auto", "images_bytes": 100 * 3 * 64 * 64,
                                               "budget_bytes": 0, "budget_from": "--data-memory-mb"}
    assert_same_losses(step_losses(run), step_losses(tmp_path / "cut"))
    assert step_losses(run) == step_losses(tmp_path / "cut")  # bitwise, not just close
    full = json.loads((run / "summary.json").read_text())
    assert resumed["final_test_acc"] == full["final_test_acc"] and resumed["best_val_acc"] == full["best_val_acc"]


def test_two_ranks_streaming_train_what_one_rank_in_memory_does(run: Path, folder: Path, tmp_path: Path) -> None:
    """torchrun, 2 ranks: rank 0 decodes into a new cache while rank 1 waits, both stream their shares."""
    result = torchrun(*train_args(folder, tmp_path / "two"), "--data-memory-mb", "0", "--cache-dir", str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    assert_same_weights(run / "last.pt", tmp_path / "two" / "last.pt")
    assert step_losses(tmp_path / "two") == pytest.approx(step_losses(run), abs=1e-4)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["dataset"]["placement"]["placement"] == "stream"
    assert len(list((tmp_path / "cache").iterdir())) == 1  # one cache, no temporary folder left


def test_stream_batches_are_bitwise_the_memory_batches(folder: Path, tmp_path: Path) -> None:
    data = load_folder(folder, 64, "bilinear", 12, 0, cache_dir=tmp_path, skip_bad=True, **QUIET)
    default = load_folder(folder, 64, "bilinear", None, 0, cache_dir=tmp_path, skip_bad=True, **QUIET)  # the cache reused
    assert default.record["val_from"]["val_size"] == 8  # a tenth of the 82 files listed in train/
    pre = Preprocess(Preprocessing(32, 32, "bilinear", (0.5,) * 3, (0.25,) * 3, 0.5))
    settings = AugmentSettings(crop_padding=2, augment="trivial", erase_prob=0.5, mixup_alpha=0.8, cutmix_alpha=1.0, crop_size=32)
    augmenter = Augmenter(settings, pre, 4, seed=3)
    from vitdeploy.data import ImageSet

    memory = DeviceData(ImageSet(data.train.on(torch.device("cpu")), data.train.labels), pre, torch.device("cpu"), augmenter, crop=32)
    stream = StreamData(data.train, pre, torch.device("cpu"), augmenter, crop=32)
    plan = [torch.randperm(len(data.train), generator=torch.Generator().manual_seed(i))[:16] for i in range(5)]
    for (xa, ya), (xb, yb) in zip(memory.batches(plan, epoch=1), stream.batches(plan, epoch=1), strict=True):
        assert xa.shape == (16, 3, 32, 32) and torch.equal(xa, xb) and torch.equal(ya, yb)
    evaluation = [torch.arange(0, 8), torch.arange(8, 12)]
    for (xa, ya), (xb, yb) in zip(memory.batches(evaluation), stream.batches(evaluation), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    centre = data.train.gather(np.arange(8))[:, :, 16:48, 16:48]
    assert torch.equal(memory.batches(evaluation).__next__()[0], pre(centre))  # evaluation sees the centre crop


def test_export_int8_bench_and_serve_use_the_folder(run: Path, folder: Path, tmp_path: Path) -> None:
    art = tmp_path / "art"
    too_many = ExportOptions(source=run, out=tmp_path / "x", int8=True, max_batch=16)  # 512 by default
    with pytest.raises(VitDeployError, match="--calib-images 512 exceeds the 70 training images outside the validation split"):
        export_artifacts(too_many, **QUIET)
    manifest = export_artifacts(ExportOptions(source=run, out=art, int8=True, max_batch=16,
                                              int8_options=Int8Options(calib_images=48)), **QUIET)
    assert manifest["model"]["class_names"] == CLASSES
    assert manifest["dataset"]["kind"] == "image-folder" and "placement" not in manifest["dataset"]
    assert manifest["parity_data"]["images"] == 20 and "pets test" in manifest["parity_data"]["labels"]
    kinds = {a["path"]: a for a in manifest["artifacts"]}
    assert kinds["model_int8_cpu.onnx"]["parity"]["passed"] and kinds["model.onnx"]["parity"]["accuracy_pct"] is not None
    report = run_bench(BenchOptions(artifacts=art, backends=("ort-cpu",), precisions=("fp32", "int8"), batch_sizes=(4,),
                                    policy=TimingPolicy(warmup=0, min_iters=1, min_seconds=0, max_seconds=1)), say=lambda _: None)
    parity = {p["precision"]: p for p in report["parity"]}
    assert parity["fp32"]["images"] == 20 and parity["fp32"]["passed"] and parity["int8"]["passed"]
    assert parity["fp32"]["accuracy_pct"] is not None  # the model's classes are the folder's: labelled
    test_file = next(f for f in scan(folder).splits["test"] if f.path.endswith(".jpg"))
    body = (folder / test_file.path).read_bytes()
    with serve_client(artifacts=art, max_batch=4) as client:
        predictions = client.post("/v1/predict", content=body, headers={"content-type": "image/jpeg"}).json()["predictions"]
    assert sorted(p["label"] for p in predictions) == sorted(CLASSES)  # every class of the folder, by its name (top 4 of 4)
    # what the server answered is the checkpoint's answer on the picture fitted as the run stored it
    from vitdeploy.images import decode_image
    from vitdeploy.models import load_model

    loaded = load_model(run)
    pixels = torch.from_numpy(decode_image(body, Fit.of(loaded.preprocessing)))[None]
    with torch.no_grad():
        expected = torch.softmax(loaded.module(Preprocess(loaded.preprocessing)(pixels)), 1)[0]
    served = {p["class_index"]: p["probability"] for p in predictions}
    assert max(abs(served[i] - float(expected[i])) for i in range(4)) < 1e-4


def test_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "small", SHARED_CIFAR, classes=3, train_per_class=4, test_per_class=0)
    listing = scan(root)
    rule = image_cache.StoreRule(48, "bicubic")
    first = image_cache.open_or_build(listing, rule, None, workers=2, **QUIET)
    again = image_cache.open_or_build(scan(root), rule, None, workers=2, **QUIET)
    assert first.built and not again.built and again.key == first.key
    assert np.array_equal(again.splits["train"].images, first.splits["train"].images)
    changed = root / listing.splits["train"][0].path
    changed.write_bytes(picture(source_images(SHARED_CIFAR, 50)[0][7], 3)[0])
    os.utime(changed, ns=(1, 1))  # a new modification time (and contents)
    rebuilt = image_cache.open_or_build(scan(root), rule, None, workers=1, **QUIET)
    assert rebuilt.built and rebuilt.key != first.key
    assert not np.array_equal(rebuilt.splits["train"].images[0], first.splits["train"].images[0])
    assert image_cache.open_or_build(scan(root), image_cache.StoreRule(40, "bicubic"), None, 1, **QUIET).key != first.key
    damaged = rebuilt.path / "train.images.npy"
    damaged.write_bytes(damaged.read_bytes()[:200])
    with pytest.raises(VitDeployError, match=f"the image cache {rebuilt.path} is damaged.*delete"):
        image_cache.open_or_build(scan(root), rule, None, 1, **QUIET)


def test_an_interrupted_build_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_image_folder(tmp_path / "small", SHARED_CIFAR, classes=2, train_per_class=3, test_per_class=0)

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(image_cache, "decode_chunk", killed)
    with pytest.raises(KeyboardInterrupt):
        image_cache.open_or_build(scan(root), image_cache.StoreRule(32, "bicubic"), None, 1, **QUIET)
    assert list((root / image_cache.DEFAULT_FOLDER).iterdir()) == []


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _png(side: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def png() -> bytes:
    return picture(source_images(SHARED_CIFAR, 10)[0][0], 0)[0]  # 48 px PNG


def test_bad_layouts_are_named(tmp_path: Path, png: bytes) -> None:
    cases = {
        "one": ({"train/cat/a.png": png}, "holds 1 class folder \\(cat\\); a classifier needs at least 2"),
        "empty": ({"train/cat/a.png": png, "train/dog/notes.txt": b"x"}, "class folder .*train/dog holds no images \\(1 other files\\)"),
        "differ": ({"train/cat/a.png": png, "train/dog/a.png": png, "test/cat/a.png": png, "test/cow/a.png": png},
                   "test does not have the classes of .*train: missing dog; not in train: cow"),
        "none": ({"images/a.png": png}, "is not an image-folder dataset: it needs .*/train/CLASS/IMAGE"),
    }
    for name, (files, message) in cases.items():
        with pytest.raises(VitDeployError, match=message):
            scan(_tree(tmp_path / name, files))


def test_bad_files_are_named_or_counted(tmp_path: Path, png: bytes) -> None:
    outside = tmp_path / "secret.png"
    outside.write_bytes(png)
    root = _tree(tmp_path / "data", {"train/cat/a.png": png, "train/cat/b.png": png, "train/dog/a.png": png,
                                      "train/dog/b.png": png, "train/dog/c.jpg": b"\xff\xd8\xff garbage",
                                      "train/stray.png": png, "train/dog/tiny.png": _png(20)})
    (root / "train" / "cat" / "link.png").symlink_to(outside)
    (root / "train" / ".DS_Store").write_bytes(b"metadata")  # hidden files are not data
    with pytest.raises(VitDeployError) as error:
        load_folder(root, 96, "bicubic", 1, 0, cache_dir=tmp_path / "cache", **QUIET)
    message = str(error.value)
    assert "4 of 8 files cannot be used" in message and "--skip-bad-images" in message
    for part in ("train/stray.png (outside any class folder)", "train/cat/link.png (a link that leads outside the dataset)",
                 "train/dog/c.jpg (the file is not a readable image", "train/dog/tiny.png (the file is 20x20 px, too small"):
        assert part in message
    data = load_folder(root, 96, "bicubic", 2, 0, cache_dir=tmp_path / "cache", skip_bad=True, **QUIET)
    assert data.record["skipped_bad_files"] == 4 and len(data.train) + len(data.val) == 4


def test_stratified_validation_keeps_each_class_share() -> None:
    labels = np.repeat(np.arange(3), [50, 30, 20])
    train, val = stratified_split(labels, 10, seed=1, num_classes=3)
    assert np.bincount(labels[val], minlength=3).tolist() == [5, 3, 2]
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 100
    assert np.array_equal(stratified_split(labels, 10, 1, 3)[1], val) and not np.array_equal(stratified_split(labels, 10, 2, 3)[1], val)
    with pytest.raises(VitDeployError, match="--val-size must be between 1 and 97"):
        stratified_split(labels, 98, 1, 3)


def test_store_size_is_checked(folder: Path, tmp_path: Path) -> None:
    assert default_store_size(224) == 256 and default_store_size(32) == 36
    base = dict(model="vit_cifar_tiny", data_dir=str(folder), out=str(tmp_path / "r"), epochs=1, batch_size=16, val_size=12,
                skip_bad_images=True, device="cpu")
    with pytest.raises(VitDeployError, match="larger than the model's 32 px input by an odd number"):
        run_training(TrainConfig(**base, store_size=65))
    with pytest.raises(VitDeployError, match="--store-size must lie in 8..1024"):
        TrainConfig(**base, store_size=4096)
    with pytest.raises(VitDeployError, match="--crop-padding must not be above 36 px"):
        run_training(TrainConfig(**base, crop_padding=40))


def test_cli_names_bad_files_and_cifar_refuses_folder_options(folder: Path, cifar_root: Path, tmp_path: Path) -> None:
    result = run_cli("train", "--model", "vit_cifar_tiny", "--data-dir", str(folder), "--epochs", "1", "--device", "cpu",
                     "--out", str(tmp_path / "r"))
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "3 of 103 files cannot be used" in result.stderr
    result = run_cli("train", "--model", "vit_cifar_tiny", "--data-dir", str(cifar_root), "--store-size", "64",
                     "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "c"))
    assert result.returncode == 1 and "--store-size and --skip-bad-images are for image folders" in result.stderr


def test_stored_set_reads_only_its_rows(tmp_path: Path) -> None:
    images = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.uint8, shape=(6, 3, 4, 4))
    images[:] = np.arange(6)[:, None, None, None]
    stored = StoredSet(np.load(tmp_path / "x.npy", mmap_mode="c"), torch.arange(6), np.arange(6)).take(np.array([5, 1, 3]))
    assert stored.gather(np.array([2, 0]))[:, 0, 0, 0].tolist() == [3, 5] and stored.labels.tolist() == [5, 1, 3]
    assert stored.nbytes == 3 * 48 and sys.getsizeof(stored.images) < 1000  # a view of the file, not a copy
