"""Checkpoint files: written atomically, read without executing code.

A checkpoint is one dict of tensors and plain Python types (see `FORMAT`), so
`torch.load(weights_only=True)` reads it and a file carrying arbitrary pickled objects
is refused instead of run. Writes go to a temporary file that is fsynced and renamed,
so a crash or a full disk never leaves a truncated file under the final name.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from vitdeploy.errors import VitDeployError

FORMAT = "vitdeploy-checkpoint"
FORMAT_VERSION = 1


def safe_load(path: Path, what: str = "weights file") -> Any:
    """Load a torch file with weights_only=True, turning every failure into a clear error."""
    path = Path(path)
    if not path.is_file():
        raise VitDeployError(f"{what} {path} does not exist; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc):  # not a pickle of objects at all: garbage or a truncated file
            raise VitDeployError(f"{what} {path} is truncated or not a torch file; use an intact file") from exc
        raise VitDeployError(
            f"refused to load {what} {path}: it holds objects other than tensors and plain types "
            "(weights_only=True), which could run code; use a file saved as a plain state dict "
            "or a vitdeploy checkpoint"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise VitDeployError(f"{what} {path} is truncated or not a torch file ({exc}); use an intact file") from exc


def read_weights(path: Path, what: str = "weights file") -> Any:
    """A state dict from a safetensors file (by its name ending) or a torch file (`safe_load`)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return safe_load(path, what)
    if not path.is_file():
        raise VitDeployError(f"{what} {path} does not exist; check the path")
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise VitDeployError(f"{what} {path} is a safetensors file, which needs the safetensors package: "
                             "pip install safetensors") from None
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise VitDeployError(f"{what} {path} is truncated or not a safetensors file ({str(exc)[:120]}); use an intact file") from None


RUN_FOLDER_FILES = {  # which checkpoint a run folder means, by what it is wanted for
    "deploy": ("best.pt", "last.pt"),  # export, the pytorch backend, explain, serve: the one chosen on validation
    "resume": ("last.pt",),  # continuing the run: where it stopped
}


def resolve_checkpoint(source: Path, purpose: str = "deploy") -> Path:
    """The checkpoint file `source` means: a file as it is; a run folder its file for `purpose`
    (see RUN_FOLDER_FILES)."""
    source = Path(source)
    if source.is_dir():
        names = RUN_FOLDER_FILES[purpose]
        for name in names:
            if (source / name).is_file():
                return source / name
        raise VitDeployError(f"{source} holds no {' or '.join(names)}; pass a run folder written by `vitdeploy train` "
                             "or a checkpoint file")
    if not source.exists():
        raise VitDeployError(f"{source} does not exist; pass a run folder or a checkpoint file")
    return source


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A vitdeploy checkpoint, validated by its format marker. A run folder means its last.pt (the
    checkpoint to resume from; `resolve_checkpoint` says which file other uses mean)."""
    path = Path(path)
    if path.is_dir():
        path = resolve_checkpoint(path, "resume")
    data = safe_load(path, "checkpoint")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise VitDeployError(f"{path} is not a vitdeploy checkpoint; pass a file written by `vitdeploy train`")
    if data.get("format_version") != FORMAT_VERSION:
        raise VitDeployError(
            f"{path} has checkpoint format {data.get('format_version')}, this vitdeploy reads {FORMAT_VERSION}; "
            "use the vitdeploy version that wrote it"
        )
    expected = {"model_name": str, "model": dict, "class_names": list, "preprocessing": dict, "config": dict}
    wrong = [key for key, kind in expected.items() if not isinstance(data.get(key), kind)]
    names = data.get("class_names")
    if not wrong and not (1 <= len(names) <= 100_000 and all(isinstance(n, str) for n in names)):
        wrong = ["class_names"]
    if wrong:
        raise VitDeployError(f"{path} is a damaged vitdeploy checkpoint ({', '.join(wrong)} missing or malformed); "
                             "use another checkpoint of the run (checkpoints/epoch-*.pt) or train again")
    return data


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_link(source: Path, path: Path) -> None:
    """Make `path` name the same file as `source` (a hard link, a copy where links fail), atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
