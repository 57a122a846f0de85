"""`vitdeploy export`: checkpoint -> verified ONNX (fp32, optionally fp16), TensorRT
engine, Triton repository and manifest.json.

Everything is written into a staging folder beside the output folder, manifest.json
last, and the finished export replaces the folder's previous content in one step at the
end: an interrupted or failed export (even with --force) leaves the previous export as it
was, and never a manifest that points to a partial file.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import errno
import glob
import json
import os
import shutil
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch

from vitdeploy import __version__, parity, tensorrt_runtime
from vitdeploy.backends import registry
from vitdeploy.backends.base import run_batches
from vitdeploy.backends.ort import OrtBackend
from vitdeploy.backends.pytorch import TorchBackend
from vitdeploy.checkpoint import load_checkpoint, resolve_checkpoint
from vitdeploy.data import load_splits, load_test
from vitdeploy.errors import VitDeployError
from vitdeploy.export import fp16, onnx_export, tensorrt, triton, trt_compat
from vitdeploy.export import int8 as int8q
from vitdeploy.files import check_output_dir
from vitdeploy.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    file_record,
    sha256_file,
    validate_manifest,
    write_manifest,
)
from vitdeploy.models import checkpoint_weights, model_from_checkpoint
from vitdeploy.preprocess import Preprocess, Preprocessing
from vitdeploy.versions import cpu_flags, versions

Say = Callable[[str], None]


@dataclass(frozen=True)
class ExportOptions:
    source: Path
    out: Path
    fp16: bool = False
    fp16_policy: str = "matmul"  # see fp16.POLICIES
    int8: bool = False
    int8_options: int8q.Int8Options = int8q.Int8Options()
    int8_max_accuracy_drop: float = 1.0
    trt: bool | None = None  # None: build when --fp16 and TensorRT and a GPU are present
    min_batch: int = 1
    trt_profiles: tuple[tensorrt.Profile, ...] = ()  # empty: tensorrt.default_profiles of the batch range
    max_batch: int = 256
    preprocess_in_graph: bool = True
    parity_images: int = 10_000
    data_dir: Path | None = None
    triton: Path | None = None
    force: bool = False
    workspace_gb: float = 4.0
    timing_cache: Path | None = None
    hardware_compatible: bool = False
    version_compatible: bool = False

    @property
    def opt(self) -> int:
        """The batch size the artifacts are tuned for (the manifest's batch.opt): 32 within the range."""
        return max(self.min_batch, min(32, self.max_batch))

    def tolerance(self, precision: str) -> parity.Tolerance:
        """The parity check of `precision`, with --int8-max-accuracy-drop for INT8."""
        if precision == "int8":
            return replace(parity.TOLERANCES["int8"], max_accuracy_drop=self.int8_max_accuracy_drop)
        return parity.TOLERANCES[precision]

    @property
    def profiles(self) -> tuple[tensorrt.Profile, ...]:
        return self.trt_profiles or tensorrt.default_profiles(self.min_batch, self.max_batch)

    def validate(self) -> None:
        if self.min_batch < 1:
            raise VitDeployError("--min-batch must be at least 1")
        if self.max_batch < self.min_batch:
            raise VitDeployError(f"--max-batch {self.max_batch} is below --min-batch {self.min_batch}; raise --max-batch")
        tensorrt.check_profiles(self.profiles, self.min_batch, self.max_batch)
        if self.int8:
            self.int8_options.validate()
            if not 0 <= self.int8_max_accuracy_drop <= 100:
                raise VitDeployError("--int8-max-accuracy-drop is in percentage points, 0..100")
        if self.fp16_policy not in fp16.POLICIES:
            raise VitDeployError(f"unknown --fp16-policy {self.fp16_policy!r}; choose {' or '.join(fp16.POLICIES)}")
        if self.parity_images < 1:
            raise VitDeployError("--parity-images must be at least 1")


STAGING_TAG = ".vitdeploy-staging-"


def prepare_out(out: Path, force: bool) -> Path:
    """Check the output folder's content and return a fresh staging folder beside it.

    A non-empty --out is refused unless --force. Nothing in --out is touched here: the new
    export is built in the staging folder and replaces the old one only when complete
    (`_publish`), so an interrupted or failed export leaves the previous one usable.
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


def _publish(staging: Path, out: Path, manifest: dict[str, Any]) -> None:
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


def _tensorrt_plan(options: ExportOptions) -> tuple[Any | None, str | None]:
    """(tensorrt module, None) if an engine will be built, else (None, why not). Explicit --trt fails early."""
    if options.trt is False:
        return None, "not asked for (--no-trt)"
    if options.trt is None and not options.fp16:
        return None, "not asked for (add --trt, or --fp16 on a machine with TensorRT and a GPU)"
    try:
        trt = tensorrt_runtime.import_tensorrt()
        if not torch.cuda.is_available():
            raise VitDeployError(f"TensorRT {trt.__version__} is installed but PyTorch sees no CUDA GPU to build for")
        tensorrt.network_flags(trt)
    except VitDeployError as exc:
        if options.trt:
            raise
        return None, str(exc)
    return trt, None


def export_artifacts(options: ExportOptions, say: Say = print) -> dict[str, Any]:
    """Run the whole export; returns the manifest. Raises VitDeployError when a parity check fails
    (after writing the manifest with that artifact marked failed)."""
    options.validate()
    check_output_dir(options.out, "--out")  # before any long work
    if options.triton is not None:
        check_output_dir(options.triton, "--triton")
    ckpt_path = resolve_checkpoint(options.source)
    checkpoint = load_checkpoint(ckpt_path)
    trt, no_trt_reason = _tensorrt_plan(options)  # before any long work: an explicit --trt fails here
    spec, model = model_from_checkpoint(checkpoint, str(ckpt_path))
    preprocessing = Preprocessing.from_dict(checkpoint["preprocessing"])
    class_names = list(checkpoint["class_names"])
    model.eval()
    data_dir = Path(options.data_dir or checkpoint["config"]["data_dir"])
    test = load_test(data_dir)
    n = min(options.parity_images, len(test))
    images = test.images[:n].numpy()
    labels = test.labels[:n].numpy()
    calibration = _calibration_images(options, checkpoint, data_dir) if options.int8 else None

    staging = prepare_out(options.out, options.force)
    try:
        contract = onnx_export.input_spec(preprocessing, options.preprocess_in_graph)
        feed = images if options.preprocess_in_graph else Preprocess(preprocessing)(torch.from_numpy(images)).numpy()
        weights = checkpoint_weights(checkpoint)[0]
        say(f"weights: {'the EMA of the run (what it evaluated and chose best.pt by)' if weights == 'ema' else 'the trained weights'} "
            f"of {ckpt_path}")
        say(f"reference: PyTorch fp32 on {n} test images from {data_dir}")
        with TorchBackend(model, preprocessing) as reference:
            ref_logits = run_batches(reference, images, options.max_batch, say, "reference:")

        ckpt_hash = sha256_file(ckpt_path)
        metadata = {
            "vitdeploy.model": spec.name,
            "vitdeploy.class_names": ",".join(class_names),
            "vitdeploy.preprocessing": _json(preprocessing.to_dict()),
            "vitdeploy.input_contract": _json(contract),
            "vitdeploy.version": __version__,
            "vitdeploy.source_checkpoint_sha256": ckpt_hash,
        }
        artifacts: list[dict[str, Any]] = []
        failed: list[str] = []

        ort_cuda = registry.get("ort-cuda").probe()[0]  # probed once, not per file

        def verify_onnx(name: str, precision: str, external: list[str], extra: dict[str, Any] | None = None) -> None:
            path = staging / name
            onnx_export.check_onnx(path)
            inputs, outputs = onnx_export.io_records(path)
            with OrtBackend(path, "cpu", precision=precision) as backend:
                logits = run_batches(backend, feed, options.max_batch, say, f"{name} parity:")
            metrics = parity.compare(ref_logits, logits, labels, options.tolerance(precision))
            say(f"{name} (ONNX Runtime CPU vs PyTorch fp32): {parity.describe(metrics)}")
            if not metrics["passed"]:
                failed.append(name)
            cuda_metrics = (_cuda_parity(path, precision, feed, ref_logits, labels, options.max_batch)
                            if ort_cuda and precision != "int8" else None)
            if cuda_metrics is not None:
                say(f"{name} (ONNX Runtime CUDA vs PyTorch fp32): {parity.describe(cuda_metrics)}")
                if not cuda_metrics["passed"]:
                    failed.append(f"{name} on CUDA")
            for_cpu_only = (extra or {}).get("int8", {}).get("target") == "cpu"
            check = None if for_cpu_only else trt_compat.preflight(onnx.load(str(path), load_external_data=False))
            if check is not None:
                say(f"{name} TensorRT preflight ({check['checked_against']}): "
                    + ("ok" if check["ok"] else "PROBLEMS: " + "; ".join(check["problems"])))
            record = {
                "kind": "onnx", "precision": precision, **file_record(staging, name),
                "external_data": [file_record(staging, e) for e in external],
                "opset": onnx_export.OPSET, "inputs": inputs, "outputs": outputs,
                "status": "passed" if metrics["passed"] and (cuda_metrics or {"passed": True})["passed"] else "failed",
                "parity": {"backend": "ort-cpu", **metrics},
                "tensorrt_preflight": check,
            }
            if precision == "fp16":
                record["fp16_policy"] = options.fp16_policy
            record.update(extra or {})
            if cuda_metrics is not None:
                record["parity_cuda"] = {"backend": "ort-cuda", **cuda_metrics}
            artifacts.append(record)

        say(f"exporting {spec.name} to ONNX (opset {onnx_export.OPSET}, batch {options.min_batch}..{options.max_batch})")
        module = onnx_export.InferenceModel(model, preprocessing, options.preprocess_in_graph)
        example = onnx_export.example_input(preprocessing, options.preprocess_in_graph, max(2, min(options.max_batch, 4)))
        if options.max_batch < 2:
            example = example[:1]
        external = onnx_export.export_onnx(module, example, staging / "model.onnx", options.min_batch, options.max_batch, metadata)
        if options.int8 and not external:  # --int8-exclude names nodes of this graph: checked before any parity run
            int8q.quantizable_nodes(onnx.load(str(staging / "model.onnx")), options.int8_options.exclude)
        verify_onnx("model.onnx", "fp32", ["model.onnx.data"] if external else [])

        if options.fp16:
            say(f"converting to fp16, policy {options.fp16_policy}: {fp16.POLICIES[options.fp16_policy]}")
            if options.fp16_policy == "activations":
                if external:
                    raise VitDeployError("--fp16-policy activations needs the whole graph in memory and this model's weights "
                                         "exceed 1 GiB; use --fp16-policy matmul")
                low = fp16.convert_activations_to_fp16(onnx.load(str(staging / "model.onnx")))
            else:
                floats = fp16.float_tensors(onnx.load(str(staging / "model.onnx"), load_external_data=False))
                low = fp16.convert_to_mixed_fp16(onnx.load(str(staging / "model.onnx")), floats)
            low_external = external  # fp16 halves only the weights: keep the fp32 decision
            trt_compat.save_graph(low, staging / "model_fp16.onnx", "model_fp16.onnx.data" if low_external else None)
            verify_onnx("model_fp16.onnx", "fp16", ["model_fp16.onnx.data"] if low_external else [])

        if options.int8:
            _export_int8(staging, options, calibration, verify_onnx, say, external, preprocessing.input_size)

        engine_record = None
        if trt is not None:
            engines = [("model_fp16.onnx", "fp16") if options.fp16 else ("model.onnx", "fp32")]
            if options.int8:
                engines.append(("model_int8_trt.onnx", "int8"))
            for source, precision in engines:
                engine_record = _build_engine(trt, staging, source, precision, contract, options, ref_logits, feed, labels,
                                              say, failed)
                artifacts.append(engine_record)
        else:
            say(f"no TensorRT engine: {no_trt_reason}")

        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "vitdeploy_version": __version__, "versions": versions(),
            "model": {"name": spec.name, "num_classes": len(class_names), "class_names": class_names,
                      "source_checkpoint": {"path": str(ckpt_path.resolve()), "sha256": ckpt_hash},
                      "weights": weights},
            "preprocessing": preprocessing.to_dict(),
            "input": contract,
            "output": {"name": onnx_export.OUTPUT, "dtype": "float32", "shape": ["batch", len(class_names)],
                       "description": "unnormalized class scores; softmax gives probabilities"},
            "batch": {"min": options.min_batch, "opt": options.opt, "max": options.max_batch},
            "parity_data": {"data_dir": str(data_dir), "images": n, "labels": "first N images of the CIFAR-10 test set"},
            "artifacts": artifacts,
            "tensorrt": {"built": engine_record is not None, "reason": no_trt_reason},
        }
        if options.triton is not None:
            manifest["triton"] = _write_triton(options.triton, staging, spec.name, manifest)
            say(f"Triton model repository: {options.triton}")
        write_manifest(staging, manifest)
        _publish(staging, options.out, manifest)
        if failed:
            raise VitDeployError(f"parity failed for {', '.join(failed)} (kept, marked failed in {options.out / MANIFEST}); see the lines above")
        return manifest
    except BaseException:  # an error, a full disk, SIGTERM (the CLI turns it into SystemExit): no debris beside --out
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _calibration_images(options: ExportOptions, checkpoint: dict[str, Any], data_dir: Path) -> np.ndarray:
    """`--calib-images` training images outside the run's validation split, drawn by `seed`."""
    config = checkpoint["config"]
    try:
        train = load_splits(data_dir, int(config.get("val_size", 5000)), int(config.get("seed", 0)), test_size=0).train
    except VitDeployError as exc:
        raise VitDeployError(f"--int8 calibrates on CIFAR-10 training images, which could not be read ({exc}); "
                             "pass --data-dir with the training batches") from None
    options.int8_options.validate(len(train))
    order = np.random.default_rng(options.int8_options.seed).permutation(len(train))[: options.int8_options.calib_images]
    return train.images.numpy()[np.sort(order)]


def _export_int8(staging: Path, options: ExportOptions, calibration: np.ndarray, verify_onnx: Callable[..., None],
                 say: Say, external: bool, model_px: int) -> None:
    """The CPU INT8 graph (form by the CPU rule) and the TensorRT INT8 graph, each through the accuracy gate."""
    if external:
        raise VitDeployError("--int8 needs the model in one ONNX file (protobuf's 2 GB limit) and this model's weights "
                             "exceed it; export it without --int8")
    rule = int8q.cpu_form(cpu_flags())
    for name, form, target in (("model_int8_cpu.onnx", rule["form"], "cpu"),
                               ("model_int8_trt.onnx", "qdq-s8-symmetric", "tensorrt")):
        say(f"quantizing to INT8 for {'ort-cpu' if target == 'cpu' else 'trt and ort-trt'}: {form}"
            + (f" ({rule['reason']})" if target == "cpu" else " (symmetric s8 Q/DQ, as TensorRT requires)")
            + f", calibrated on {len(calibration)} training images ({options.int8_options.calib_method})")
        with int8q.temporary_files_in(staging):  # ONNX Runtime's scratch files: removed with the staging folder
            record = int8q.quantize(staging / "model.onnx", staging / name, form, calibration, options.int8_options,
                                    model_px=model_px, say=say)
        record.update(target=target, backends=["ort-cpu"] if target == "cpu" else ["trt", "ort-trt"])
        if target == "cpu":
            record.update(rule=rule["reason"], cpu_int8_flags=rule["cpu_int8_flags"])
        verify_onnx(name, "int8", [], {"int8": record})


def _cuda_parity(path: Path, precision: str, feed: np.ndarray, ref_logits: np.ndarray, labels: np.ndarray,
                 max_batch: int) -> dict[str, Any]:
    """Parity on ONNX Runtime's CUDA provider, where it really runs: the real fp16 check."""
    with OrtBackend(path, "cuda", precision=precision) as backend:
        logits = run_batches(backend, feed, max_batch)
    return parity.compare(ref_logits, logits, labels, parity.TOLERANCES[precision])


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _build_engine(trt: Any, staging: Path, source: str, precision: str, contract: dict[str, Any], options: ExportOptions,
                  ref_logits: np.ndarray, feed: np.ndarray, labels: np.ndarray, say: Say, failed: list[str]) -> dict[str, Any]:
    from vitdeploy.backends.trt import TrtBackend

    name = f"model_{precision}.plan"
    cache = options.timing_cache or Path.home() / ".cache" / "vitdeploy" / "tensorrt-timing.cache"
    cache.parent.mkdir(parents=True, exist_ok=True)
    build = tensorrt.BuildOptions(options.profiles, int(options.workspace_gb * (1 << 30)),
                                  cache, options.hardware_compatible, options.version_compatible)
    say(f"building the TensorRT {trt.__version__} engine from {source} (strongly typed; precision from the ONNX types)")
    shape = (options.opt, *contract["shape"][1:])
    (staging / name).write_bytes(tensorrt.build_engine(trt, staging / source, onnx_export.INPUT, shape, build))
    record = {
        "kind": "tensorrt", "precision": precision, "source_onnx": source,
        "tensorrt_version": trt.__version__, **tensorrt_runtime.current_gpu(),
        "profiles": [{"min": lo, "opt": opt, "max": hi} for lo, opt, hi in options.profiles],
        "hardware_compatible": options.hardware_compatible, "version_compatible": options.version_compatible,
        "timing_cache": str(cache),
    }
    engine = tensorrt_runtime.deserialize(trt, (staging / name).read_bytes(), record)
    record["io"] = tensorrt.engine_io(engine, trt)
    expected = {contract["name"], onnx_export.OUTPUT}
    if {t["name"] for t in record["io"]} != expected:
        raise VitDeployError(f"the engine's I/O tensors {record['io']} are not {sorted(expected)}")
    with TrtBackend(staging / name, record) as backend:
        logits = run_batches(backend, feed, options.max_batch)
    if precision == "int8":
        record["int8"] = {"target": "tensorrt", "source_onnx": source}
    metrics = parity.compare(ref_logits, logits, labels, options.tolerance(precision))
    say(f"{name} (TensorRT vs PyTorch fp32): {parity.describe(metrics)}")
    if not metrics["passed"]:
        failed.append(name)
    record.update(file_record(staging, name))
    record["status"] = "passed" if metrics["passed"] else "failed"
    record["parity"] = {"backend": "trt", **metrics}
    with open(staging / f"{name}.json", "w") as f:  # the build facts next to the engine itself
        f.write(_json({k: v for k, v in record.items() if k != "parity"}) + "\n")
    return record


def _write_triton(repo: Path, out: Path, model_name: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Lay out the Triton repository from the export's files in `out`."""
    validate_manifest(manifest)
    repo.mkdir(parents=True, exist_ok=True)
    models = []
    max_batch = manifest["batch"]["max"]
    inputs = [manifest["input"]]
    outputs = [manifest["output"]]
    for artifact in manifest["artifacts"]:
        files = [out / artifact["path"], *(out / e["path"] for e in artifact.get("external_data", []))]
        if artifact["kind"] == "onnx":
            suffix = {"fp32": "", "fp16": "_fp16"}.get(artifact["precision"])
            if suffix is None:  # int8: one graph per target
                suffix = f"_{artifact['precision']}_{artifact['int8']['target']}"
            name = f"{model_name}_onnx{suffix}"
            triton.write_model(repo, name, "onnxruntime_onnx", files, "model.onnx", max_batch, inputs, outputs,
                               manifest["model"]["class_names"], {"precision": artifact["precision"]})
        else:
            name = f"{model_name}_trt" + ("" if artifact["precision"] != "int8" else "_int8")
            triton.write_model(repo, name, "tensorrt_plan", files, "model.plan", max_batch, inputs, outputs,
                               manifest["model"]["class_names"],
                               {"precision": artifact["precision"], "tensorrt_version": artifact["tensorrt_version"]})
        models.append({"name": name, "platform": "tensorrt_plan" if artifact["kind"] == "tensorrt" else "onnxruntime_onnx"})
    return {"repository": str(repo.resolve()), "models": models}
