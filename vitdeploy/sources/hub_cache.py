"""Files in the Hugging Face hub cache, found without any network call.

The layout is the one huggingface_hub writes (and timm and transformers read):
`HUB/models--ORG--NAME/refs/main` holds a revision, `HUB/models--ORG--NAME/snapshots/REV/`
its files. HUB is $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
_REVISION = re.compile(r"[A-Za-z0-9._-]{1,100}")  # a commit hash or a tag name: no path separators
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # preferred first


def hub_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def valid_repo(repo: str) -> bool:
    """A repository id (NAME or ORG/NAME) that cannot step outside the cache folder."""
    return bool(_REPO.fullmatch(repo)) and ".." not in repo


def repo_folder(repo: str) -> Path:
    """Where the cache keeps `repo` (which need not exist)."""
    return hub_dir() / ("models--" + repo.replace("/", "--"))


def snapshot(repo: str) -> Path | None:
    """The cached snapshot of `repo`: the revision refs/main names, else the only snapshot; None if none."""
    folder = repo_folder(repo)
    ref = folder / "refs" / "main"
    if ref.is_file():
        with ref.open(encoding="utf-8", errors="replace") as f:
            revision = f.read(256).strip()  # a ref is a hash: a huge file is not read whole
        if _REVISION.fullmatch(revision) and revision not in (".", "..") and (folder / "snapshots" / revision).is_dir():
            return folder / "snapshots" / revision
    snapshots = sorted(p for p in (folder / "snapshots").glob("*") if p.is_dir()) if (folder / "snapshots").is_dir() else []
    return snapshots[0] if len(snapshots) == 1 else None


def weights_in(folder: Path) -> Path | None:
    """The weights file of a model folder, safetensors first."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def cached_repos(owner: str | None = None) -> list[str]:
    """Repository ids with a usable snapshot in the cache (of `owner` only, if given)."""
    folder = hub_dir()
    found = []
    for path in sorted(folder.glob("models--*")) if folder.is_dir() else []:
        repo = path.name[len("models--"):].replace("--", "/", 1)
        if (owner is None or repo.startswith(f"{owner}/")) and (snap := snapshot(repo)) is not None and weights_in(snap):
            found.append(repo)
    return found
