"""The export manifest: what an artifact folder holds and how to feed it.

`vitdeploy export` writes `manifest.json` last, after every file it lists is complete;
`bench`, `serve` and `predict` read it, verify each file's size and sha256, and take
shapes, dtypes, preprocessing and class names from it, so a user never repeats them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitdeploy.choices import PRECISIONS
from vitdeploy.errors import VitDeployError
from vitdeploy.files import atomic_write_text, inside

if TYPE_CHECKING:
    from vitdeploy.preprocess import Preprocessing

MANIFEST = "manifest.json"
FORMAT = "vitdeploy-manifest"
FORMAT_VERSION = 1


_DIGESTS: dict[tuple[int, ...], str] = {}  # this process's hashes, by the file's identity and change times


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """The file's sha256, hashed once per process: serving reads a folder's manifest, its
    checkpoint and the explainer's copy of both, and a large model takes seconds to hash.
    A file that is replaced or written to (new inode, size, mtime or ctime, which no user can
    set back) is hashed again."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key in _DIGESTS:
            return _DIGESTS[key]
        digest = hashlib.sha256()
        while block := f.read(chunk):
            digest.update(block)
    _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def file_record(folder: Path, name: str) -> dict[str, Any]:
    """Path (relative to the folder), size and sha256 of one file."""
    path = folder / name
    return {"path": name, "size_bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write manifest.json atomically (temporary file, fsync, rename), after checking it
    against the schema readers apply."""
    validate_manifest(manifest)
    path = folder / MANIFEST
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n", durable=True)
    return path


def read_manifest(folder: Path, verify: bool = True) -> dict[str, Any]:
    """The validated manifest of an artifact folder; with `verify`, every listed file must
    lie inside the folder and match its size and sha256."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise VitDeployError(f"{folder} has no {MANIFEST}; pass a folder written by `vitdeploy export`")
    fix = "re-run `vitdeploy export`"
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise VitDeployError(f"{path} is larger than {MAX_MANIFEST_BYTES:,} bytes, far more than a manifest; {fix}")
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise VitDeployError(f"{path} is not a text file; {fix}") from None
    except json.JSONDecodeError as exc:
        raise VitDeployError(f"{path} is not valid JSON ({exc}); {fix}") from None
    except RecursionError:
        raise VitDeployError(f"{path} is nested too deeply to be a manifest; {fix}") from None
    except OSError as exc:
        raise VitDeployError(f"cannot read {path} ({exc.strerror or exc}); check its permissions") from None
    try:
        validate_manifest(manifest)
    except VitDeployError as exc:
        raise VitDeployError(f"{path}: {exc}; {fix}") from None
    for artifact in manifest["artifacts"]:
        for record in [artifact, *artifact.get("external_data", [])]:
            target = inside(folder, record["path"], "model file")
            if verify:
                verify_file(target, record)
    return manifest


def verify_file(path: Path, record: dict[str, Any]) -> None:
    """The file exists with the recorded size and sha256, or a clear error."""
    if not path.is_file():
        raise VitDeployError(f"{record['path']} listed in the manifest is missing; re-run `vitdeploy export`")
    if path.stat().st_size != record["size_bytes"] or sha256_file(path) != record["sha256"]:
        raise VitDeployError(f"{record['path']} no longer matches the sha256 in the manifest (changed or damaged); "
                             "re-run `vitdeploy export`")


def artifact_path(folder: Path, artifact: dict[str, Any]) -> Path:
    """Where an artifact's file is, confined to the artifact folder."""
    return inside(folder, artifact["path"], "model file")


# -- schema --------------------------------------------------------------------------------

MAX_MANIFEST_BYTES = 16 << 20
MAX_BATCH = 4096  # above every batch range vitdeploy exports; bounds what a manifest may make us allocate
MAX_CLASSES = 100_000
KINDS = ("onnx", "tensorrt")
TENSOR_DTYPES = ("uint8", "float32", "float16")  # an input or output tensor's element type
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _field(record: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(record, dict):
        raise VitDeployError(f"{where} must be an object")
    if key not in record:
        raise VitDeployError(f"{where} lacks {key!r}")
    value = record[key]
    # bool is an int in Python; a manifest's counts and sizes never are booleans
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise VitDeployError(f"{where}.{key} must be {names}, not {type(value).__name__}")
    return value


def _int(record: Any, key: str, lo: int, hi: int, where: str) -> int:
    value = _field(record, key, int, where)
    if not lo <= value <= hi:
        raise VitDeployError(f"{where}.{key} = {value} is outside {lo}..{hi}")
    return value


def _choice(record: Any, key: str, choices: tuple[str, ...], where: str) -> str:
    value = _field(record, key, str, where)
    if value not in choices:
        raise VitDeployError(f"{where}.{key} = {value[:50]!r} is not one of {', '.join(choices)}")
    return value


def _file(record: Any, where: str) -> None:
    _field(record, "path", str, where)
    _int(record, "size_bytes", 0, 1 << 50, where)
    if not _SHA256.fullmatch(_field(record, "sha256", str, where)):
        raise VitDeployError(f"{where}.sha256 is not a sha256 hex digest")


def _tensor(record: Any, where: str, side: int) -> None:
    _field(record, "name", str, where)
    _choice(record, "dtype", TENSOR_DTYPES, where)
    shape = _field(record, "shape", list, where)
    if not shape or shape[0] != "batch" or not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= max(side, MAX_CLASSES)
                                                    for d in shape[1:]):
        raise VitDeployError(f"{where}.shape must be ['batch', positive sizes...]")


def validate_manifest(manifest: Any) -> None:
    """Check everything readers of a manifest rely on: types, ranges, relations.

    The one check of a manifest (predict, bench, serve, the Triton repository and export
    itself): every number that sizes an allocation is range-checked here, so a hostile or
    damaged manifest is refused with one line instead of exhausting memory or crashing.
    """
    from vitdeploy.preprocess import MAX_SIDE, Preprocessing

    if not isinstance(manifest, dict):
        raise VitDeployError(f"a manifest is a JSON object, not {type(manifest).__name__}")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise VitDeployError(f"not a vitdeploy manifest of format {FORMAT_VERSION}")
    model = _field(manifest, "model", dict, "manifest")
    _field(model, "name", str, "model")
    num_classes = _int(model, "num_classes", 1, MAX_CLASSES, "model")
    names = _field(model, "class_names", list, "model")
    if len(names) != num_classes or not all(isinstance(n, str) and 0 < len(n) <= 200 for n in names):
        raise VitDeployError(f"model.class_names must be {num_classes} names of 1..200 characters")
    source = _field(model, "source_checkpoint", dict, "model")
    _field(source, "path", str, "model.source_checkpoint")
    if not _SHA256.fullmatch(_field(source, "sha256", str, "model.source_checkpoint")):
        raise VitDeployError("model.source_checkpoint.sha256 is not a sha256 hex digest")
    preprocessing = _field(manifest, "preprocessing", dict, "manifest")
    _int(preprocessing, "source_size", 2, MAX_SIDE, "preprocessing")
    _int(preprocessing, "input_size", 2, MAX_SIDE, "preprocessing")
    Preprocessing.from_dict(preprocessing)  # the relations between the numbers
    contract = _field(manifest, "input", dict, "manifest")
    _tensor(contract, "input", MAX_SIDE)
    _field(contract, "preprocessing_in_graph", bool, "input")
    _tensor(_field(manifest, "output", dict, "manifest"), "output", MAX_SIDE)
    batch = _field(manifest, "batch", dict, "manifest")
    lo = _int(batch, "min", 1, MAX_BATCH, "batch")
    hi = _int(batch, "max", lo, MAX_BATCH, "batch")
    _int(batch, "opt", lo, hi, "batch")
    artifacts = _field(manifest, "artifacts", list, "manifest")
    if len(artifacts) > 64:
        raise VitDeployError("manifest lists more than 64 artifacts")
    for i, artifact in enumerate(artifacts):
        _artifact(artifact, f"artifacts[{i}]")


def _artifact(artifact: Any, where: str) -> None:
    """One artifact record: its file, external data, status, INT8 target and TensorRT build facts."""
    _choice(artifact, "kind", KINDS, where)
    _choice(artifact, "precision", PRECISIONS, where)
    _file(artifact, where)
    external = artifact.get("external_data", [])
    if not isinstance(external, list) or len(external) > 16:
        raise VitDeployError(f"{where}.external_data must be a list of at most 16 files")
    for j, record in enumerate(external):
        _file(record, f"{where}.external_data[{j}]")
    _choice(artifact, "status", ("passed", "failed"), where)
    if artifact["precision"] == "int8":
        _choice(_field(artifact, "int8", dict, where), "target", ("cpu", "tensorrt"), f"{where}.int8")
    if "tome" in artifact:
        _tome(artifact["tome"], f"{where}.tome")
    if artifact["kind"] == "tensorrt":
        _field(artifact, "tensorrt_version", str, where)
        _field(artifact, "compute_capability", str, where)
        _field(artifact, "gpu", str, where)
        profiles = _field(artifact, "profiles", list, where)
        if not 1 <= len(profiles) <= 16:
            raise VitDeployError(f"{where}.profiles must list 1 to 16 optimization profiles")
        for j, profile in enumerate(profiles):
            p_lo = _int(profile, "min", 1, MAX_BATCH, f"{where}.profiles[{j}]")
            p_hi = _int(profile, "max", p_lo, MAX_BATCH, f"{where}.profiles[{j}]")
            _int(profile, "opt", p_lo, p_hi, f"{where}.profiles[{j}]")


def _tome(record: Any, where: str) -> None:
    """A merged graph's token-merging record: its label (how bench, serve and predict find the file)
    and a schedule of at most 1000 blocks."""
    label = _field(record, "label", str, where)
    if not re.fullmatch(r"[0-9]+(-[0-9]+)*", label) or len(label) > 8000:
        raise VitDeployError(f"{where}.label must be R or R1-R2-...")
    schedule = _field(record, "schedule", list, where)
    if not 1 <= len(schedule) <= 1000 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 1 << 20
                                                 for v in schedule):
        raise VitDeployError(f"{where}.schedule must list 1 to 1000 token counts")


def tome_label(artifact: dict[str, Any]) -> str | None:
    """The token merging an artifact was exported with (its label, e.g. "13"), None for an unmerged graph."""
    return artifact["tome"]["label"] if "tome" in artifact else None


INPUT, OUTPUT = "input", "logits"  # the graph's tensor names, in every backend and file


def input_spec(preprocessing: Preprocessing, preprocess_in_graph: bool) -> dict[str, Any]:
    """The exact input contract, as the manifest states it: raw uint8 images at the source size
    with the preprocessing in the graph, else float32 images preprocessed to the model's size."""
    p, in_graph = preprocessing, preprocess_in_graph
    size = p.source_size if in_graph else p.input_size
    description = (f"raw {size}x{size} RGB images; the graph scales to [0,1], normalizes with mean/std and resizes "
                   f"({p.resize_mode}) to {p.input_size} px" if in_graph else
                   f"images already scaled to [0,1], normalized ((x - mean) / std) and resized to {size} px "
                   f"({p.resize_mode}) per the manifest's preprocessing")
    return {"name": INPUT, "dtype": "uint8" if in_graph else "float32", "shape": ["batch", 3, size, size],
            "layout": "NCHW, RGB, 0..255" if in_graph else "NCHW, RGB", "preprocessing_in_graph": in_graph,
            "description": description}


def read_or_describe(source: Path, allow_checkpoint: bool, max_batch: int) -> dict[str, Any]:
    """The manifest of an artifact folder; with `allow_checkpoint`, a run folder or checkpoint file
    without a manifest is described the same way (for the pytorch backend, which runs it as it is)."""
    source = Path(source)
    if (source / MANIFEST).is_file() or not allow_checkpoint:
        return read_manifest(source)
    from vitdeploy.checkpoint import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(source)
    return describe_checkpoint(path, load_checkpoint(path), max_batch)


def describe_checkpoint(path: Path, checkpoint: dict[str, Any], max_batch: int) -> dict[str, Any]:
    """The manifest of a training checkpoint that was not exported (for the pytorch backend, which
    runs it as it is): no artifacts, uint8 input at the source size, the batch range 1..`max_batch`."""
    from vitdeploy.preprocess import Preprocessing

    preprocessing = Preprocessing.from_dict(checkpoint["preprocessing"])
    return Manifest(checkpoint["model_name"], tuple(checkpoint["class_names"]), Path(path), sha256_file(path),
                    preprocessing, input_spec(preprocessing, True), (1, min(32, max_batch), max_batch)).to_json()


@dataclass(frozen=True)
class Manifest:
    """The one way a manifest is made (export, and a checkpoint served without export): the
    fields that vary, typed; `to_json` adds the format marker, the class count and the output
    contract and is checked by `validate_manifest`, the one check every reader applies.

    `artifacts` are the export's file records (kind, precision, path, size, sha256, status and
    what was verified); `details` the rest export records (created, versions, parity data,
    TensorRT, Triton)."""

    model_name: str
    class_names: tuple[str, ...]
    source_checkpoint: Path
    source_sha256: str
    preprocessing: Preprocessing
    input: dict[str, Any]
    batch: tuple[int, int, int]  # min, opt, max
    artifacts: tuple[dict[str, Any], ...] = ()
    weights: str | None = None  # "ema" or "model": which weights of the checkpoint were exported
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        model = {"name": self.model_name, "num_classes": len(self.class_names), "class_names": list(self.class_names),
                 "source_checkpoint": {"path": str(Path(self.source_checkpoint).resolve()), "sha256": self.source_sha256}}
        if self.weights is not None:
            model["weights"] = self.weights
        lo, opt, hi = self.batch
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, **self.details, "model": model,
            "preprocessing": self.preprocessing.to_dict(), "input": self.input,
            "output": {"name": OUTPUT, "dtype": "float32", "shape": ["batch", len(self.class_names)],
                       "description": "unnormalized class scores; softmax gives probabilities"},
            "batch": {"min": lo, "opt": opt, "max": hi}, "artifacts": list(self.artifacts),
        }
        validate_manifest(manifest)
        return manifest


def find_artifact(manifest: dict[str, Any], kind: str, precision: str | None = None,
                  int8_target: str | None = None, tome: str | None = None) -> dict[str, Any] | None:
    """The first artifact of `kind` ('onnx', 'tensorrt'), of `precision` when given; for INT8, the
    graph of `int8_target` ('cpu' or 'tensorrt': which graph a backend runs, see `backends.registry`);
    merging tokens by `tome` (a label, e.g. "13"), or unmerged when None."""
    for artifact in manifest["artifacts"]:
        if artifact["kind"] == kind and (precision is None or artifact["precision"] == precision) \
                and tome_label(artifact) == tome:
            if int8_target is None or artifact["precision"] != "int8" or artifact["int8"]["target"] == int8_target:
                return artifact
    return None


def recorded_checkpoint(manifest: dict[str, Any], override: Path | None, needed_by: str) -> Path:
    """The training checkpoint an export came from (`override` if it moved), verified by the
    sha256 the manifest records; `needed_by` ("X needs Y") opens the error."""
    source = manifest["model"]["source_checkpoint"]
    path = Path(override or source["path"])
    try:
        unchanged = path.is_file() and sha256_file(path) == source["sha256"]
    except OSError:
        unchanged = False
    if not unchanged:
        raise VitDeployError(f"{needed_by}: the checkpoint the artifacts came from, {path}, is missing, unreadable or "
                             "differs; pass its new place with --checkpoint")
    return path
