"""The export manifest: what an artifact folder holds and how to feed it.

`vitdeploy export` writes `manifest.json` last, after every file it lists is complete;
`bench`, `serve` and `predict` read it, verify each file's size and sha256, and take
shapes, dtypes, preprocessing and class names from it, so a user never repeats them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from vitdeploy.errors import VitDeployError

MANIFEST = "manifest.json"
FORMAT = "vitdeploy-manifest"
FORMAT_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_record(folder: Path, name: str) -> dict[str, Any]:
    """Path (relative to the folder), size and sha256 of one file."""
    path = folder / name
    return {"path": name, "size_bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write manifest.json atomically (temporary file, fsync, rename)."""
    path = folder / MANIFEST
    tmp = folder / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(folder: Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of an artifact folder; with `verify`, every listed file must match its sha256."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise VitDeployError(f"{folder} has no {MANIFEST}; pass a folder written by `vitdeploy export`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise VitDeployError(f"{path} is not valid JSON ({exc}); re-run `vitdeploy export`") from exc
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise VitDeployError(f"{path} is not a vitdeploy manifest of format {FORMAT_VERSION}; re-run `vitdeploy export`")
    if verify:
        for artifact in manifest["artifacts"]:
            for record in [artifact, *artifact.get("external_data", [])]:
                verify_file(folder, record)
    return manifest


def verify_file(folder: Path, record: dict[str, Any]) -> None:
    """The file exists with the recorded size and sha256, or a clear error."""
    path = folder / record["path"]
    if not path.is_file():
        raise VitDeployError(f"{path} listed in the manifest is missing; re-run `vitdeploy export`")
    if path.stat().st_size != record["size_bytes"] or sha256_file(path) != record["sha256"]:
        raise VitDeployError(f"{path} no longer matches the sha256 in the manifest (changed or damaged); re-run `vitdeploy export`")


def find_artifact(manifest: dict[str, Any], kind: str, precision: str | None = None) -> dict[str, Any] | None:
    """The first artifact of `kind` ('onnx', 'tensorrt'), of `precision` when given."""
    for artifact in manifest["artifacts"]:
        if artifact["kind"] == kind and (precision is None or artifact["precision"] == precision):
            return artifact
    return None
