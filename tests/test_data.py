"""Reading CIFAR-10 batch files: layout, validation, splits, and refusal of bad files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import write_cifar
from vitdeploy.data import (
    CLASS_NAMES,
    find_cifar_dir,
    load_splits,
    load_test,
    load_train,
    read_batch,
    split_validation,
)
from vitdeploy.errors import VitDeployError


def test_reads_standard_layout(cifar_root: Path) -> None:
    train = load_train(cifar_root)
    assert train.images.dtype == torch.uint8 and train.images.shape == (200, 3, 32, 32)
    assert train.labels.dtype == torch.int64 and train.labels.shape == (200,)
    # Row layout R(1024) G(1024) B(1024) becomes NCHW: compare with the raw pickle.
    with open(cifar_root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = pickle.load(f)
    np.testing.assert_array_equal(train.images[:40].numpy(), raw["data"].reshape(40, 3, 32, 32))
    assert train.labels[:40].tolist() == raw["labels"]


def test_accepts_the_batches_folder_itself(cifar_root: Path) -> None:
    assert find_cifar_dir(cifar_root / "cifar-10-batches-py") == cifar_root / "cifar-10-batches-py"


def test_real_test_set(shared_cifar: Path) -> None:
    test = load_test(shared_cifar.parent)
    assert test.images.shape == (10000, 3, 32, 32)
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert len(CLASS_NAMES) == 10


def test_validation_split_is_fixed_by_seed_and_disjoint(cifar_root: Path) -> None:
    train = load_train(cifar_root)
    a_train, a_val = split_validation(train, 30, seed=1)
    b_train, b_val = split_validation(train, 30, seed=1)
    c_train, c_val = split_validation(train, 30, seed=2)
    assert len(a_val) == 30 and len(a_train) == 170
    assert torch.equal(a_val.images, b_val.images)
    assert not torch.equal(a_val.images, c_val.images)
    flat = {bytes(x.numpy()) for x in train.images}
    assert len(flat) == 200  # the fixture's images are distinct, so the check below means something
    assert not {bytes(x.numpy()) for x in a_val.images} & {bytes(x.numpy()) for x in a_train.images}


def test_subset_and_splits(cifar_root: Path) -> None:
    splits = load_splits(cifar_root, val_size=40, seed=0, subset=64)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (64, 40, 50)
    with pytest.raises(VitDeployError, match="--val-size"):
        load_splits(cifar_root, val_size=200, seed=0)


def test_missing_folder_names_path_and_flag(tmp_path: Path) -> None:
    with pytest.raises(VitDeployError) as err:
        load_train(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value) and "--download" in str(err.value)


def test_truncated_batch_is_reported_by_name(tmp_path: Path) -> None:
    root = write_cifar(tmp_path)
    path = root / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(VitDeployError, match="data_batch_3 is truncated or corrupt"):
        load_train(root)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]}, "uint8 N x 3072"),
        ({"data": np.zeros((4, 3072), np.float32), "labels": [0, 1, 2, 3]}, "uint8 N x 3072"),
        ({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2]}, "expected 4 integer labels"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, "labels outside 0..9"),
        ({"images": np.zeros((2, 3072), np.uint8)}, "no 'data'/'labels'"),
    ],
)
def test_invalid_contents(tmp_path: Path, record: dict, message: str) -> None:
    path = tmp_path / "test_batch"
    with open(path, "wb") as f:
        pickle.dump(record, f, protocol=2)
    with pytest.raises(VitDeployError, match=message):
        read_batch(path)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    path = tmp_path / "test_batch"
    with open(path, "wb") as f:
        pickle.dump({"data": exploit, "labels": []}, f, protocol=2)
    with pytest.raises(VitDeployError, match="corrupt"):
        read_batch(path)
    assert not marker.exists()


def test_download_is_skipped_when_the_files_are_there(cifar_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda *a, **k: pytest.fail("must not download"))
    assert len(load_splits(cifar_root, val_size=40, seed=0, download=True).test) == 50


def test_download_failure_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    def offline(*_args, **_kwargs):
        raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(VitDeployError, match="downloading CIFAR-10 into .* failed .*copy the cifar-10-batches-py folder there"):
        load_splits(tmp_path, val_size=40, seed=0, download=True)
