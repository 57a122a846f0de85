"""The export's staging folder: built beside --out, swapped in whole when complete.

An interrupted or failed export (even with --force) leaves the previous export as it was,
and never a manifest that points to a partial file; staging folders of exports that died
are removed by the next export of the same folder.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from vitdeploy.errors import VitDeployError
from vitdeploy.manifest import MANIFEST

STAGING_TAG = ".vitdeploy-staging-"


def prepare_out(out: Path, force: bool) -> Path:
    """Check the output folder's content and return a fresh staging folder beside it.

    A non-empty --out is refused unless --force. Nothing in --out is touched here: the new
    export is built in the staging folder and replaces the old one only when complete
    (`publish`), so an interrupted or failed export leaves the previous one usable.
    Staging folders of interrupted exports are removed.
    """
    out = Path(out)
    if out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".staging-")):
        if not force:
            raise VitDeployError(f"--out {out} already holds files; choose an empty folder or add --force to replace them")
        if not os.access(out, os.W_OK | os.X_OK):
            raise VitDeployError(f"cannot replace the export in --out {out}: the folder is not writable; choose a writable folder")
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for leftover in [*parent.glob(f".{glob.escape(out.name)}{STAGING_TAG}*"), *out.glob(".staging-*")]:
            if not _alive(leftover.name.rsplit("-", 1)[-1]):  # another export of this folder may be running
                shutil.rmtree(leftover, ignore_errors=True)
        staging = parent / f".{out.name}{STAGING_TAG}{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as exc:
        raise VitDeployError(f"cannot write the staging folder beside --out {out} ({exc.strerror or exc}); "
                             "choose an --out whose parent folder is writable") from exc
    return staging


def _alive(pid: str) -> bool:
    """Whether a process with this id runs now (a staging folder of a running export is left alone)."""
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _export_names(manifest: dict[str, Any]) -> list[str]:
    """The files an export wrote, as named in its manifest (manifest.json itself last)."""
    names = []
    for artifact in manifest.get("artifacts", []):
        names += [r["path"] for r in [artifact, *artifact.get("external_data", [])]]
        if artifact.get("kind") == "tensorrt":
            names.append(f"{artifact['path']}.json")
    return [n for n in names if isinstance(n, str) and Path(n).name == n] + [MANIFEST]


def publish(staging: Path, out: Path, manifest: dict[str, Any]) -> None:
    """Make the staging folder's export the content of --out.

    Where the file system can (Linux renameat2 RENAME_EXCHANGE), the two folders are swapped
    in one atomic step, after hard links to every file in --out that the previous export did
    not write (bench reports, the user's own files) were added to the staging folder. Elsewhere
    the new files are renamed into --out one by one, manifest.json last.
    """
    if not out.exists():
        os.rename(staging, out)
        return
    try:
        previous = set(_export_names(json.loads((out / MANIFEST).read_text()))) if (out / MANIFEST).is_file() else set()
    except (OSError, ValueError, TypeError, AttributeError, KeyError, RecursionError):
        previous = {MANIFEST}
    for entry in out.iterdir():
        if entry.name not in previous and not entry.name.startswith(".staging-") and not (staging / entry.name).exists():
            _link_tree(entry, staging / entry.name)
    os.chmod(staging, stat.S_IMODE(out.stat().st_mode))
    if _exchange(staging, out):
        shutil.rmtree(staging, ignore_errors=True)  # now the previous export
        return
    for name in _export_names(manifest):
        os.replace(staging / name, out / name)
    for name in previous - set(_export_names(manifest)):
        if Path(name).name == name:
            (out / name).unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)


def _link_tree(source: Path, target: Path) -> None:
    """`target` names the same files as `source` (hard links; copies where links fail)."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, target, symlinks=True, copy_function=link)
    elif source.is_symlink():
        os.symlink(os.readlink(source), target)
    else:
        link(str(source), str(target))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))
