"""The run folder: what a run writes before its first checkpoint, the half-written files a
kill leaves, checks before a run starts writing, and the metrics carried into a resumed run."""

from __future__ import annotations

import json
from pathlib import Path

from vitdeploy.checkpoint import load_checkpoint
from vitdeploy.errors import VitDeployError
from vitdeploy.files import atomic_write_text, check_output_dir

RUN_FILES = ("config.json", "metrics.jsonl")  # what a run writes before its first checkpoint


def unfinished_run(out: Path) -> bool:
    """`out` holds only what a run writes before its first checkpoint (it was stopped before one)."""
    if not out.is_dir():
        return False
    for entry in out.iterdir():
        if entry.name in RUN_FILES or _temporary(entry):
            continue
        if entry.name == "checkpoints" and entry.is_dir() and all(_temporary(p) for p in entry.iterdir()):
            continue
        return False
    return (out / "config.json").is_file()


def _temporary(path: Path) -> bool:
    """A file vitdeploy writes and renames (`.NAME.tmp`, `.NAME.XXXX.tmp`), left behind by a kill."""
    return path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file()


def clean_temporary_files(out: Path) -> None:
    """Remove what killed runs left half-written in the run folder."""
    for folder in (out, out / "checkpoints"):
        if folder.is_dir():
            for path in folder.iterdir():
                if _temporary(path):
                    path.unlink(missing_ok=True)


def check_out_dir(out: Path, resuming: bool) -> None:
    """Fail early on a run folder that holds another run (unless resuming into it) or cannot be written.

    A folder whose run was stopped before its first checkpoint holds nothing worth keeping:
    it is started over."""
    check_output_dir(out, "--out")
    if not resuming and out.is_dir() and any(out.iterdir()) and not unfinished_run(out):
        raise VitDeployError(f"--out {out} already holds files; continue that run with --resume {out}, or choose another --out")


def checkpoint_step(path: Path) -> int | None:
    """The optimizer step a checkpoint file was written at; None if it is missing or unreadable."""
    try:
        return int(load_checkpoint(path)["step"]) if path.is_file() else None
    except (VitDeployError, KeyError, TypeError, ValueError):
        return None


def make_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VitDeployError(f"cannot create --out {out} ({exc.strerror or exc}); choose a writable folder") from exc


def carry_metrics(source_dir: Path, out: Path, step: int) -> None:
    """Keep the metrics up to the resumed step, dropping what the resumed run will write again."""
    source = source_dir / "metrics.jsonl"
    if not source.is_file():
        return
    kept = []
    for line in source.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a hard kill
        if record.get("type") in ("step", "epoch") and record.get("step", step + 1) <= step:
            kept.append(line)
    atomic_write_text(out / "metrics.jsonl", "".join(line + "\n" for line in kept))


def run_dir_of(checkpoint: Path) -> Path:
    """The run folder a checkpoint file belongs to."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        return checkpoint
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
