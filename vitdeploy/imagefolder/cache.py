"""The decode cache of an image-folder dataset: every image decoded once to uint8 RGB at the
store size (shorter side resized, centre square kept), one memory-mappable .npy per split.

The cache folder's name is a key over the store rule and every file's path, class, size and
modification time, so a changed, added or removed file means a new cache and an unchanged
dataset is never decoded twice. A cache is built in a temporary folder and renamed into
place whole: an interrupted build leaves nothing that could be mistaken for a cache.
Decoding runs in worker processes; files that cannot be used are recorded with their
reasons in the cache (the run decides whether that is an error).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.errors import VitDeployError
from vitdeploy.imagefolder.listing import BadFile, ImageFile, Listing
from vitdeploy.images import Fit, check_size, decode_image, header

FORMAT = "vitdeploy-image-cache"
FORMAT_VERSION = 1
DEFAULT_FOLDER = ".vitdeploy-cache"  # inside ROOT; hidden, so never listed as data
MIN_SIDE_FRACTION = 0.5  # an image whose shorter side is below this share of the store size is too small
MAX_FILE_BYTES = 256 * 2**20
CHUNK = 64  # images per task sent to a worker
MAX_BAD_RECORDED = 10_000


@dataclass(frozen=True)
class StoreRule:
    """How a picture becomes a stored image: shorter side resized to `size` with `resample`
    (antialiased when shrinking), centre `size` square kept; pictures whose shorter side is
    below `min_side` are refused as too small for it."""

    size: int
    resample: str

    @property
    def min_side(self) -> int:
        return max(2, int(self.size * MIN_SIDE_FRACTION))

    @property
    def fit(self) -> Fit:
        return Fit(self.size, 1.0, self.resample)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "min_side": self.min_side, "rule": "shorter side resized to size, centre square"}


@dataclass(frozen=True)
class Stored:
    """One split of a built cache: images (memory-mapped, N x 3 x S x S uint8), labels, and each
    image's position in the listing's split (the files left out have none)."""

    images: np.ndarray
    labels: np.ndarray
    index: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes)


@dataclass(frozen=True)
class Cache:
    """A built cache: its folder and key, the splits, the files left out and why."""

    path: Path
    key: str
    splits: dict[str, Stored]
    bad: tuple[BadFile, ...]
    bad_count: int
    rule: StoreRule
    built: bool  # decoded by this call (False: reused)


def cache_key(listing: Listing, rule: StoreRule) -> str:
    """sha256 over the rule, the class names and every file's (split, path, label, size, mtime)."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "rule": rule.to_dict(),
                              "classes": listing.class_names, "bad": [b.path for b in listing.bad]}).encode())
    for split, files in listing.splits.items():
        for f in files:
            digest.update(f"{split}\0{f.path}\0{f.label}\0{f.size}\0{f.mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def open_or_build(listing: Listing, rule: StoreRule, cache_dir: Path | None, workers: int,
                  say: Callable[[str], None] = print, progress: Callable[[int, int], None] | None = None) -> Cache:
    """The cache of `listing` at `rule`: reused when its key is there, else decoded now."""
    folder = Path(cache_dir) if cache_dir is not None else listing.root / DEFAULT_FOLDER
    key = cache_key(listing, rule)
    target = folder / key
    if target.is_dir():
        return _open(target, key, listing, rule, built=False)
    _check_room(folder, listing, rule)
    say(f"decoding {sum(listing.counts().values()):,} images of {listing.root} to {rule.size} px "
        f"({max(1, workers)} worker{'s' if workers > 1 else ''}) into {target}")
    _remove_abandoned(folder, key)
    tmp = folder / f".tmp-{key}-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        bad = _build(tmp, listing, rule, workers, progress)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same cache first: theirs is as good
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cache = _open(target, key, listing, rule, built=True)
    if bad:
        say(f"{len(bad)} files could not be decoded (recorded in {target / 'meta.json'})")
    return cache


def _remove_abandoned(folder: Path, key: str) -> None:
    """Temporary folders of builds of `key` whose process is gone (killed mid-build)."""
    for tmp in folder.glob(f".tmp-{key}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not building it yet: a leftover of an earlier call
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _check_room(folder: Path, listing: Listing, rule: StoreRule) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        raise VitDeployError(f"cannot write the image cache in {folder} ({exc.strerror or exc}); "
                             "pass --cache-dir with a writable folder") from None
    need = sum(len(files) for files in listing.splits.values()) * 3 * rule.size**2
    if need > free:
        raise VitDeployError(f"the image cache needs {need / 2**30:.1f} GiB at {rule.size} px and {folder} has "
                             f"{free / 2**30:.1f} GiB free; pass --cache-dir on a larger disk or a smaller --store-size")


def _build(tmp: Path, listing: Listing, rule: StoreRule, workers: int,
           progress: Callable[[int, int], None] | None) -> list[BadFile]:
    """Decode every split into tmp; returns the files left out."""
    total = sum(len(files) for files in listing.splits.values())
    done = 0
    bad: list[BadFile] = []
    split_meta = {}
    for split, files in listing.splits.items():
        images = np.lib.format.open_memmap(tmp / f"{split}.images.npy", mode="w+", dtype=np.uint8,
                                           shape=(len(files), 3, rule.size, rule.size))
        ok = np.zeros(len(files), dtype=bool)
        for start, chunk, errors in _decoded(listing.root, files, rule, workers):
            images[start:start + len(chunk)] = chunk
            ok[start:start + len(chunk)] = True
            for index, reason in errors:
                ok[index] = False
                bad.append(BadFile(files[index].path, reason))
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        keep = np.flatnonzero(ok)
        if len(keep) < len(files):  # compact: the bad rows go
            images.flush()
            del images
            source = np.load(tmp / f"{split}.images.npy", mmap_mode="r")
            packed = np.lib.format.open_memmap(tmp / f"{split}.kept.npy", mode="w+", dtype=np.uint8,
                                               shape=(len(keep), 3, rule.size, rule.size))
            for first in range(0, len(keep), 4096):
                packed[first:first + 4096] = source[keep[first:first + 4096]]
            packed.flush()
            del packed, source
            os.replace(tmp / f"{split}.kept.npy", tmp / f"{split}.images.npy")
        else:
            images.flush()
            del images
        labels = np.array([files[i].label for i in keep], dtype=np.int64)
        np.save(tmp / f"{split}.labels.npy", labels)
        np.save(tmp / f"{split}.index.npy", keep.astype(np.int64))
        split_meta[split] = {"images": len(keep), "files": len(files)}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "rule": rule.to_dict(),
            "class_names": list(listing.class_names), "splits": split_meta,
            "bad_count": len(bad) + len(listing.bad),
            "bad": [asdict(b) for b in (list(listing.bad) + bad)[:MAX_BAD_RECORDED]]}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return bad


def _decoded(root: Path, files: tuple[ImageFile, ...], rule: StoreRule,
             workers: int) -> Iterator[tuple[int, np.ndarray, list[tuple[int, str]]]]:
    """(first index, decoded chunk, [(index, reason)]) for every chunk of `files`, in any order;
    at most 2 chunks per worker in flight, so memory stays bounded."""
    tasks = ((start, [f.path for f in files[start:start + CHUNK]]) for start in range(0, len(files), CHUNK))
    if workers <= 1:
        for start, paths in tasks:
            yield decode_chunk(str(root), paths, rule.size, rule.resample, start)
        return
    # fork where there is one (the workers need only Pillow and numpy, and start at once); spawn elsewhere
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
            pending: set[Future] = set()
            for start, paths in tasks:
                pending.add(pool.submit(decode_chunk, str(root), paths, rule.size, rule.resample, start))
                if len(pending) >= 2 * workers:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    yield from (future.result() for future in finished)
            yield from (future.result() for future in pending)
    except BrokenProcessPool:
        raise VitDeployError("a decoding worker process died (out of memory, or killed); run again with fewer "
                             "--decode-workers, or 1 to decode in this process") from None


def decode_chunk(root: str, paths: list[str], size: int, resample: str,
                 start: int) -> tuple[int, np.ndarray, list[tuple[int, str]]]:
    """Decode `paths` (relative to root) by the store rule: (start, images, [(index, reason)]);
    a file that fails is left as zeros and named with its reason."""
    rule = StoreRule(size, resample)
    out = np.zeros((len(paths), 3, size, size), np.uint8)
    errors = []
    for i, rel in enumerate(paths):
        try:
            out[i] = decode_file(Path(root) / rel, rule)
        except VitDeployError as exc:
            errors.append((start + i, str(exc)))
    return start, out, errors


def decode_file(path: Path, rule: StoreRule) -> np.ndarray:
    """One image file by the store rule; VitDeployError (starting "the file") when it cannot be used."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise VitDeployError(f"the file is {size / 2**20:.0f} MiB, more than the {MAX_FILE_BYTES // 2**20} MiB "
                                 "an image may have")
        data = path.read_bytes()
    except OSError as exc:
        raise VitDeployError(f"the file cannot be read ({exc.strerror or exc})") from None
    found = header(data)
    if found is not None:
        width, height, _ = found
        check_size((width, height), "the file")
        if min(width, height) < rule.min_side:
            raise VitDeployError(f"the file is {width}x{height} px, too small for the {rule.size} px store size "
                                 f"(its shorter side must be at least {rule.min_side} px); lower --store-size or remove it")
    return decode_image(data, rule.fit, "the file")


def _open(path: Path, key: str, listing: Listing, rule: StoreRule, built: bool) -> Cache:
    """A built cache, checked against what the listing and rule say it holds (the folder may be damaged)."""
    fix = f"delete {path} and run again to rebuild it"
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION or meta.get("rule") != rule.to_dict() \
                or meta.get("class_names") != list(listing.class_names):
            raise ValueError("its record does not match this dataset")
        splits = {}
        for split, files in listing.splits.items():
            images = np.load(path / f"{split}.images.npy", mmap_mode="c", allow_pickle=False)
            labels = np.load(path / f"{split}.labels.npy", allow_pickle=False)
            index = np.load(path / f"{split}.index.npy", allow_pickle=False)
            count = meta["splits"][split]["images"]
            if images.dtype != np.uint8 or images.shape != (count, 3, rule.size, rule.size) or count > len(files):
                raise ValueError(f"{split}.images.npy is {images.dtype} {images.shape}")
            if labels.dtype != np.int64 or labels.shape != (count,) or (count and not
                                                                         0 <= labels.min() <= labels.max() < len(listing.class_names)):
                raise ValueError(f"{split}.labels.npy does not hold {count} class indices")
            if index.dtype != np.int64 or index.shape != (count,) or (count and (index[0] < 0 or index[-1] >= len(files)
                                                                                 or np.any(np.diff(index) <= 0))):
                raise ValueError(f"{split}.index.npy does not hold {count} increasing file positions")
            splits[split] = Stored(images, labels, index)
        bad = tuple(BadFile(str(b["path"]), str(b["reason"])) for b in meta["bad"])
        bad_count = int(meta["bad_count"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise VitDeployError(f"the image cache {path} is damaged ({str(exc)[:200]}); {fix}") from None
    return Cache(path, key, splits, bad, bad_count, rule, built)
