"""An image-folder dataset on disk: `ROOT/{train,val,test}/CLASS/**/IMAGE`, listed and checked.

Class names are the sorted folder names of `train/`, and every split present must hold the
same set. Files are listed in a class-interleaved order (the first of each class, then the
second of each, ...), so that "the first N images" of any split covers every class.
Nothing outside ROOT is read: a link that leads out of it is a bad file, as is a file
that is not an image. Names starting with "." (OS metadata, vitdeploy's own cache) are
not part of the dataset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vitdeploy.errors import VitDeployError

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_FILES = 50_000_000  # per dataset: bounds the listing's memory before anything is decoded
MAX_CLASSES = 100_000
MAX_CLASS_NAME = 200  # characters
SHOWN = 5  # bad files named in an error


@dataclass(frozen=True)
class ImageFile:
    """One image: its path relative to ROOT (POSIX), class index, and what keys the cache."""

    path: str
    label: int
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class BadFile:
    path: str
    reason: str


@dataclass(frozen=True)
class Listing:
    """What ROOT holds: class names, the files of each split present, the files that are not images."""

    root: Path
    class_names: tuple[str, ...]
    splits: dict[str, tuple[ImageFile, ...]]
    bad: tuple[BadFile, ...]

    def counts(self) -> dict[str, int]:
        return {name: len(files) for name, files in self.splits.items()}


def is_image_folder(root: Path) -> bool:
    """ROOT/train holds at least one class folder: the layout this module reads."""
    train = Path(root) / "train"
    return train.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in train.iterdir())


def describe_bad(bad: tuple[BadFile, ...] | list[BadFile], total: int) -> str:
    """'N of M files ...: the first few with their reasons'."""
    shown = "; ".join(f"{b.path} ({b.reason})" for b in bad[:SHOWN])
    more = f"; and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
    return f"{len(bad)} of {total} files cannot be used: {shown}{more}"


def scan(root: Path) -> Listing:
    """List and check ROOT (see the module docstring); errors name what to fix."""
    root = Path(root)
    if not (root / "train").is_dir():
        raise VitDeployError(f"{root} is not an image-folder dataset: it needs {root}/train/CLASS/IMAGE files "
                             "(and optionally val/ and test/ alike); for CIFAR-10 point --data-dir at cifar-10-batches-py's parent")
    real_root = root.resolve()
    class_sets: dict[str, list[str]] = {}
    for split in SPLITS:
        folder = root / split
        if folder.is_dir():
            class_sets[split] = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_names = tuple(class_sets["train"])
    _check_classes(root, class_names, class_sets)
    splits: dict[str, tuple[ImageFile, ...]] = {}
    bad: list[BadFile] = []
    total = 0
    for split in class_sets:
        per_class: list[list[ImageFile]] = []
        bad.extend(_stray_files(root, split))
        for label, name in enumerate(class_names):
            files, rejected = _class_files(root, real_root, f"{split}/{name}", label)
            total += len(files) + len(rejected)
            if total > MAX_FILES:
                raise VitDeployError(f"{root} holds more than {MAX_FILES:,} files; split it into several datasets")
            if not files and split == "train":
                raise VitDeployError(f"class folder {root}/{split}/{name} holds no images ({len(rejected)} other files); "
                                     "add images or remove the folder (every class needs training images)")
            per_class.append(files)
            bad.extend(rejected)
        splits[split] = _interleaved(per_class)
    return Listing(root, class_names, splits, tuple(bad))


def _check_classes(root: Path, class_names: tuple[str, ...], class_sets: dict[str, list[str]]) -> None:
    if len(class_names) < 2:
        raise VitDeployError(f"{root}/train holds {len(class_names)} class folder{'s' if len(class_names) != 1 else ''} "
                             f"({', '.join(class_names) or 'none'}); a classifier needs at least 2 (one folder per class)")
    if len(class_names) > MAX_CLASSES:
        raise VitDeployError(f"{root}/train holds {len(class_names):,} class folders, more than the {MAX_CLASSES:,} allowed")
    for name in class_names:
        if len(name) > MAX_CLASS_NAME or not name.isprintable():
            raise VitDeployError(f"class folder name {name[:60]!r} in {root}/train is not a usable class name "
                                 f"(printable, at most {MAX_CLASS_NAME} characters); rename it")
    for split, names in class_sets.items():
        if tuple(names) != class_names:
            missing = sorted(set(class_names) - set(names))
            extra = sorted(set(names) - set(class_names))
            raise VitDeployError(
                f"{root}/{split} does not have the classes of {root}/train: "
                + "; ".join(part for part in (f"missing {', '.join(missing[:SHOWN])}" if missing else "",
                                              f"not in train: {', '.join(extra[:SHOWN])}" if extra else "") if part)
                + "; every split needs the same class folders")


def _stray_files(root: Path, split: str) -> list[BadFile]:
    """Files directly in a split folder: they belong to no class."""
    return [BadFile(f"{split}/{p.name}", "outside any class folder") for p in sorted((root / split).iterdir())
            if not p.name.startswith(".") and not p.is_dir()]


def _class_files(root: Path, real_root: Path, folder: str, label: int) -> tuple[list[ImageFile], list[BadFile]]:
    """The images under ROOT/folder (recursively, sorted), and the files that cannot be images."""
    files, bad = [], []
    for dirpath, dirnames, filenames in os.walk(root / folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if not path.resolve().is_relative_to(real_root):
                bad.append(BadFile(rel, "a link that leads outside the dataset"))
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                bad.append(BadFile(rel, f"not an image file (images end in {', '.join(IMAGE_SUFFIXES)})"))
                continue
            try:
                stat = path.stat()
            except OSError as exc:
                bad.append(BadFile(rel, f"unreadable ({exc.strerror or exc})"))
                continue
            if not path.is_file():
                bad.append(BadFile(rel, "not a regular file"))
                continue
            files.append(ImageFile(rel, label, stat.st_size, stat.st_mtime_ns))
    return files, bad


def _interleaved(per_class: list[list[ImageFile]]) -> tuple[ImageFile, ...]:
    """The first file of each class, then the second of each, ..."""
    longest = max((len(files) for files in per_class), default=0)
    return tuple(files[i] for i in range(longest) for files in per_class if i < len(files))
