"""Small file-system rules every command follows: output folders are checked before long
work starts, files are written whole or not at all, and a path taken from a file someone
else wrote (a manifest) stays inside its folder."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from vitdeploy.errors import VitDeployError


def check_output_dir(path: Path, flag: str) -> None:
    """`path` is, or can become, a folder this process may write into; else one clear error.

    Called before any long work so that a typo or a read-only mount fails in a second,
    not after an hour of training or a full parity run.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise VitDeployError(f"{flag} {path} is a file; choose a folder")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise VitDeployError(f"cannot write to {flag} {path} ({existing} is not a writable folder); choose a writable folder")


def atomic_write_bytes(path: Path, data: bytes, durable: bool = False) -> None:
    """Write `data` to a temporary file beside `path` and rename it over `path`.

    With `durable`, the data is fsynced before the rename, so a power cut leaves either the
    old or the new file, never an empty one. The temporary name is fixed per target, so a
    file left by a kill is overwritten (not accumulated) by the next write.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str, durable: bool = False) -> None:
    atomic_write_bytes(path, text.encode(), durable)


def write_new_files(folder: Path, stem: str, contents: dict[str, bytes]) -> str:
    """Write `contents` (suffix -> bytes) as STEM[-N]SUFFIX in `folder`, with the first N that names no existing
    file for any suffix; returns the stem used. Never replaces a file: each is written whole under a temporary
    name and linked into place, which fails if the name was taken meanwhile (then the next N is tried)."""
    folder = Path(folder)
    for n in range(10_000):
        name = stem if n == 0 else f"{stem}-{n}"
        targets = {folder / f"{name}{suffix}": data for suffix, data in contents.items()}
        if any(os.path.lexists(t) for t in targets):
            continue
        linked: list[Path] = []
        try:
            for target, data in targets.items():
                tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                try:
                    tmp.write_bytes(data)
                    os.link(tmp, target)
                finally:
                    tmp.unlink(missing_ok=True)
                linked.append(target)
        except FileExistsError:  # taken between the check and the link: give back ours, try the next name
            for target in linked:
                target.unlink(missing_ok=True)
            continue
        return name
    raise VitDeployError(f"{folder} has no free name for {stem}: choose another --out")


def inside(folder: Path, name: object, what: str = "path") -> Path:
    """`folder / name` when it stays inside `folder` (symbolic links followed), else an error.

    The refusal reads the same whether or not the outside file exists, so a hostile
    manifest cannot probe the file system. Only plain relative names are accepted.
    """
    refusal = VitDeployError(f"the manifest names a {what} outside its artifact folder ({str(name)[:200]!r}); "
                             "refused: an artifact folder may only refer to its own files")
    if not isinstance(name, str) or not name or "\x00" in name or os.path.isabs(name) or "\\" in name:
        raise refusal
    root = Path(folder).resolve()
    try:
        target = (root / name).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise refusal from None
    if target == root or root not in target.parents:
        raise refusal
    return target


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError, with what to do next for the usual causes."""
    where = f" ({exc.filename})" if exc.filename else ""
    hint = {
        errno.ENOSPC: "free some space or write elsewhere",
        errno.EDQUOT: "free some space or write elsewhere",
        errno.EROFS: "the file system is read-only; write elsewhere",
        errno.EACCES: "check the permissions or write elsewhere",
        errno.EPERM: "check the permissions or write elsewhere",
    }.get(exc.errno or 0, "check the path and try again")
    return f"{exc.strerror or exc}{where}; {hint}"
