"""What `vitdeploy bench` measures: which backend/precision pairs run here (and why the
others do not), their accuracy and parity against the PyTorch fp32 reference on real
test images, and their latency and throughput per batch size and input mode."""

from __future__ import annotations

import gc
import itertools
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitdeploy import tome as tomes
from vitdeploy.backends import registry
from vitdeploy.backends.base import Backend, run_batches
from vitdeploy.backends.factory import missing_hint, model_input, open_backend, served_artifact
from vitdeploy.bench.timing import TimingPolicy, measure
from vitdeploy.choices import BENCH_MODES
from vitdeploy.datasets import parity_set
from vitdeploy.errors import VitDeployError
from vitdeploy.images import Fit
from vitdeploy.manifest import read_manifest
from vitdeploy.parity import TOLERANCES, Tolerance, compare, describe, merged_tolerance
from vitdeploy.preprocess import Preprocessing
from vitdeploy.versions import (
    SIMD_FLAGS,
    cpu_flags,
    cpu_name,
    cuda_devices,
    device_record,
    peak_rss_mib,
    versions,
)

SCHEMA = "vitdeploy-bench"
SCHEMA_VERSION = 1
ROTATION = 4  # distinct real batches each configuration cycles through
DEFAULT_BATCH_SIZES = (1, 8, 32, 128)

Say = Callable[[str], None]


@dataclass(frozen=True)
class BenchOptions:
    """Everything `vitdeploy bench` was asked to do."""

    artifacts: Path
    backends: tuple[str, ...] = ("all",)
    precisions: tuple[str, ...] = ()  # empty: each backend's natural set (see `precisions_for`)
    batch_sizes: tuple[int, ...] = ()  # empty: DEFAULT_BATCH_SIZES within the exported range
    modes: tuple[str, ...] = BENCH_MODES
    policy: TimingPolicy = field(default_factory=TimingPolicy)
    limit: int | None = None
    data_dir: Path | None = None
    threads: int | None = None
    compile: bool = False
    checkpoint: Path | None = None
    max_abs: float | None = None
    margin: float | None = None
    max_accuracy_drop: float | None = None
    cuda_graph: bool = False
    tome: tuple[str, ...] = ()  # token-merging labels to run ("0": unmerged); empty: unmerged and every exported one

    def validate(self, manifest: dict[str, Any]) -> None:
        registry.parse_backends(",".join(self.backends))  # each name known
        bad = [p for p in self.precisions if p not in TOLERANCES]
        if bad:
            raise VitDeployError(f"unknown precision {bad[0]!r}; choose from {', '.join(TOLERANCES)}")
        if self.batch_sizes and min(self.batch_sizes) < 1:
            raise VitDeployError("--batch-sizes must be positive integers, e.g. 1,8,32,128")
        lo, hi = manifest["batch"]["min"], manifest["batch"]["max"]
        outside = [b for b in self.batch_sizes if not lo <= b <= hi]  # only sizes asked for explicitly
        if outside:
            raise VitDeployError(f"batch size {outside[0]} is outside the exported range {lo}..{hi}; "
                                 "choose sizes within it or re-export with --min-batch/--max-batch")
        if self.limit is not None and self.limit < 1:
            raise VitDeployError("--limit must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise VitDeployError("--threads must be at least 1")
        if not self.modes or any(m not in BENCH_MODES for m in self.modes):
            raise VitDeployError(f"--mode must be one of {', '.join(BENCH_MODES)} or both")
        if self.cuda_graph:
            cpu_only = [b for b in self.backends if b != "all" and not registry.get(b).cuda_graph_here()]
            if cpu_only:
                raise VitDeployError(f"--cuda-graph is for the GPU backends {', '.join(registry.GRAPH_BACKENDS)}; "
                                     f"{cpu_only[0]} cannot use one here (leave it out, or drop --cuda-graph)")

    def sizes(self, manifest: dict[str, Any]) -> tuple[int, ...]:
        """The batch sizes to time: those asked for, or the defaults the artifacts accept."""
        if self.batch_sizes:
            return self.batch_sizes
        lo, hi = manifest["batch"]["min"], manifest["batch"]["max"]
        return tuple(b for b in DEFAULT_BATCH_SIZES if lo <= b <= hi) or (hi,)

    def tolerance(self, precision: str, tome: str | None = None) -> Tolerance:
        """The default tolerance of `precision`, with the options given on the command line. Merged runs
        are judged by accuracy alone, as export's gate: --max-accuracy-drop in all, else that gate's default."""
        if tome is not None:
            default = merged_tolerance(TOLERANCES[precision])
            return default if self.max_accuracy_drop is None else replace(default, max_accuracy_drop=self.max_accuracy_drop)
        overrides = {k: v for k, v in (("max_abs", self.max_abs), ("margin", self.margin),
                                       ("max_accuracy_drop", self.max_accuracy_drop)) if v is not None}
        return replace(TOLERANCES[precision], **overrides)


def mergings_for(manifest: dict[str, Any], asked: tuple[str, ...]) -> list[str | None]:
    """The token mergings to run (labels, None: unmerged): those asked for, or unmerged and every exported one."""
    if asked:
        return list(dict.fromkeys(None if a == "0" else a for a in asked))
    exported = [a["tome"]["label"] for a in manifest["artifacts"] if "tome" in a]
    return [None, *dict.fromkeys(exported)]


def precisions_for(name: str, manifest: dict[str, Any], asked: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(precisions to run, reasons for the asked ones that cannot run) for backend `name`.

    Without `asked`: every precision the backend runs here (see `backends.registry`) that the
    artifacts hold; the pytorch backend runs the checkpoint, so fp32, plus fp16 and bf16 on a GPU.
    """
    entry = registry.get(name)
    runnable = list(entry.precisions_here())
    if entry.kind != "checkpoint":
        exported = {a["precision"] for a in manifest["artifacts"] if a["kind"] == entry.kind}
        runnable = [p for p in runnable if p in exported]
    if not asked:
        return runnable, []
    reasons = []
    for p in asked:
        if p not in entry.precisions_here():
            reasons.append(entry.why_not(p))
        elif p not in runnable:
            reasons.append(f"{name} {p}: the artifacts have no {entry.kind} {p} model ({missing_hint(entry.kind, p)})")
    return [p for p in asked if p in runnable], reasons


def plan(manifest: dict[str, Any], options: BenchOptions) -> tuple[list[tuple[str, str, str | None]], list[dict[str, str]]]:
    """(backend, precision, token merging) triples to run, and the skipped ones with their reasons.

    With `all`, a backend that cannot run here is skipped; named explicitly, it is an error. The
    pytorch backend runs every merging (it merges itself); the others where the export wrote it.
    """
    mergings = mergings_for(manifest, options.tome)
    explicit = "all" not in options.backends
    names = tuple(dict.fromkeys(options.backends)) if explicit else registry.NAMES
    statuses = {s.name: s for s in registry.statuses(names)}
    runs, skipped = [], []
    for name in dict.fromkeys(names):
        status = statuses[name]
        if not status.usable:
            if explicit:
                raise VitDeployError(f"backend {name} cannot run here: {status.reason}")
            skipped.append({"backend": name, "reason": status.reason})
            continue
        chosen, reasons = precisions_for(name, manifest, options.precisions)
        entry = registry.get(name)
        for p, label in itertools.product(chosen, mergings):
            if entry.kind == "checkpoint" or served_artifact(manifest, name, p, tomes.from_label(label)) is not None:
                runs.append((name, p, label))
            elif options.tome:
                reasons.append(f"{name} {p}: the artifacts have no graph merging tokens with r={label} "
                               f"({missing_hint(entry.kind, p, tomes.from_label(label))})")
        skipped += [{"backend": name, "reason": r} for r in reasons]
        if not chosen and not reasons:
            skipped.append({"backend": name, "reason": f"no {name} artifact in {options.artifacts}"})
    if not runs:
        raise VitDeployError("nothing to run: " + "; ".join(s["reason"] for s in skipped))
    return runs, skipped


def rotation(images: np.ndarray, batch_size: int, count: int = ROTATION) -> list[np.ndarray]:
    """`count` distinct consecutive batches of real images (wrapping around a small set)."""
    n = len(images)
    return [images[np.arange(k * batch_size, (k + 1) * batch_size) % n] for k in range(count)]


def environment() -> dict[str, Any]:
    """The machine the numbers were measured on."""
    cuda = torch.device("cuda") if torch.cuda.is_available() else None
    return {
        "versions": versions(),
        "cpu": {"name": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "flags": sorted(cpu_flags() & set(SIMD_FLAGS))},
        "cuda_devices": cuda_devices(),
        "gpu": device_record(cuda) if cuda is not None else None,
        "host": platform.node(),
    }


def run_bench(options: BenchOptions, say: Say = print,
              progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Measure everything `options` asks for; returns the report (see README: bench.json).

    `progress` receives the report so far after each measurement, so that an interrupted
    run keeps what it measured."""
    manifest = read_manifest(options.artifacts)
    options.validate(manifest)
    runs, skipped = _device_mode_plan(*plan(manifest, options), options.modes)
    for s in skipped:
        say(f"skipped {s['backend']}: {s['reason']}")
    data_dir = options.data_dir or Path(manifest.get("parity_data", {}).get("data_dir", "data"))
    test = parity_set(data_dir, options.limit or sys.maxsize, Fit.of(Preprocessing.from_dict(manifest["preprocessing"])),
                      manifest["model"]["class_names"], manifest.get("dataset"))
    images, labels, n = test.images, test.labels, len(test.images)
    batch_sizes = options.sizes(manifest)
    measured = "accuracy and parity" if labels is not None else "parity (no accuracy: the model's classes are not the dataset's)"
    say(f"{measured} on {test.what} ({data_dir}); timing batch sizes {', '.join(map(str, batch_sizes))}")
    bench = _Bench(options, manifest, images, labels, batch_sizes, say)
    with bench.open("pytorch", "fp32", compile=False) as reference:  # always eager fp32, unmerged, without graphs
        ref_logits = run_batches(reference, images, bench.eval_batch, say, "reference pytorch fp32:")
    report = _new_report(options, manifest, data_dir, n, bench.eval_batch, skipped)
    for name, precision, label in runs:
        for kind, entry in bench.measure(name, precision, label, ref_logits):
            report[kind].append(entry)
            if progress is not None and kind == "records":
                progress(report)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    _add_speedups(report["records"])
    report["complete"] = True
    report["passed"] = all(p["passed"] for p in report["parity"])
    return report


def _device_mode_plan(runs: list[tuple[str, str, str | None]], skipped: list[dict[str, str]],
                      modes: tuple[str, ...]) -> tuple[list[tuple[str, str, str | None]], list[dict[str, str]]]:
    """With --mode device alone, the runs without a device mode here move to the skipped ones
    (refused before the parity pass, not after it with an empty table)."""
    if modes != ("device",):
        return runs, skipped
    hostless = [(n, p, t) for n, p, t in runs if not registry.get(n).device_mode_here()]
    kept = [r for r in runs if r not in hostless]
    if not kept:
        raise VitDeployError("--mode device times inputs already on a GPU, and no backend to bench here has a device "
                             "mode (the CPU backends run from host memory); use --mode end-to-end")
    return kept, skipped + [{"backend": n, "reason": f"{n} {p}: no device mode here (its inputs live on the host)"}
                            for n, p, _ in hostless]


def _new_report(options: BenchOptions, manifest: dict[str, Any], data_dir: Path, n: int, eval_batch: int,
                skipped: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "artifacts": str(options.artifacts),
        "model": manifest["model"]["name"],
        "input": {k: manifest["input"][k] for k in ("dtype", "shape", "preprocessing_in_graph")},
        "data": {"data_dir": str(data_dir), "images": n, "eval_batch_size": eval_batch},
        "timing_policy": options.policy.to_dict(),
        "modes_definition": {
            "end-to-end": "host uint8 images in, host float32 logits out: host preprocessing (when not in the graph), "
                          "host-device copies and synchronization included",
            "device": "inputs already on the device, outputs left there; timed until the device has finished",
        },
        "environment": environment(),
        "skipped": skipped,
        "parity": [],
        "records": [],
        "complete": False,
        "passed": True,
    }


def _add_speedups(records: list[dict[str, Any]]) -> None:
    """Each record's images/s over unmerged PyTorch fp32's in the same mode and batch size, and over the same
    backend and precision unmerged (what token merging gained), where those were measured."""
    def images_per_s(backend: str, precision: str, mode: str, batch_size: int) -> float | None:
        return next((r["images_per_s"] for r in records if (r["backend"], r["precision"], r["mode"], r["batch_size"], r["tome"])
                     == (backend, precision, mode, batch_size, None)), None)

    for record in records:
        key = (record["mode"], record["batch_size"])
        base, unmerged = images_per_s("pytorch", "fp32", *key), images_per_s(record["backend"], record["precision"], *key)
        record["speedup_vs_pytorch_fp32"] = round(record["images_per_s"] / base, 3) if base else None
        record["speedup_vs_unmerged"] = round(record["images_per_s"] / unmerged, 3) if unmerged else None


@dataclass(frozen=True)
class _Bench:
    """One bench run's fixed inputs: how to open a backend, and the measurement of one backend x precision."""

    options: BenchOptions
    manifest: dict[str, Any]
    images: np.ndarray
    labels: np.ndarray | None
    batch_sizes: tuple[int, ...]
    say: Say

    @property
    def eval_batch(self) -> int:
        return max(self.batch_sizes)

    def open(self, name: str, precision: str, compile: bool, graphs: bool = False, tome: str | None = None) -> Backend:
        o = self.options
        return open_backend(o.artifacts, self.manifest, name, precision, threads=o.threads, compile=compile,
                            checkpoint=o.checkpoint, cuda_graph=graphs and registry.get(name).cuda_graph_here(),
                            say=self.say, tome=tomes.from_label(tome))

    def measure(self, name: str, precision: str, tome: str | None,
                ref_logits: np.ndarray) -> Iterator[tuple[str, dict[str, Any]]]:
        """("parity", its parity entry) first, then ("records", one record) per batch size and mode, as each is measured."""
        o, say = self.options, self.say
        what = f"{name} {precision}" + (f" r={tome}" if tome else "")
        opened = time.perf_counter()
        with self.open(name, precision, compile=o.compile and name == "pytorch", graphs=o.cuda_graph, tome=tome) as backend:
            loaded = {"load_s": round(time.perf_counter() - opened, 3)}  # reading the file, session or engine set-up
            described = backend.describe()
            loaded.update(_artifact(self.manifest, described), gflops_per_image=_gflops(self.manifest, tome))
            if (name, precision, tome) == ("pytorch", "fp32", None) and not o.compile and not o.cuda_graph:
                logits = ref_logits  # it is the reference
            else:
                logits = run_batches(backend, model_input(self.manifest, self.images, name), self.eval_batch, say,
                                     f"{what} parity:")
            metrics = compare(ref_logits, logits, self.labels, o.tolerance(precision, tome))
            say(f"{what}: {describe(metrics)}")
            yield "parity", {"backend": name, "precision": precision, "tome": tome, **metrics}
            for batch_size, mode in itertools.product(self.batch_sizes, o.modes):
                if mode == "device" and not backend.device_mode:
                    continue
                record = _record(name, precision, tome, mode, batch_size, described,
                                 self._time(backend, name, mode, batch_size), metrics)
                record.update(_ran(backend.describe()), **loaded, process_peak_rss_mib=peak_rss_mib())
                say(f"{what} {mode} batch {batch_size}: p50 {record['latency_ms_p50']:.3f} ms, "
                    f"{record['images_per_s']:,.1f} images/s ({record['iterations']} iterations"
                    f"{', capped by --max-seconds' if record['capped_by_max_seconds'] else ''})")
                yield "records", record

    def _time(self, backend: Backend, name: str, mode: str, batch_size: int) -> dict[str, Any]:
        """Timing summary of `backend` on rotating real batches: end-to-end counts host preprocessing."""
        batches = rotation(self.images, batch_size)
        if mode == "device":
            staged = [backend.stage(model_input(self.manifest, b, name)) for b in batches]
            return measure(backend.run_staged, staged, self.options.policy).summary(batch_size)
        return measure(lambda batch: backend.infer(model_input(self.manifest, batch, name)), batches,
                       self.options.policy).summary(batch_size)


def _gflops(manifest: dict[str, Any], tome: str | None) -> float | None:
    """GFLOPs per image of the merging `tome` (None: unmerged), as the export recorded it; None where it did not."""
    for a in manifest["artifacts"]:
        record = a.get("tome")
        if record is not None:
            if record["label"] == tome:
                return record.get("gflops_per_image")
            if tome is None:
                return record.get("unmerged_gflops_per_image")
    return None


def _artifact(manifest: dict[str, Any], described: dict[str, Any]) -> dict[str, Any]:
    """The file a backend ran and its size on disk (external weights included); the pytorch backend runs
    the training checkpoint, which is not part of the export."""
    name = described.get("model")
    for a in manifest["artifacts"]:
        if a["path"] == name:
            size = a["size_bytes"] + sum(e["size_bytes"] for e in a.get("external_data", []))
            return {"artifact": name, "artifact_mb": round(size / 2**20, 2)}
    return {"artifact": name, "artifact_mb": None}


def _ran(described: dict[str, Any]) -> dict[str, Any]:
    """What actually ran for the last measurement: the TensorRT profile, and whether (and at
    which bucket) a CUDA graph replayed."""
    graph = described.get("cuda_graph") or False
    if isinstance(graph, dict):
        ran, bucket = graph["last_bucket"] is not None, graph["last_bucket"]
    else:
        ran, bucket = bool(graph), None  # torch.compile's reduce-overhead mode captures its own graphs
    return {"trt_profile": described.get("last_profile"), "cuda_graph": ran, "graph_bucket": bucket}


def _record(name: str, precision: str, tome: str | None, mode: str, batch_size: int, described: dict[str, Any],
            timing: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """One flat row: configuration, timing, and the configuration's parity."""
    return {
        "backend": name,
        "precision": precision,
        "tome": tome,  # the token merging's label (r), None: unmerged
        "mode": mode,
        "batch_size": batch_size,
        "device": described.get("device"),
        "threads": described.get("threads"),
        "compiled": described.get("compiled", False),
        "inference_precision": described.get("inference_precision"),  # where the runtime has its own (openvino)
        "int8_layers": described.get("int8_layers"),
        **timing,
        "accuracy_pct": metrics["accuracy_pct"],
        "reference_accuracy_pct": metrics["reference_accuracy_pct"],
        "top1_agreement": metrics["top1_agreement"],
        "max_abs_logit_diff": metrics["max_abs_logit_diff"],
        "mean_abs_logit_diff": metrics["mean_abs_logit_diff"],
        "nan_inf_images": metrics["nan_inf_images"],
        "parity_passed": metrics["passed"],
    }
