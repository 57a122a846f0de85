"""`vitdeploy export`: checkpoint, or a model as published (`published`), -> verified ONNX
(fp32, optionally fp16 and INT8), TensorRT engine, Triton repository and manifest.json.

Everything is written into a staging folder beside the output folder, manifest.json
last, and the finished export replaces the folder's previous content in one step at the
end: an interrupted or failed export (even with --force) leaves the previous export as it
was, and never a manifest that points to a partial file.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch

from vitdeploy import __version__, parity, tensorrt_runtime, tome, triton_model
from vitdeploy.backends import registry
from vitdeploy.backends.base import run_batches
from vitdeploy.backends.ort import OrtBackend
from vitdeploy.backends.pytorch import TorchBackend
from vitdeploy.checkpoint import atomic_save
from vitdeploy.choices import FP16_POLICIES, RESIZE_MODES
from vitdeploy.data import ParitySet
from vitdeploy.datasets import calibration_images, parity_set
from vitdeploy.errors import VitDeployError
from vitdeploy.export import fp16, onnx_export, staging, tensorrt, triton, trt_compat
from vitdeploy.export import int8 as int8q
from vitdeploy.files import check_output_dir
from vitdeploy.images import Fit
from vitdeploy.manifest import (
    MANIFEST,
    Manifest,
    file_record,
    input_spec,
    sha256_file,
    validate_manifest,
    write_manifest,
)
from vitdeploy.models import LoadedModel, checkpoint_weights, load_model
from vitdeploy.preprocess import Preprocess, Preprocessing
from vitdeploy.published import CHECKPOINT, load_published
from vitdeploy.versions import cpu_flags, versions

Say = Callable[[str], None]
TRITON_QUEUE_DELAY_US = 1000  # the written configs' dynamic batching wait (Triton's own default is none)


@dataclass(frozen=True)
class ExportOptions:
    source: Path
    out: Path
    fp16: bool = False
    fp16_policy: str = "matmul"  # see choices.FP16_POLICIES
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
    weights: Path | None = None  # a model name as SOURCE: its weights file (else its cached or folder weights)
    class_names: Path | None = None  # a model name as SOURCE: its class names, one per line
    resize: str | None = None  # the graph's resize mode, where the model's cannot become an engine (bicubic)
    tome: tuple[int | tuple[int, ...] | str | None, ...] = ()  # token mergings (tome.parse): also write merged graphs
    tome_max_accuracy_drop: float = parity.TOME_MAX_ACCURACY_DROP

    @property
    def published(self) -> bool:
        """Whether SOURCE names a model (timm:, hf:, a registry name) rather than a run folder or checkpoint."""
        return not Path(self.source).exists()

    @property
    def opt(self) -> int:
        """The batch size the artifacts are tuned for (the manifest's batch.opt): 32 within the range."""
        return max(self.min_batch, min(32, self.max_batch))

    def tolerance(self, precision: str, merging: tome.Merging | None = None) -> parity.Tolerance:
        """The parity check of `precision`, with --int8-max-accuracy-drop for INT8. A merged graph is
        judged by accuracy alone: it may lose --tome-max-accuracy-drop points, plus what its precision may."""
        base = parity.TOLERANCES[precision]
        if precision == "int8":
            base = replace(base, max_accuracy_drop=self.int8_max_accuracy_drop)
        if merging is None:
            return base
        return parity.merged_tolerance(base, self.tome_max_accuracy_drop)

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
        if self.fp16_policy not in FP16_POLICIES:
            raise VitDeployError(f"unknown --fp16-policy {self.fp16_policy!r}; choose {' or '.join(FP16_POLICIES)}")
        if not 0 <= self.tome_max_accuracy_drop <= 100:
            raise VitDeployError("--tome-max-accuracy-drop is in percentage points, 0..100")
        if self.parity_images < 1:
            raise VitDeployError("--parity-images must be at least 1")
        if self.resize is not None and self.resize not in RESIZE_MODES:
            raise VitDeployError(f"--resize must be one of {', '.join(RESIZE_MODES)} (got {self.resize})")
        if not self.published and (self.weights or self.class_names):
            raise VitDeployError("--weights and --class-names are for a model name as SOURCE (e.g. timm:NAME); "
                                 "a checkpoint carries its own weights and class names")


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


@dataclass(frozen=True)
class _Source:
    """What the export starts from: the checkpoint (`path`, the file hashed; `recorded`, where the
    manifest says it is), its model, its preprocessing and the graph's (`--resize`), and the test images."""

    path: Path
    recorded: Path
    checkpoint: dict[str, Any]
    spec: Any
    model: torch.nn.Module
    preprocessing: Preprocessing
    graph_preprocessing: Preprocessing
    class_names: list[str]
    data_dir: Path
    parity: ParitySet

    @property
    def images(self) -> np.ndarray:
        return self.parity.images

    @classmethod
    def load(cls, options: ExportOptions, loaded: LoadedModel) -> _Source:
        data_dir = _data_dir(options, loaded.checkpoint)
        test = parity_set(data_dir, options.parity_images, Fit.of(loaded.preprocessing), loaded.class_names,
                          loaded.checkpoint.get("dataset"))
        graph = replace(loaded.preprocessing, resize_mode=options.resize) if options.resize else loaded.preprocessing
        return cls(loaded.path, loaded.path, loaded.checkpoint, loaded.spec, loaded.module, loaded.preprocessing, graph,
                   loaded.class_names, data_dir, test)


def _data_dir(options: ExportOptions, checkpoint: dict[str, Any]) -> Path:
    """--data-dir, else the run's; a published model has no run: it must be given."""
    found = options.data_dir or checkpoint["config"].get("data_dir")
    if found is None:
        raise VitDeployError("a model exported as published has no training run to take test images from: pass --data-dir "
                             "with cifar-10-batches-py or an image folder (its test images are the parity set)")
    return Path(found)


def _load(options: ExportOptions) -> LoadedModel:
    """The model SOURCE means: a run folder or checkpoint, else a model name deployed as published."""
    if not options.published:
        return load_model(options.source)
    return load_published(str(options.source), options.weights, options.class_names, options.out / CHECKPOINT)


MERGED_FP32_AGREEMENT = 0.99  # a merged fp32 graph's top-1 against PyTorch merging the same way (near-ties may flip)
MERGED_KEYS = ("top1_agreement", "disagreements", "max_abs_logit_diff", "mean_abs_logit_diff", "accuracy_pct", "passed",
               "failures")


def stem(merging: tome.Merging | None) -> str:
    """The file names' stem: `model`, or `model_tome{label}` for merged graphs."""
    return "model" if merging is None else f"model_tome{merging.label}"


@dataclass(frozen=True)
class _Merged:
    """One merging the export writes: its PyTorch logits on the parity images (the merged reference)
    and what each of its files records under `tome`."""

    merging: tome.Merging
    logits: np.ndarray
    record: dict[str, Any]


@dataclass(frozen=True)
class _Verifier:
    """Checks each file the export writes against the PyTorch reference (ONNX checker, parity on
    ONNX Runtime's CPU provider and, where it runs, its CUDA provider, TensorRT preflight or the
    engine's own parity) and returns its manifest record, marked passed or failed."""

    staging: Path
    options: ExportOptions
    feed: np.ndarray
    ref_logits: np.ndarray
    labels: np.ndarray | None
    say: Say
    cuda: bool  # ONNX Runtime's CUDA provider runs here: probed once, not per file

    def parity(self, backend: Any, name: str, what: str, precision: str, merged: _Merged | None = None) -> dict[str, Any]:
        """Parity against the unmerged PyTorch fp32 reference; a merged file also against PyTorch with the
        same merging (recorded under `merged`: what the export itself changed)."""
        with backend:
            logits = run_batches(backend, self.feed, self.options.max_batch, self.say, f"{name} parity:")
        metrics = parity.compare(self.ref_logits, logits, self.labels,
                                 self.options.tolerance(precision, merged.merging if merged else None))
        self.say(f"{name} ({what} vs PyTorch fp32{' unmerged' if merged else ''}): {parity.describe(metrics)}")
        if merged is not None:
            same = parity.compare(merged.logits, logits, self.labels, parity.Tolerance(None, None, 100.0))
            same["passed"] = precision != "fp32" or same["top1_agreement"] >= MERGED_FP32_AGREEMENT
            if not same["passed"]:
                same["failures"] = [f"top-1 agreement {100 * same['top1_agreement']:.2f}% with PyTorch merging the same "
                                    f"way is below {100 * MERGED_FP32_AGREEMENT:g}%"]
            self.say(f"{name} vs PyTorch fp32 with the same merging: top-1 agreement {100 * same['top1_agreement']:.2f}%, "
                     f"max |dlogit| {same['max_abs_logit_diff']:.2e}" + ("" if same["passed"] else " -> FAIL"))
            metrics = {**metrics, "merged": {k: same[k] for k in MERGED_KEYS}, "passed": metrics["passed"] and same["passed"],
                       "failures": metrics["failures"] + same["failures"]}
        return metrics

    def onnx(self, name: str, precision: str, external: list[str], extra: dict[str, Any] | None = None,
             merged: _Merged | None = None) -> dict[str, Any]:
        path = self.staging / name
        onnx_export.check_onnx(path)
        inputs, outputs = onnx_export.io_records(path)
        metrics = self.parity(OrtBackend(path, "cpu", precision=precision), name, "ONNX Runtime CPU", precision, merged)
        record = {"kind": "onnx", "precision": precision, **file_record(self.staging, name),
                  "external_data": [file_record(self.staging, e) for e in external],
                  "opset": onnx_export.OPSET, "inputs": inputs, "outputs": outputs,
                  "parity": {"backend": "ort-cpu", **metrics}, **(extra or {}), **(merged.record if merged else {})}
        if self.cuda and precision != "int8":  # the real fp16 check
            cuda = self.parity(OrtBackend(path, "cuda", precision=precision), name, "ONNX Runtime CUDA", precision, merged)
            record["parity_cuda"] = {"backend": "ort-cuda", **cuda}
        for_cpu_only = record.get("int8", {}).get("target") == "cpu"
        record["tensorrt_preflight"] = None if for_cpu_only else self._preflight(path, name)
        if precision == "fp16":
            record["fp16_policy"] = self.options.fp16_policy
        record["status"] = "passed" if metrics["passed"] and record.get("parity_cuda", {"passed": True})["passed"] else "failed"
        return record

    def _preflight(self, path: Path, name: str) -> dict[str, Any]:
        check = trt_compat.preflight(onnx.load(str(path), load_external_data=False))
        self.say(f"{name} TensorRT preflight ({check['checked_against']}): "
                 + ("ok" if check["ok"] else "PROBLEMS: " + "; ".join(check["problems"])))
        return check

    def engine(self, trt: Any, source: str, precision: str, contract: dict[str, Any],
               merged: _Merged | None = None) -> dict[str, Any]:
        """Build the TensorRT engine of `source`, check its I/O and parity; its build facts go beside it."""
        from vitdeploy.backends.trt import TrtBackend

        name, options = f"{stem(merged.merging if merged else None)}_{precision}.plan", self.options
        record = _build_engine(trt, self.staging, source, name, precision, options, (options.opt, *contract["shape"][1:]),
                               self.say)
        expected = {contract["name"], onnx_export.OUTPUT}
        if {t["name"] for t in record["io"]} != expected:
            raise VitDeployError(f"the engine's I/O tensors {record['io']} are not {sorted(expected)}")
        if precision == "int8":
            record["int8"] = {"target": "tensorrt", "source_onnx": source}
        record.update(merged.record if merged else {})
        metrics = self.parity(TrtBackend(self.staging / name, record), name, "TensorRT", precision, merged)
        record.update(file_record(self.staging, name), status="passed" if metrics["passed"] else "failed",
                      parity={"backend": "trt", **metrics})
        with open(self.staging / f"{name}.json", "w") as f:  # the build facts next to the engine itself
            f.write(_json({k: v for k, v in record.items() if k != "parity"}) + "\n")
        return record


def export_artifacts(options: ExportOptions, say: Say = print) -> dict[str, Any]:
    """Run the whole export; returns the manifest. Raises VitDeployError when a parity check fails
    (after writing the manifest with that artifact marked failed)."""
    options.validate()
    check_output_dir(options.out, "--out")  # before any long work
    if options.triton is not None:
        check_output_dir(options.triton, "--triton")
    loaded = _load(options)
    tome_plan = _tome_plan(options, loaded, say)  # before any long work: a --tome the model cannot hold fails here
    trt, no_trt_reason = _tensorrt_plan(options)  # before any long work: an explicit --trt fails here
    source = _Source.load(options, loaded)
    calibration = _calibration_images(options, source) if options.int8 else None
    staging_dir = staging.prepare_out(options.out, options.force)
    try:
        manifest = _export_into(staging_dir, options, source, calibration, trt, no_trt_reason, tome_plan, say)
        staging.publish(staging_dir, options.out, manifest)
    except BaseException:  # an error, a full disk, SIGTERM (the CLI turns it into SystemExit): no debris beside --out
        shutil.rmtree(staging_dir, ignore_errors=True)
        raise
    failed = _failures(manifest["artifacts"])
    if failed:
        raise VitDeployError(f"parity failed for {', '.join(failed)} (kept, marked failed in {options.out / MANIFEST}); see the lines above")
    return manifest


@dataclass(frozen=True)
class _TomePlan:
    """What --tome asks the export for: these mergings, or (`auto`) the first of them that passes the gate."""

    mergings: tuple[tome.Merging, ...] = ()
    auto: bool = False


def _tome_plan(options: ExportOptions, loaded: LoadedModel, say: Say) -> _TomePlan:
    """The mergings of every --tome (checked against the model before any long work): none, those given,
    or --tome auto's candidates, largest first. Without --tome, a run fine-tuned with merging exports
    its merging too."""
    spec, asked = loaded.spec, options.tome
    trained = loaded.checkpoint["config"].get("tome")
    if not asked and isinstance(trained, str):
        asked = (tome.parse(trained),)
        say(f"the run was fine-tuned with --tome {trained}: exporting its merged graphs too (--tome 0: only unmerged ones)")
    if tome.AUTO in asked:
        if len(asked) > 1:
            raise VitDeployError("--tome auto chooses one r: give it alone, or list the r values to export instead")
        return _TomePlan(tuple(tome.plan(spec, r) for r in tome.auto_candidates(spec)), auto=True)
    mergings = [tome.plan(spec, value) for value in asked]
    return _TomePlan(tuple(dict.fromkeys(m for m in mergings if m is not None)))


def _merged_pytorch(options: ExportOptions, source: _Source, merging: tome.Merging, ref_logits: np.ndarray,
                    say: Say) -> tuple[_Merged, dict[str, Any]]:
    """PyTorch with `merging` on the parity images (the merged reference), its gate against the unmerged
    reference, and what the merged files record (schedule, tokens, GFLOPs)."""
    with tome.merged(source.model, merging), TorchBackend(source.model, source.graph_preprocessing) as backend:
        logits = run_batches(backend, source.images, options.max_batch, say, f"PyTorch with {tome.describe(merging)}:")
    gate = parity.compare(ref_logits, logits, source.parity.labels, options.tolerance("fp32", merging))
    classes = len(source.class_names)
    record = {"tome": {**merging.to_record(), "gflops_per_image": round(tome.gflops(source.spec, classes, merging), 4),
                       "unmerged_gflops_per_image": round(tome.gflops(source.spec, classes, None), 4),
                       "max_accuracy_drop": options.tome_max_accuracy_drop}}
    say(f"{tome.describe(merging)}: {record['tome']['gflops_per_image']:.3g} GFLOPs per image (unmerged "
        f"{record['tome']['unmerged_gflops_per_image']:.3g}); in PyTorch: {parity.describe(gate)}")
    return _Merged(merging, logits, record), gate


def _merged_references(options: ExportOptions, source: _Source, plan: _TomePlan, ref_logits: np.ndarray,
                       say: Say) -> tuple[list[_Merged], dict[str, Any] | None]:
    """The merged references to export, and --tome auto's record: its candidates are tried in PyTorch,
    largest first, and the first within the accuracy gate is exported (the smallest when none is: it is
    exported, fails its gate and the export exits 1)."""
    if not plan.auto:
        return [_merged_pytorch(options, source, m, ref_logits, say)[0] for m in plan.mergings], None
    tried = []
    for merging in plan.mergings:
        merged, gate = _merged_pytorch(options, source, merging, ref_logits, say)
        tried.append({"r": merging.label, "passed": gate["passed"], "accuracy_pct": gate["accuracy_pct"],
                      "top1_agreement": gate["top1_agreement"]})
        if gate["passed"]:
            break
    say(f"--tome auto: r={merged.merging.label}" + ("" if tried[-1]["passed"] else " (no candidate passed the gate)"))
    return [merged], {"tried": tried, "chosen": merged.merging.label, "max_accuracy_drop": options.tome_max_accuracy_drop}


def _export_into(folder: Path, options: ExportOptions, source: _Source, calibration: np.ndarray | None, trt: Any,
                 no_trt_reason: str | None, tome_plan: _TomePlan, say: Say) -> dict[str, Any]:
    """Every file of the export, verified, and manifest.json last, in `folder`; returns the manifest."""
    if options.published:  # its checkpoint goes with the graphs: the PyTorch reference of bench, serve and explain
        atomic_save(source.checkpoint, folder / CHECKPOINT)
        source = replace(source, path=folder / CHECKPOINT)
        say(f"{source.spec.name} as published: weights {source.checkpoint['config']['published']['weights']}, "
            f"{len(source.class_names)} classes, {source.preprocessing.input_size} px; its checkpoint: {source.recorded}")
    graph = source.graph_preprocessing
    contract = input_spec(graph, options.preprocess_in_graph)
    feed = source.images if options.preprocess_in_graph else Preprocess(graph)(torch.from_numpy(source.images)).numpy()
    weights = checkpoint_weights(source.checkpoint)[0]
    say(f"weights: {'the EMA of the run (what it evaluated and chose best.pt by)' if weights == 'ema' else 'the trained weights'} "
        f"of {source.path}")
    say(f"reference: PyTorch fp32 on {len(source.images)} test images from {source.data_dir}"
        + ("" if source.parity.labels is not None else " (accuracy not measured: the model's classes are not the dataset's)"))
    with TorchBackend(source.model, graph) as reference:  # what the graphs compute, --resize included
        ref_logits = run_batches(reference, source.images, options.max_batch, say, "reference:")
    resize_cost = _resize_cost(source, ref_logits, options.max_batch, say) if graph != source.preprocessing else None
    verify = _Verifier(folder, options, feed, ref_logits, source.parity.labels, say, registry.get("ort-cuda").probe()[0])
    ckpt_hash = sha256_file(source.path)
    merged, auto = _merged_references(options, source, tome_plan, ref_logits, say)
    artifacts = []
    for each in (None, *merged):
        graphs, external = _onnx_graphs(folder, options, source, contract, ckpt_hash, verify, say, each)
        if options.int8:
            graphs += _export_int8(folder, options, calibration, verify, say, external, graph.input_size, each)
        if trt is not None:
            name = stem(each.merging if each else None)
            engines = [(f"{name}_fp16.onnx", "fp16") if options.fp16 else (f"{name}.onnx", "fp32")]
            engines += [(f"{name}_int8_trt.onnx", "int8")] if options.int8 else []
            graphs += [verify.engine(trt, onnx_file, precision, contract, each) for onnx_file, precision in engines]
        artifacts += graphs
    if trt is None:
        say(f"no TensorRT engine: {no_trt_reason}")
    manifest = _manifest(options, source, contract, ckpt_hash, weights, artifacts, no_trt_reason, resize_cost)
    if auto is not None:
        manifest["tome_auto"] = auto
    if options.triton is not None:
        manifest["triton"] = _write_triton(options.triton, folder, source.spec.name, manifest)
        say(f"Triton model repository: {options.triton}")
    write_manifest(folder, manifest)
    return manifest


def _onnx_graphs(folder: Path, options: ExportOptions, source: _Source, contract: dict[str, Any], ckpt_hash: str,
                 verify: _Verifier, say: Say, merged: _Merged | None = None) -> tuple[list[dict[str, Any]], bool]:
    """The fp32 ONNX graph and, with --fp16, the fp16 one (merging tokens by `merged`), verified; and
    whether the weights are external."""
    merging = merged.merging if merged else None
    name = stem(merging)
    metadata = {
        "vitdeploy.model": source.spec.name,
        "vitdeploy.class_names": ",".join(source.class_names),
        "vitdeploy.preprocessing": _json(source.graph_preprocessing.to_dict()),
        "vitdeploy.input_contract": _json(contract),
        "vitdeploy.version": __version__,
        "vitdeploy.source_checkpoint_sha256": ckpt_hash,
        **({"vitdeploy.tome": _json(merging.to_record())} if merging else {}),
    }
    say(f"exporting {source.spec.name} to ONNX (opset {onnx_export.OPSET}, batch {options.min_batch}..{options.max_batch}"
        + (f", {tome.describe(merging)})" if merging else ")"))
    module = onnx_export.InferenceModel(source.model, source.graph_preprocessing, options.preprocess_in_graph)
    example = onnx_export.example_input(source.graph_preprocessing, options.preprocess_in_graph, max(2, min(options.max_batch, 4)))
    if options.max_batch < 2:
        example = example[:1]
    with tome.merged(source.model, merging):
        external = onnx_export.export_onnx(module, example, folder / f"{name}.onnx", options.min_batch, options.max_batch,
                                           metadata)
    if options.int8 and not external:  # --int8-exclude names nodes of this graph: checked before any parity run
        int8q.quantizable_nodes(onnx.load(str(folder / f"{name}.onnx")), options.int8_options.exclude)
    records = [verify.onnx(f"{name}.onnx", "fp32", [f"{name}.onnx.data"] if external else [], merged=merged)]
    if options.fp16:
        _write_fp16(folder, name, options, external, say)
        records.append(verify.onnx(f"{name}_fp16.onnx", "fp16", [f"{name}_fp16.onnx.data"] if external else [],
                                   merged=merged))
    return records, external


def _write_fp16(folder: Path, name: str, options: ExportOptions, external: bool, say: Say) -> None:
    """NAME_fp16.onnx from NAME.onnx by --fp16-policy (fp16 halves only the weights: the fp32 external-data decision holds)."""
    say(f"converting {name}.onnx to fp16, policy {options.fp16_policy}: {FP16_POLICIES[options.fp16_policy]}")
    source = folder / f"{name}.onnx"
    if options.fp16_policy == "activations":
        if external:
            raise VitDeployError("--fp16-policy activations needs the whole graph in memory and this model's weights "
                                 "exceed 1 GiB; use --fp16-policy matmul")
        low = fp16.convert_activations_to_fp16(onnx.load(str(source)))
    else:
        floats = fp16.float_tensors(onnx.load(str(source), load_external_data=False))
        low = fp16.convert_to_mixed_fp16(onnx.load(str(source)), floats)
    onnx_export.save_graph(low, folder / f"{name}_fp16.onnx", f"{name}_fp16.onnx.data" if external else None)


def _resize_cost(source: _Source, ref_logits: np.ndarray, max_batch: int, say: Say) -> dict[str, Any]:
    """What --resize changes: PyTorch with the model's own resize against PyTorch with the graph's."""
    with TorchBackend(source.model, source.preprocessing) as own:
        own_logits = run_batches(own, source.images, max_batch, say, "reference with the model's resize:")
    cost = parity.compare(own_logits, ref_logits, source.parity.labels, parity.Tolerance(None, None, 100.0))
    say(f"--resize {source.graph_preprocessing.resize_mode} instead of the model's {source.preprocessing.resize_mode} "
        f"(PyTorch against PyTorch; every graph below is checked against the {source.graph_preprocessing.resize_mode} "
        f"reference): {parity.describe(cost).rsplit(' -> ', 1)[0]}")
    return {"model": source.preprocessing.resize_mode, "graph": source.graph_preprocessing.resize_mode,
            "cost": {k: v for k, v in cost.items() if k not in ("tolerance", "passed", "failures")}}


def _manifest(options: ExportOptions, source: _Source, contract: dict[str, Any], ckpt_hash: str, weights: str,
              artifacts: list[dict[str, Any]], no_trt_reason: str | None, resize_cost: dict[str, Any] | None) -> dict[str, Any]:
    details = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "vitdeploy_version": __version__, "versions": versions(),
        "parity_data": {"data_dir": str(source.data_dir), "images": len(source.images),
                        "labels": source.parity.description},
        **({"dataset": {k: v for k, v in source.checkpoint["dataset"].items() if k != "placement"}}
           if isinstance(source.checkpoint.get("dataset"), dict) else {}),
        "tensorrt": {"built": any(a["kind"] == "tensorrt" for a in artifacts), "reason": no_trt_reason},
        **({"resize": resize_cost} if resize_cost is not None else {}),
        **({"published": source.checkpoint["config"]["published"]} if options.published else {}),
    }
    return Manifest(source.spec.name, tuple(source.class_names), source.recorded, ckpt_hash, source.graph_preprocessing, contract,
                    (options.min_batch, options.opt, options.max_batch), tuple(artifacts), weights, details).to_json()


def _failures(artifacts: list[dict[str, Any]]) -> list[str]:
    """The files (and CUDA runs) outside their parity tolerance."""
    failed = []
    for artifact in artifacts:
        if not artifact["parity"]["passed"]:
            failed.append(artifact["path"])
        if not artifact.get("parity_cuda", {"passed": True})["passed"]:
            failed.append(f"{artifact['path']} on CUDA")
    return failed


def _calibration_images(options: ExportOptions, source: _Source) -> np.ndarray:
    """`--calib-images` training images outside the run's validation split (a published model had no run:
    any training image), drawn by `seed`, as the model takes them."""
    return calibration_images(source.data_dir, options.int8_options.calib_images, options.int8_options.seed,
                              Fit.of(source.preprocessing), None if options.published else source.checkpoint["config"],
                              source.checkpoint.get("dataset"))


def _export_int8(staging: Path, options: ExportOptions, calibration: np.ndarray, verify: _Verifier,
                 say: Say, external: bool, model_px: int, merged: _Merged | None = None) -> list[dict[str, Any]]:
    """The CPU INT8 graph (form by the CPU rule) and the TensorRT INT8 graph of NAME.onnx, each through the accuracy gate."""
    name = stem(merged.merging if merged else None)
    if external:
        raise VitDeployError("--int8 needs the model in one ONNX file (protobuf's 2 GB limit) and this model's weights "
                             "exceed it; export it without --int8")
    rule = int8q.cpu_form(cpu_flags())
    records = []
    for out, form, target in ((f"{name}_int8_cpu.onnx", rule["form"], "cpu"),
                              (f"{name}_int8_trt.onnx", "qdq-s8-symmetric", "tensorrt")):
        runners = [b.name for b in registry.BACKENDS if b.int8_target == target]
        say(f"quantizing to INT8 for {', '.join(runners)}: {form}"
            + (f" ({rule['reason']})" if target == "cpu" else " (symmetric s8 Q/DQ, as TensorRT requires)")
            + f", calibrated on {len(calibration)} training images ({options.int8_options.calib_method})")
        with int8q.temporary_files_in(staging):  # ONNX Runtime's scratch files: removed with the staging folder
            record = int8q.quantize(staging / f"{name}.onnx", staging / out, form, calibration, options.int8_options,
                                    model_px=model_px, say=say, symbolic_shapes=merged is None)
        record.update(target=target, backends=runners)
        if target == "cpu":
            record.update(rule=rule["reason"], cpu_int8_flags=rule["cpu_int8_flags"])
        records.append(verify.onnx(out, "int8", [], {"int8": record}, merged))
    return records


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _build_engine(trt: Any, staging: Path, source: str, name: str, precision: str, options: ExportOptions,
                  shape: tuple[int, ...], say: Say) -> dict[str, Any]:
    """Build `name` from the ONNX file `source` and return its build record with the engine's I/O."""
    cache = options.timing_cache or Path.home() / ".cache" / "vitdeploy" / "tensorrt-timing.cache"
    cache.parent.mkdir(parents=True, exist_ok=True)
    build = tensorrt.BuildOptions(options.profiles, int(options.workspace_gb * (1 << 30)),
                                  cache, options.hardware_compatible, options.version_compatible)
    say(f"building the TensorRT {trt.__version__} engine from {source} (strongly typed; precision from the ONNX types)")
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
    return record


def _write_triton(repo: Path, out: Path, model_name: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Lay out the Triton repository from the export's files in `out`."""
    validate_manifest(manifest)
    repo.mkdir(parents=True, exist_ok=True)
    models = []
    for artifact in manifest["artifacts"]:
        files = [out / artifact["path"], *(out / e["path"] for e in artifact.get("external_data", []))]
        platform = triton_model.PLATFORMS[artifact["kind"]]
        config = triton_model.model_config(triton_model.model_name(model_name, artifact), platform, manifest["batch"]["max"],
                                           [manifest["input"]], [manifest["output"]],
                                           triton_model.parameters(artifact, artifact["precision"]),
                                           max_queue_delay_us=TRITON_QUEUE_DELAY_US)
        triton.write_model(repo, config, files, "model.plan" if artifact["kind"] == "tensorrt" else "model.onnx",
                           manifest["model"]["class_names"])
        models.append({"name": config["name"], "platform": platform})
    return {"repository": str(repo.resolve()), "models": models}
