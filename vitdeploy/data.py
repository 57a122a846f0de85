"""CIFAR-10 from the standard `cifar-10-batches-py` layout into memory as uint8 NCHW tensors.

The batch files are read directly (no torchvision dataset object, no md5 check) with an
unpickler that only admits numpy arrays, and every file's shapes, dtypes and labels are
validated, so a truncated, corrupt or foreign file is reported by name instead of
surfacing later as a shape error. `--download` uses torchvision's downloader.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from vitdeploy.errors import VitDeployError

if TYPE_CHECKING:
    from vitdeploy.images import Fit

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
IMAGE_SHAPE = (3, 32, 32)
DEFAULT_VAL_SIZE = 5000  # training images held out for validation when --val-size is not given


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 N x 3 x 32 x 32, labels as int64 N."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, indices: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[indices], self.labels[indices])


@dataclass(frozen=True)
class Splits:
    """Training images, a held-out validation split for model selection, and the test set
    (None with --test-size 0)."""

    train: ImageSet
    val: ImageSet
    test: ImageSet | None
    class_names: tuple[str, ...] = CLASS_NAMES


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR batch pickle needs (numpy arrays; bytes in protocol-2
    pickles); anything else, which could run code, is refused."""

    _ALLOWED = {
        ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle protocol
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def read_batch(path: Path) -> ImageSet:
    """Read and validate one CIFAR-10 batch file."""
    fix = "replace it with an intact copy, or delete the folder and run again with --download"
    try:
        with open(path, "rb") as f:
            record = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except FileNotFoundError as exc:
        raise VitDeployError(f"CIFAR-10 file {path} is missing; {fix}") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise VitDeployError(f"CIFAR-10 file {path} is truncated or corrupt ({exc}); {fix}") from exc
    if not isinstance(record, dict) or "data" not in record or "labels" not in record:
        raise VitDeployError(f"CIFAR-10 file {path} has no 'data'/'labels' entries; {fix}")
    data, labels = record["data"], np.asarray(record["labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise VitDeployError(f"CIFAR-10 file {path}: data must be uint8 N x 3072, found {dtype} {shape}; {fix}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise VitDeployError(f"CIFAR-10 file {path}: expected {data.shape[0]} integer labels; {fix}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise VitDeployError(f"CIFAR-10 file {path}: labels outside 0..9; {fix}")
    images = torch.from_numpy(data.reshape(-1, *IMAGE_SHAPE).copy())
    return ImageSet(images, torch.from_numpy(labels.astype(np.int64)))


def find_cifar_dir(data_dir: Path) -> Path:
    """`data_dir/cifar-10-batches-py`, or `data_dir` itself when it is that folder."""
    data_dir = Path(data_dir)
    for candidate in (data_dir / FOLDER, data_dir):
        if (candidate / TEST_FILE).is_file() or (candidate / TRAIN_FILES[0]).is_file():
            return candidate
    raise VitDeployError(
        f"no CIFAR-10 found in {data_dir} (looked for {data_dir / FOLDER}/data_batch_1..5 and test_batch); "
        "pass --data-dir pointing at the folder that holds cifar-10-batches-py (`vitdeploy train --download` fetches it)"
    )


def download_cifar10(data_dir: Path) -> None:
    """Fetch the official archive with torchvision into `data_dir/cifar-10-batches-py`,
    unless all batch files are already there (so the same command also works offline)."""
    from torchvision.datasets import CIFAR10

    if all((data_dir / FOLDER / name).is_file() for name in (*TRAIN_FILES, TEST_FILE)):
        return
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        CIFAR10(str(data_dir), train=True, download=True)
    except Exception as exc:  # torchvision raises URLError, OSError or RuntimeError
        raise VitDeployError(
            f"downloading CIFAR-10 into {data_dir} failed ({exc}); without network, copy the "
            f"{FOLDER} folder there and drop --download"
        ) from exc


def load_train(data_dir: Path) -> ImageSet:
    """The 50,000 (or, for test fixtures, fewer) training images of all five batch files."""
    folder = find_cifar_dir(data_dir)
    parts = [read_batch(folder / name) for name in TRAIN_FILES]
    return ImageSet(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


def load_test(data_dir: Path) -> ImageSet:
    """The test set; reported on, never used to choose a model."""
    return read_batch(find_cifar_dir(data_dir) / TEST_FILE)


@dataclass(frozen=True)
class ParitySet:
    """Test images as a model takes them (fitted to its source size), what they are, and their labels
    where the model's classes are the dataset's (else None: parity is then logits and top-1 agreement alone)."""

    images: np.ndarray
    labels: np.ndarray | None
    what: str = "first N images of the CIFAR-10 test set"

    @property
    def description(self) -> str:
        return self.what if self.labels is not None else self.what + " (no labels: the model's classes are not the dataset's)"


def parity_set(data_dir: Path, limit: int, fit: Fit, class_names: Sequence[str]) -> ParitySet:
    """The first `limit` test images through `fit`, for export's and bench's parity."""
    from vitdeploy.images import fit_array

    test = load_test(data_dir)
    n = min(limit, len(test))
    labels = test.labels[:n].numpy() if tuple(class_names) == CLASS_NAMES else None
    return ParitySet(fit_array(test.images[:n].numpy(), fit), labels)


def split_validation(train: ImageSet, val_size: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """Hold out `val_size` training images, chosen by `seed`, for model selection."""
    if not 0 < val_size < len(train):
        raise VitDeployError(f"--val-size must be between 1 and {len(train) - 1} (the training set has {len(train)} images)")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:val_size].sort().values, order[val_size:].sort().values
    return train.take(train_idx), train.take(val_idx)


def load_splits(data_dir: Path, val_size: int, seed: int, subset: int | None = None, download: bool = False,
                test_size: int | None = None) -> Splits:
    """Train/validation/test splits in memory; `subset` keeps the first N training images,
    `test_size` the first N test images (0: none)."""
    if download:
        download_cifar10(data_dir)
    train, val = split_validation(load_train(data_dir), val_size, seed)
    if subset is not None:
        if subset < 1:
            raise VitDeployError("--subset must be a positive number of images")
        train = ImageSet(train.images[:subset], train.labels[:subset])
    if test_size == 0:
        return Splits(train=train, val=val, test=None)
    test = load_test(data_dir)
    if test_size is not None:
        if not 0 <= test_size <= len(test):
            raise VitDeployError(f"--test-size must be between 0 (no test pass) and {len(test)} (the test set has {len(test)} images)")
        test = ImageSet(test.images[:test_size], test.labels[:test_size])
    return Splits(train=train, val=val, test=test)
