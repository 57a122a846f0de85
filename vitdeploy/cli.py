"""The `vitdeploy` command line: thin Typer commands over the library.

A `VitDeployError` becomes one line on stderr and exit code 1 (`--debug` shows the
traceback); usage mistakes are Typer's exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vitdeploy import __version__, choices
from vitdeploy.backends import registry
from vitdeploy.errors import VitDeployError
from vitdeploy.files import check_output_dir, describe_os_error
from vitdeploy.train import recipes
from vitdeploy.train.config import TrainConfig

app = typer.Typer(
    name="vitdeploy",
    help="Fine-tune a Vision Transformer on CIFAR-10 and deploy it fast and verified.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Off a terminal (a pipe, a log file) rich would cut tables at 80 columns: there lines are as long as they need.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 1000)
_state = {"debug": False}


_TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _train_default(name: str) -> str:
    """TrainConfig's default of option `name`, as `train --help` shows it."""
    return str(_TRAIN_DEFAULTS[name])


def _choices(name: str, values: tuple[str, ...] | dict[str, str]) -> type[Enum]:
    """A choice option's Enum, made from the library's own list (`vitdeploy.choices`, the backend registry)."""
    return Enum(name, {v: v for v in values}, type=str)


def _metavar(values: tuple[str, ...]) -> str:
    return f"[{'|'.join(values)}]"


Device = _choices("Device", choices.DEVICES)
Precision = _choices("Precision", choices.TRAIN_PRECISIONS)
FP16Policy = _choices("FP16Policy", choices.FP16_POLICIES)
CalibMethod = _choices("CalibMethod", choices.CALIBRATION_METHODS)
InferencePrecision = _choices("InferencePrecision", ("auto", *choices.PRECISIONS))
Augment = _choices("Augment", choices.AUGMENTS)
Source = _choices("Source", (*choices.THROUGHPUT_SOURCES, "both"))
ModelSource = _choices("ModelSource", choices.MODEL_SOURCES)
Resize = _choices("Resize", choices.RESIZE_MODES)
DataPlacement = _choices("DataPlacement", choices.DATA_PLACEMENTS)
BACKEND_METAVAR = _metavar(registry.NAMES)
BACKEND_HELP = "; ".join(f"{b.name}: {b.summary}" for b in registry.BACKENDS)


def _version(value: bool) -> None:
    if value:
        print(f"vitdeploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", metavar="", help="Show the full traceback of errors.")] = False,
    version: Annotated[Optional[bool], typer.Option("--version", metavar="", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    _state["debug"] = debug


@app.command()
def info(as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print JSON instead of tables.")] = False) -> None:
    """Versions, CUDA devices, ONNX Runtime providers, and which backends can run here."""
    from vitdeploy.versions import cuda_devices, versions

    record = {
        "versions": versions(),
        "cuda_devices": cuda_devices(),
        "onnxruntime_providers": _ort_providers(),
        "backends": [{"name": b.name, "usable": b.usable, "reason": b.reason} for b in registry.statuses()],
    }
    if as_json:
        print(json.dumps(record, indent=2))
        return
    table = Table("package", "version", title="versions")
    for name, value in record["versions"].items():
        table.add_row(name, value or "not installed")
    console.print(table)
    devices = record["cuda_devices"]
    console.print("CUDA devices: " + (", ".join(f"{d['index']}: {d['name']} (sm {d['compute_capability']}, {d['memory_gib']} GiB)" for d in devices) or "none"))
    console.print("ONNX Runtime providers: " + (", ".join(record["onnxruntime_providers"]) or "none (onnxruntime not installed)"))
    table = Table("backend", "usable", "detail", title="backends")
    for b in record["backends"]:
        table.add_row(b["name"], "yes" if b["usable"] else "no", escape(b["reason"]))
    console.print(table)


def _ort_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print JSON instead of a table.")] = False,
    source: Annotated[ModelSource, typer.Option(help="registry: vitdeploy's own models; timm: timm's ViT names (timm:NAME); hf: the ViT/DeiT classifiers in the Hugging Face cache (hf:REPO).")] = ModelSource.registry,
    name_filter: Annotated[str, typer.Option("--filter", help="With --source timm: a name pattern, e.g. '*deit*'.")] = "*",
) -> None:
    """The model registry: parameters, input size, GFLOPs per image, weights, training recipe;
    or the names of timm's and Hugging Face's ViTs (--source), which every command takes too.

    GFLOPs count one forward pass of one image, a multiply-add being 2 FLOPs (matmuls and
    convolutions, as torch's FlopCounterMode counts them).
    """
    from vitdeploy.models import REGISTRY, model_cost
    from vitdeploy.train import TrainConfig

    if source is not ModelSource.registry:
        _other_models(source.value, name_filter, as_json)
        return

    rows = []
    for spec in REGISTRY.values():
        params, gflops = model_cost(spec.name)
        rows.append({
            "name": spec.name,
            "params_millions": round(params / 1e6, 2),
            "input_px": spec.input_size,
            "patch_px": spec.patch_size,
            "gflops_per_image": round(gflops, 2),
            "pretrained_weights": list(spec.pretrained),
            "default_recipe": spec.default_recipe,
            "recipes": {name: TrainConfig.from_options(spec.name, name).recipe_values() for name in choices.RECIPES},
            "description": spec.description,
        })
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("model", "params (M)", "input px", "GFLOPs/img", "pretrained weights", "default recipe",
                  title="models (GFLOPs: forward pass, 1 multiply-add = 2 FLOPs)")
    for r in rows:
        table.add_row(r["name"], f"{r['params_millions']:.1f}", str(r["input_px"]), f"{r['gflops_per_image']:.2f}",
                      ", ".join(r["pretrained_weights"]) or "none (from scratch)", r["default_recipe"])
    console.print(table)
    table = Table("model", "recipe", "epochs", "batch", "lr", "layer decay", "crops px", "augment", "erase", "mixup/cutmix", "EMA",
                  title="training recipes (--recipe auto: long for 10+ epochs, short below; every option overrides its value)")
    for r in rows:
        for name, rc in r["recipes"].items():
            mixing = "/".join(f"{rc[k + '_alpha']:g}" if rc[k] else "off" for k in ("mixup", "cutmix"))
            table.add_row(r["name"], name, str(rc["epochs"]), str(rc["batch_size"]), f"{rc['lr']:g}", f"{rc['layer_decay']:g}",
                          str(rc["crop_padding"]), rc["augment"], f"{rc['erase_prob']:g}", mixing, "yes" if rc["ema"] else "no")
    console.print(table)
    console.print("Any timm ViT (timm:NAME, `vitdeploy models --source timm`) and Hugging Face ViT/DeiT classifier "
                  "(hf:FOLDER_OR_REPO, `--source hf`) is a --model too, with the short fine-tuning recipe.")


def _other_models(source: str, pattern: str, as_json: bool) -> None:
    """`vitdeploy models --source timm|hf`: the names, and which have weights in the local cache."""
    import fnmatch

    from vitdeploy.sources import hub_cache

    if source == "timm":
        from vitdeploy.sources.timm_vit import model_names

        cached = [r.split("/", 1)[1] for r in hub_cache.cached_repos("timm")]
        rows = [{"name": f"timm:{n}", "cached": False} for n in model_names(pattern)]
        rows += [{"name": f"timm:{n}", "cached": True} for n in cached if fnmatch.fnmatch(n, pattern)]
        hint = (f"timm:NAME or timm:NAME.TAG; weights from {hub_cache.hub_dir()} (models--timm--NAME.TAG) or --weights FILE; "
                "nothing is downloaded")
    else:
        from vitdeploy.sources.hf_vit import is_classifier

        rows = [{"name": f"hf:{r}", "cached": True} for r in hub_cache.cached_repos() if is_classifier(r)]
        hint = f"hf:FOLDER (what save_pretrained writes) or hf:ORG/NAME cached in {hub_cache.hub_dir()}; nothing is downloaded"
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        console.print(escape(row["name"]) + ("  (weights cached)" if row["cached"] else ""))
    console.print(f"{len(rows)} names; {escape(hint)}")


@app.command()
def train(
    model: Annotated[Optional[str], typer.Option(help="Model name from `vitdeploy models`, or timm:NAME (timm's ViTs), or hf:FOLDER_OR_REPO (a transformers ViT/DeiT classifier).", show_default=_train_default("model"))] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="CIFAR-10 (the folder holding cifar-10-batches-py, or that folder itself) or an image folder: ROOT/train/CLASS/IMAGE, with ROOT/val and ROOT/test alike when present.", show_default=_train_default("data_dir"))] = None,
    store_size: Annotated[Optional[int], typer.Option(help="Image folders: decode every image once to this size in px (shorter side, centre square) into the cache; random crops of the model's input size come from it.", show_default="the model's input size + about 14% (256 for 224)")] = None,
    skip_bad_images: Annotated[Optional[bool], typer.Option("--skip-bad-images", metavar="", help="Image folders: leave out files that cannot be used (counted in the run) instead of stopping with their names.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Image folders: where the decode cache lives.", show_default="ROOT/.vitdeploy-cache")] = None,
    decode_workers: Annotated[Optional[int], typer.Option(help="Image folders: processes decoding images into the cache.", show_default="one per CPU, up to 8")] = None,
    data_placement: Annotated[Optional[DataPlacement], typer.Option(help="Image folders: memory holds every image on the device; stream reads batches from the memory-mapped cache through pinned buffers; auto: memory when they fit in half the free memory.", show_default=_train_default("data_placement"))] = None,
    data_memory_mb: Annotated[Optional[int], typer.Option(help="Image folders: the memory the images may take for --data-placement auto.", show_default="half the free memory of the device")] = None,
    download: Annotated[Optional[bool], typer.Option("--download", metavar="", help="Download CIFAR-10 into --data-dir with torchvision unless it is already there.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder for checkpoints and metrics.", show_default="runs/MODEL-TIME; with --resume, the checkpoint's run")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs.", show_default="the model's recipe")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Global batch size per optimizer step.", show_default="the model's recipe")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (AdamW).", show_default="the model's recipe")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay.", show_default=_train_default("weight_decay"))] = None,
    layer_decay: Annotated[Optional[float], typer.Option(help="Layer-wise LR decay, 1 = off.", show_default=f"{recipes.BY_FAMILY['finetune']['short']['layer_decay']} fine-tuning, {_train_default('layer_decay')} from scratch")] = None,
    label_smoothing: Annotated[Optional[float], typer.Option(help="Label smoothing.", show_default=_train_default("label_smoothing"))] = None,
    warmup_frac: Annotated[Optional[float], typer.Option(help="Fraction of steps for linear warm-up before cosine decay.", show_default=_train_default("warmup_frac"))] = None,
    grad_clip: Annotated[Optional[float], typer.Option(help="Gradient-norm clip, 0 = off.", show_default=_train_default("grad_clip"))] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="Micro-batches per optimizer step (batch size stays global).", show_default=_train_default("grad_accum"))] = None,
    recipe: Annotated[Optional[str], typer.Option(help="Training recipe: auto, short or long (see `vitdeploy models`); it sets every option below that you do not. auto: long for 10+ epochs, short below, the model's default without --epochs.", show_default="auto")] = None,
    crop_padding: Annotated[Optional[int], typer.Option(help="Random-crop augmentation: zero padding in px, 0 = no crops (flips stay on).", show_default="the recipe's")] = None,
    augment: Annotated[Optional[Augment], typer.Option(help="Per-sample augmentation policy: none or trivial (TrivialAugmentWide).", show_default="the recipe's")] = None,
    erase_prob: Annotated[Optional[float], typer.Option(help="Probability of random erasing per image, 0 = off.", show_default="the recipe's")] = None,
    mixup: Annotated[Optional[bool], typer.Option("--mixup/--no-mixup", metavar="", help="Mixup with a fixed partner per sample.", show_default="the recipe's")] = None,
    mixup_alpha: Annotated[Optional[float], typer.Option(help="Mixup weight ~ Beta(alpha, alpha).", show_default=_train_default("mixup_alpha"))] = None,
    cutmix: Annotated[Optional[bool], typer.Option("--cutmix/--no-cutmix", metavar="", help="Cutmix (half of the samples each when mixup is on too).", show_default="the recipe's")] = None,
    cutmix_alpha: Annotated[Optional[float], typer.Option(help="Cutmix area ~ Beta(alpha, alpha).", show_default=_train_default("cutmix_alpha"))] = None,
    ema: Annotated[Optional[bool], typer.Option("--ema/--no-ema", metavar="", help="Keep an EMA of the weights; it is evaluated, chooses best.pt and is exported.", show_default="the recipe's")] = None,
    ema_decay: Annotated[Optional[float], typer.Option(help="EMA decay per optimizer step, in (0, 1).", show_default="tied to the run's length, 1 - 10/steps")] = None,
    val_size: Annotated[Optional[int], typer.Option(help="Training images held out for choosing the best checkpoint (image folders: a stratified split, unless ROOT/val exists).", show_default="5,000 of CIFAR-10; a tenth of an image folder's train/, at most 5,000")] = None,
    test_size: Annotated[Optional[int], typer.Option(help="Test images reported on (the first N), 0 = no test pass.", show_default="the whole test set")] = None,
    test_each_epoch: Annotated[Optional[bool], typer.Option("--test-each-epoch", metavar="", help="Also report test accuracy after every epoch (a learning curve; never used to choose checkpoints).")] = None,
    subset: Annotated[Optional[int], typer.Option(help="Train on the first N training images only (quick runs).")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after N optimizer steps (quick runs).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for the split, data order, augmentation and init.", show_default=_train_default("seed"))] = None,
    device: Annotated[Optional[Device], typer.Option(help="Where to train.", show_default=_train_default("device"))] = None,
    precision: Annotated[Optional[Precision], typer.Option(help="auto: bf16 on GPUs with native bf16, fp16 on older GPUs, fp32 on CPU.", show_default=_train_default("precision"))] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile", metavar="", help="torch.compile the model.")] = None,
    pretrained: Annotated[Optional[bool], typer.Option("--pretrained/--no-pretrained", metavar="", help="Start from the model's published weights: torchvision's ImageNet weights (local torch hub cache, downloaded when online); timm's from the Hugging Face cache and hf: from its folder (never downloaded).", show_default="yes where the model has them")] = None,
    pretrained_weights: Annotated[Optional[str], typer.Option(help="Which ImageNet weights (see `vitdeploy models`).", show_default="the first listed")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="Start from a local state dict (safetensors or torch) or vitdeploy checkpoint.")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue a run exactly from a checkpoint file or run folder (its last.pt).")] = None,
    log_every: Annotated[Optional[int], typer.Option(help="Steps per metrics.jsonl record.", show_default=_train_default("log_every"))] = None,
    keep_checkpoints: Annotated[Optional[int], typer.Option(help="Per-epoch checkpoints kept, 0 = all.", show_default=_train_default("keep_checkpoints"))] = None,
    eval_batch_size: Annotated[Optional[int], typer.Option(help="Batch size for validation and test.", show_default="--batch-size")] = None,
    nproc_per_node: Annotated[Optional[int], typer.Option(help="Run data-parallel on N processes of this machine (re-launches itself through torchrun; --batch-size stays global).")] = None,
    tome: Annotated[Optional[str], typer.Option(metavar="R|R1,R2,...", help="Fine-tune with token merging (ToMe) on: R tokens merged per block, or one value per block; evaluation merges too, and export writes the merged graphs.", show_default="off")] = None,
) -> None:
    """Train or fine-tune a ViT on CIFAR-10 or an image folder (validation split for model selection, test set reported).

    Under `torchrun --nproc-per-node N -m vitdeploy train ...` it trains data-parallel
    (DistributedDataParallel: NCCL on GPUs, gloo on CPUs)."""
    options = {name: _plain(value) for name, value in locals().items() if name not in ("resume", "nproc_per_node")}
    from vitdeploy.train import run_training
    from vitdeploy.train.start import plan_start

    start = plan_start(options, resume)
    if nproc_per_node is not None:  # checked here, before any process starts
        start.config.check_ranks(nproc_per_node)
        _relaunch_with_torchrun(nproc_per_node)
    if start.note:
        console.print(start.note)
    result = run_training(start.config, resume=start.checkpoint, resume_dir=start.run_dir, console=console)
    if result.interrupted is not None:
        raise typer.Exit(128 + result.interrupted)


def _plain(value: Any) -> Any:
    """An option's value as the library takes it: choices as their names, paths as strings."""
    if isinstance(value, Enum):
        return value.value
    return str(value) if isinstance(value, Path) else value


def _relaunch_with_torchrun(nproc: int) -> None:
    """Run this same `vitdeploy train` command under torchrun on `nproc` local processes."""
    import os
    import subprocess

    if nproc < 1:
        raise VitDeployError("--nproc-per-node must be at least 1")
    if "WORLD_SIZE" in os.environ:
        raise VitDeployError("--nproc-per-node is for starting a job; under torchrun, leave it out")
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            args.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "vitdeploy", *args]
    console.print("launching: " + " ".join(command[1:]))
    raise typer.Exit(subprocess.call(command))


@app.command("bench-train")
def bench_train(
    model: Annotated[list[str], typer.Option(metavar="NAME", help="Model name from `vitdeploy models` (or timm:NAME, hf:FOLDER_OR_REPO); repeat for several.")] = ["vit_b_16"],  # noqa: B006 - Typer default
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size per step.", show_default="each model's recipe")] = None,
    steps: Annotated[int, typer.Option(help="Timed optimizer steps.")] = 20,
    warmup_steps: Annotated[int, typer.Option(help="Untimed steps first (allocation, autotuning, compilation).")] = 5,
    source: Annotated[Source, typer.Option(help="real: CIFAR-10 through the on-device pipeline; synthetic: ready model-input tensors; both: compare.")] = Source.both,
    data_dir: Annotated[Path, typer.Option(help="CIFAR-10 (the folder holding cifar-10-batches-py) or an image folder (ROOT/train/CLASS/IMAGE), for --source real/both.")] = Path("data"),
    device: Annotated[Device, typer.Option(help="Where to train.")] = Device.auto,
    precision: Annotated[Precision, typer.Option(help="Arithmetic, as for train.")] = Precision.auto,
    compile: Annotated[bool, typer.Option("--compile", metavar="", help="torch.compile the model.")] = False,
    recipe: Annotated[str, typer.Option(help="Whose augmentation the real data goes through (and default batch): auto (each model's default recipe), short or long.")] = "auto",
    store_size: Annotated[Optional[int], typer.Option(help="Image folders: the decode cache's size in px, as for train.", show_default="as for train")] = None,
    data_placement: Annotated[DataPlacement, typer.Option(help="Image folders: memory, stream (from the memory-mapped cache) or auto, as for train.")] = DataPlacement.auto,
    data_memory_mb: Annotated[Optional[int], typer.Option(help="Image folders: the memory the images may take for --data-placement auto.", show_default="half the free memory of the device")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Image folders: where the decode cache lives.", show_default="ROOT/.vitdeploy-cache")] = None,
    skip_bad_images: Annotated[bool, typer.Option("--skip-bad-images", metavar="", help="Image folders: leave out files that cannot be used, as for train.")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the records to this JSON file (rewritten after each measurement).")] = None,
) -> None:
    """Training throughput (images/s) with real data vs synthetic tensors: is the input pipeline the bottleneck?"""
    from vitdeploy.train.throughput import measure

    sources = list(choices.THROUGHPUT_SOURCES) if source is Source.both else [source.value]
    folder = {"store_size": store_size, "data_placement": data_placement.value, "data_memory_mb": data_memory_mb,
              "cache_dir": str(cache_dir) if cache_dir else None, "skip_bad_images": skip_bad_images}
    records = measure(model, batch_size, steps, warmup_steps, sources, data_dir, device.value, precision.value, compile, json_out,
                      recipe, folder)
    table = Table("model", "source", "precision", "batch", "images/s", "ms/step", title=f"training throughput on {records[0]['device']['name']}")
    for r in records:
        where = f" ({r['dataset']}, {r['placement']['placement']})" if "placement" in r else ""
        table.add_row(r["model"], r["source"] + where, r["precision"], str(r["batch_size"]), f"{r['train_images_per_s']:,.1f}",
                      f"{r['step_ms_mean']:.1f}")
    console.print(table)
    for r in records:
        if "real_over_synthetic" in r:
            console.print(f"{r['model']}: real / synthetic = {r['real_over_synthetic']:.3f} (1.0: the input pipeline costs nothing)")


@app.command()
def export(
    source: Annotated[Path, typer.Argument(metavar="SOURCE", help="A run folder (its best.pt), a checkpoint file, or a model to deploy as published: timm:NAME, hf:FOLDER_OR_REPO, or a registry name with --weights.")],
    out: Annotated[Optional[Path], typer.Option(help="Artifact folder to write (manifest.json and the models).", show_default="SOURCE/export for a run folder, export/ beside a checkpoint file; needed for a model name")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", metavar="", help="Also write a mixed-precision fp16 ONNX (and a TensorRT fp16 engine where TensorRT and a GPU exist).")] = False,
    trt: Annotated[Optional[bool], typer.Option("--trt/--no-trt", metavar="", help="Build a TensorRT engine (fails if TensorRT or a GPU is missing).", show_default="with --fp16, when possible")] = None,
    min_batch: Annotated[int, typer.Option(help="Smallest batch the artifacts accept.")] = 1,
    max_batch: Annotated[int, typer.Option(help="Largest batch the artifacts accept.")] = 256,
    fp16_policy: Annotated[FP16Policy, typer.Option(help="fp16 graph: " + "; ".join(f"{k}: {v}" for k, v in choices.FP16_POLICIES.items()) + ".")] = FP16Policy.matmul,
    int8: Annotated[bool, typer.Option("--int8", metavar="", help="Also write INT8 graphs: one for ort-cpu (form chosen by this CPU's instruction set) and one for TensorRT (symmetric Q/DQ), each gated on accuracy.")] = False,
    calib_images: Annotated[int, typer.Option(help="Training images (outside the validation split) that calibrate INT8.")] = 512,
    calib_method: Annotated[CalibMethod, typer.Option(help=f"INT8 calibration: ONNX Runtime's {' or '.join(choices.CALIBRATION_METHODS)} calibrator.")] = CalibMethod.minmax,
    int8_exclude: Annotated[Optional[list[str]], typer.Option(metavar="NODE", help="ONNX node name to keep float in INT8 (repeatable).", show_default="the classification head")] = None,
    int8_max_accuracy_drop: Annotated[float, typer.Option(help="Largest INT8 accuracy loss against PyTorch fp32, percentage points (for a model whose classes are not CIFAR-10's: the largest percentage of test images whose top-1 may change).")] = 1.0,
    trt_profile: Annotated[Optional[list[str]], typer.Option(metavar="MIN:OPT:MAX", help="TensorRT optimization profile MIN:OPT:MAX (batch sizes); repeat for several, the backend runs the narrowest that holds a batch.", show_default="1:1:1 and 2:min(32,max):max")] = None,
    preprocess: Annotated[bool, typer.Option("--preprocess/--no-preprocess", metavar="", help="Graph input: uint8 images with preprocessing inside (default), or float32 normalized images.")] = True,
    parity_images: Annotated[int, typer.Option(help="Test images for the parity checks (first N).", show_default="the full test set")] = 10_000,
    data_dir: Annotated[Optional[Path], typer.Option(help="CIFAR-10 (the folder holding cifar-10-batches-py) or an image folder: its test images (else val/) are the parity set, its training images calibrate INT8.", show_default="the run's")] = None,
    triton: Annotated[Optional[Path], typer.Option(help="Also lay out a Triton model repository here.")] = None,
    force: Annotated[bool, typer.Option("--force", metavar="", help="Replace the contents of a non-empty --out.")] = False,
    workspace_gb: Annotated[float, typer.Option(help="TensorRT builder workspace limit, GiB.")] = 4.0,
    timing_cache: Annotated[Optional[Path], typer.Option(help="TensorRT timing cache file, reused across builds.", show_default="~/.cache/vitdeploy/tensorrt-timing.cache")] = None,
    hardware_compatible: Annotated[bool, typer.Option("--hardware-compatible", metavar="", help="TensorRT engine that runs on any Ampere or newer GPU (slower).")] = False,
    version_compatible: Annotated[bool, typer.Option("--version-compatible", metavar="", help="TensorRT engine that later TensorRT versions can run.")] = False,
    weights: Annotated[Optional[Path], typer.Option(help="A model name as SOURCE: its weights (safetensors or a torch state dict of the model's own layout, head included).", show_default="timm: the Hugging Face cache; hf: the folder")] = None,
    class_names: Annotated[Optional[Path], typer.Option(help="A model name as SOURCE: its class names, one per line.", show_default="the model's own (id2label, label_names, ImageNet-1k)")] = None,
    resize: Annotated[Optional[Resize], typer.Option(help="The graph's resize mode instead of the model's (bicubic cannot become a TensorRT engine); the parity checks measure the difference.")] = None,
    tome: Annotated[Optional[list[str]], typer.Option(metavar="R|R1,R2,...|auto", help="Also write graphs that merge tokens (ToMe) beside the unmerged ones: R tokens per block or a schedule with one value per block (repeatable: one set of graphs each), or auto (the largest of a short list of r that passes the accuracy gate).")] = None,
    tome_max_accuracy_drop: Annotated[float, typer.Option(help="Largest accuracy loss of a merged graph against the unmerged PyTorch fp32 model, percentage points (fp16 and INT8 graphs may lose their own allowance on top).")] = 1.0,
) -> None:
    """Export a trained model, or one as published: verified ONNX (fp32, and fp16 with --fp16), TensorRT engine, manifest, Triton repository."""
    from vitdeploy import tome as tomes
    from vitdeploy.export.artifacts import ExportOptions, export_artifacts
    from vitdeploy.export.int8 import Int8Options

    mergings = tuple(tomes.parse(t) for t in tome or ())  # before anything else: a bad value is one line

    if out is None and not source.exists():
        raise VitDeployError(f"{source} is not a run folder or checkpoint here; to deploy it as a published model, "
                             "name the artifact folder with --out")
    if out is None:
        out = (source if source.is_dir() else source.parent) / "export"
        console.print(f"writing the export to {out} (--out chooses another folder)")
    options = ExportOptions(
        source=source, out=out, fp16=fp16, fp16_policy=fp16_policy.value, trt=trt,
        int8=int8, int8_options=Int8Options(calib_images, calib_method.value, tuple(int8_exclude or ())),
        int8_max_accuracy_drop=int8_max_accuracy_drop, min_batch=min_batch, max_batch=max_batch,
        trt_profiles=tuple(_profile(text) for text in trt_profile or ()),
        preprocess_in_graph=preprocess, parity_images=parity_images, data_dir=data_dir, triton=triton, force=force,
        workspace_gb=workspace_gb, timing_cache=timing_cache, hardware_compatible=hardware_compatible,
        version_compatible=version_compatible, weights=weights, class_names=class_names, resize=resize.value if resize else None,
        tome=mergings, tome_max_accuracy_drop=tome_max_accuracy_drop,
    )
    with _sigterm_unwinds():  # a stopped export removes its staging folder and scratch files
        export_artifacts(options, say=lambda line: console.print(escape(line)))
    console.print(f"wrote {out / 'manifest.json'}")


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM as an exit that runs every cleanup on its way out (exit code 143), instead of an instant death."""

    def handler(signum: int, _frame: object) -> None:
        print(f"error: stopped by signal {signum}; --out is as it was before this export", file=sys.stderr)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _served_tome(asked: Any) -> Any:
    """A --tome for bench, serve and predict: a number or schedule (auto is export's)."""
    if asked == "auto":
        raise VitDeployError("--tome auto chooses r at export; here name the r the graphs were exported with (see manifest.json)")
    return asked


def _profile(text: str) -> tuple[int, int, int]:
    parts = text.split(":")
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() for p in parts):
        raise VitDeployError(f"--trt-profile takes MIN:OPT:MAX batch sizes, e.g. 1:1:1 or 2:32:256; got {text!r}")
    lo, opt, hi = (int(p) for p in parts)
    return lo, opt, hi


def _csv(text: str, flag: str, cast: type = str) -> tuple:
    try:
        return tuple(cast(part.strip()) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise VitDeployError(f"{flag} takes a comma-separated list, e.g. {'1,8,32' if cast is int else 'a,b'}; got {text!r}") from exc


@app.command()
def bench(
    artifacts: Annotated[Path, typer.Argument(metavar="ARTIFACTS", help="Artifact folder written by `vitdeploy export`.")],
    backend: Annotated[str, typer.Option(metavar=f"[all|{','.join(registry.NAMES)}]", help=f"all (every backend that runs here), or a comma-separated list of: {BACKEND_HELP}.")] = "all",
    precision: Annotated[str, typer.Option(help="Comma-separated fp32, fp16, bf16, int8.", show_default="pytorch fp32 (+fp16, bf16 on a GPU), ort-cpu every exported precision, ort-cuda every exported fp32/fp16, ort-trt and trt every exported precision")] = "",
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes to time.", show_default="1,8,32,128, those within the exported range")] = "",
    mode: Annotated[str, typer.Option(metavar=_metavar((*choices.BENCH_MODES, "both")), help="end-to-end (host images in, host logits out), device (inputs already on the GPU; GPU backends only), or both.")] = "both",
    warmup: Annotated[int, typer.Option(help="Untimed iterations per configuration (at most a quarter of --max-seconds).")] = 3,
    min_iters: Annotated[int, typer.Option(help="Timed iterations per configuration, at least.")] = 20,
    min_seconds: Annotated[float, typer.Option(help="Timed seconds per configuration, at least.")] = 1.0,
    max_seconds: Annotated[float, typer.Option(help="Cap on the timed seconds per configuration (reported when it cuts a run short).")] = 20.0,
    limit: Annotated[Optional[int], typer.Option(help="Accuracy and parity on the first N test images.", show_default="all 10,000")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="CIFAR-10 (the folder holding cifar-10-batches-py) or an image folder, whose test images are measured.", show_default="the one the export used")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for ort-cpu (intra-op) and pytorch on the CPU.", show_default="each runtime's own")] = None,
    compile: Annotated[bool, typer.Option("--compile", metavar="", help="torch.compile the pytorch backend.")] = False,
    checkpoint: Annotated[Optional[Path], typer.Option(help="The training checkpoint, if it moved since the export (pytorch backend and reference).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Folder for bench.json, bench.csv, bench.png.", show_default="the artifact folder")] = None,
    max_abs_diff: Annotated[Optional[float], typer.Option(help="Largest allowed |logit - reference|.", show_default="1e-3 for fp32, not enforced for fp16/bf16")] = None,
    tie_margin: Annotated[Optional[float], typer.Option(help="Top-1 may differ from the reference only where its top-2 margin is below this.", show_default="2e-3 fp32, 0.5 fp16, 1.0 bf16")] = None,
    max_accuracy_drop: Annotated[Optional[float], typer.Option(help="Largest allowed accuracy loss, percentage points.", show_default="0 fp32, 0.1 fp16, 0.3 bf16")] = None,
    cuda_graph: Annotated[bool, typer.Option("--cuda-graph", metavar="", help=f"Replay CUDA graphs (one per timed batch size) on the GPU backends {', '.join(registry.GRAPH_BACKENDS)}; each graph is checked against the run without it first.")] = False,
    tome: Annotated[Optional[list[str]], typer.Option(metavar="R|R1,R2,...", help="Token merging to run (repeatable; 0: unmerged): the graphs exported with it, and pytorch merging the same way.", show_default="unmerged and every merging the export wrote")] = None,
) -> None:
    """Latency, throughput and accuracy parity of inference backends against the PyTorch fp32 reference."""
    from vitdeploy import tome as tomes
    from vitdeploy.bench.report import write_reports
    from vitdeploy.bench.run import BenchOptions, run_bench
    from vitdeploy.bench.timing import TimingPolicy

    modes = choices.BENCH_MODES if mode == "both" else (mode,)
    options = BenchOptions(
        artifacts=artifacts, backends=registry.parse_backends(backend), precisions=_csv(precision, "--precision"),
        batch_sizes=_csv(batch_sizes, "--batch-sizes", int), modes=modes,
        policy=TimingPolicy(warmup, min_iters, min_seconds, max_seconds), limit=limit, data_dir=data_dir,
        threads=threads, compile=compile, checkpoint=checkpoint, max_abs=max_abs_diff, margin=tie_margin,
        max_accuracy_drop=max_accuracy_drop, cuda_graph=cuda_graph,
        tome=tuple(tomes.label_of(_served_tome(tomes.parse(t))) or "0" for t in tome or ()),
    )
    folder = out or artifacts
    check_output_dir(folder, "--out" if out else "--out (default: the artifact folder)")  # before the long parity run
    report = run_bench(options, say=lambda line: console.print(escape(line)),
                       progress=lambda partial: write_reports(partial, folder, plot=False))
    paths = write_reports(report, folder)
    gpu = report["environment"]["gpu"]
    table = Table("backend", "precision", "r", "mode", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s", "x pytorch fp32",
                  "iters", "file", "MB", "load s", "peak RSS MB",
                  title=f"{report['model']} on {gpu['name'] if gpu else report['environment']['cpu']['name']}")
    for r in report["records"]:
        speedup = r["speedup_vs_pytorch_fp32"]
        table.add_row(r["backend"], r["precision"], r["tome"] or "-", r["mode"], str(r["batch_size"]), f"{r['latency_ms_p50']:.3f}",
                      f"{r['latency_ms_p90']:.3f}", f"{r['latency_ms_p99']:.3f}", f"{r['images_per_s']:,.1f}",
                      "-" if speedup is None else f"{speedup:.2f}x",
                      f"{r['iterations']}{'*' if r['capped_by_max_seconds'] else ''}", escape(str(r["artifact"])),
                      "-" if r["artifact_mb"] is None else f"{r['artifact_mb']:,.1f}", f"{r['load_s']:.2f}",
                      "-" if r["process_peak_rss_mib"] is None else f"{r['process_peak_rss_mib']:,.0f}")
    console.print(table)
    if any(r["capped_by_max_seconds"] for r in report["records"]):
        console.print("* stopped by --max-seconds before --min-iters/--min-seconds were met")
    table = Table("backend", "precision", "r", "accuracy %", "top-1 agreement %", "max |dlogit|", "mean |dlogit|", "NaN/Inf", "parity",
                  title=f"accuracy and parity vs PyTorch fp32 on {report['data']['images']} test images")
    for p in report["parity"]:
        table.add_row(p["backend"], p["precision"], p["tome"] or "-", "n/a" if p["accuracy_pct"] is None else f"{p['accuracy_pct']:.2f}", f"{100 * p['top1_agreement']:.2f}",
                      f"{p['max_abs_logit_diff']:.2e}", f"{p['mean_abs_logit_diff']:.2e}", str(p["nan_inf_images"]),
                      "pass" if p["passed"] else "FAIL: " + escape("; ".join(p["failures"])))
    console.print(table)
    for s in report["skipped"]:
        console.print(f"skipped {s['backend']}: {escape(s['reason'])}")
    console.print("wrote " + ", ".join(str(p) for p in paths))
    failed = [f"{p['backend']} {p['precision']}" + (f" r={p['tome']}" if p["tome"] else "") for p in report["parity"] if not p["passed"]]
    if failed:
        raise VitDeployError(f"outside parity tolerance: {', '.join(failed)} (details in {paths[0]})")


@app.command()
def predict(
    artifacts: Annotated[Path, typer.Argument(metavar="ARTIFACTS", help="Artifact folder written by `vitdeploy export`.")],
    images: Annotated[list[Path], typer.Argument(metavar="IMAGES", help="Image files (PNG, JPEG, WebP, ...), any size.")],
    backend: Annotated[str, typer.Option(metavar=BACKEND_METAVAR, help=f"Which runtime to use: {BACKEND_HELP}.")] = registry.DEFAULT,
    precision: Annotated[InferencePrecision, typer.Option(help="Which artifact: fp32, fp16 or int8 (auto: fp32).")] = InferencePrecision.auto,
    top_k: Annotated[Optional[int], typer.Option(help="How many classes to show per image.", show_default="5, or every class of a smaller model")] = None,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print JSON.")] = False,
    tome: Annotated[Optional[str], typer.Option(metavar="R|R1,R2,...", help="Token merging (ToMe): R tokens merged per block, or R1,R2,... one per block; 0: none. The graph exported with it (pytorch merges itself).")] = None,
) -> None:
    """Top-k classes for image files through any backend, fed exactly as the manifest says."""
    import numpy as np

    from vitdeploy import tome as tomes
    from vitdeploy.backends.base import run_batches
    from vitdeploy.backends.factory import model_input, open_backend
    from vitdeploy.images import Fit, load_image_file
    from vitdeploy.manifest import read_manifest
    from vitdeploy.predictions import default_top_k
    from vitdeploy.predictions import top_k as top_k_predictions
    from vitdeploy.preprocess import Preprocessing

    name = registry.parse_backends(backend, allow_all=False)[0]
    merging = _served_tome(tomes.parse(tome))
    manifest = read_manifest(artifacts)
    classes = manifest["model"]["class_names"]
    top_k = default_top_k(len(classes)) if top_k is None else top_k
    if not 1 <= top_k <= len(classes):
        raise VitDeployError(f"--top-k must be between 1 and {len(classes)}")
    fit = Fit.of(Preprocessing.from_dict(manifest["preprocessing"]))
    batch = np.stack([load_image_file(path, fit) for path in images])
    chosen = "fp32" if precision is InferencePrecision.auto else precision.value
    with open_backend(artifacts, manifest, name, chosen, tome=merging) as runner:
        start = time.perf_counter()
        logits = run_batches(runner, model_input(manifest, batch, name), manifest["batch"]["max"])
        seconds = time.perf_counter() - start
        model_file = runner.describe()["model"]
    ran = {"backend": name, "precision": chosen, "tome": tomes.label_of(merging), "model_file": model_file,
           "inference_ms_all_images": round(1000 * seconds, 3)}
    results = [{"image": str(path), **ran, "predictions": top_k_predictions(row, classes, top_k)}
               for path, row in zip(images, logits, strict=True)]
    if as_json:
        print(json.dumps(results, indent=2))
        return
    console.print(f"{name} {chosen} ({escape(str(model_file))}): {len(images)} image(s) in "
                  f"{1000 * seconds:.1f} ms (inference only; the first call includes warm-up)")
    for result in results:
        tops = ", ".join(f"{p['label']} {100 * p['probability']:.1f}%" for p in result["predictions"])
        console.print(f"{escape(result['image'])}: {tops}")


@app.command()
def explain(
    source: Annotated[Path, typer.Argument(metavar="SOURCE", help="Artifact folder written by `vitdeploy export`, a run folder or a checkpoint file.")],
    images: Annotated[list[Path], typer.Argument(metavar="IMAGES", help="Image files (PNG, JPEG, WebP, ...), any size.")],
    out: Annotated[Path, typer.Option(help="Folder for NAME.png (image | map | overlay) and NAME.json per image.")],
    method: Annotated[str, typer.Option(metavar=_metavar(choices.EXPLAIN_METHODS), help="rollout (attention rollout) or grad-rollout (gradient-weighted, for one class).")] = "rollout",
    head_fusion: Annotated[str, typer.Option(metavar=_metavar(choices.HEAD_FUSIONS), help="rollout: how heads combine, mean or max.")] = "mean",
    discard_ratio: Annotated[float, typer.Option(help="rollout: fraction of the weakest attention entries dropped per layer, in [0, 1).")] = 0.0,
    class_: Annotated[Optional[str], typer.Option("--class", help="Class to explain, by name or index.", show_default="each image's top-1")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Classes listed per image.", show_default="5, or every class of a smaller model")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="The training checkpoint of an artifact folder, if it moved since the export.")] = None,
) -> None:
    """Where the model looks: a heat map over the patch grid per image, from the PyTorch model of the checkpoint."""
    import re

    import numpy as np

    from vitdeploy.explain import (
        Tokens,
        check_options,
        class_index,
        explain_images,
        load_explained_model,
    )
    from vitdeploy.files import write_new_files
    from vitdeploy.images import Fit, load_image_file
    from vitdeploy.overlay import explanation_png
    from vitdeploy.predictions import default_top_k

    check_options(method, head_fusion, discard_ratio)
    check_output_dir(out, "--out")
    check_explain_out(out, images)
    loaded = load_explained_model(source, checkpoint)
    classes, path = loaded.class_names, loaded.path
    trained_tome = loaded.checkpoint["config"].get("tome")
    if trained_tome:  # attention maps need one token per patch: a merged model has none to show
        console.print(f"note: the run was fine-tuned with --tome {escape(str(trained_tome))}; the maps and classes here are "
                      "of the model without token merging (explain does not merge tokens)")
    top_k = default_top_k(len(classes)) if top_k is None else top_k
    if not 1 <= top_k <= len(classes):
        raise VitDeployError(f"--top-k must be between 1 and {len(classes)}")
    target = None if class_ is None else class_index(class_, classes)
    batch = np.stack([load_image_file(image, Fit.of(loaded.preprocessing)) for image in images])
    records, maps = explain_images(loaded.module, loaded.preprocessing, classes, batch, method, head_fusion, discard_ratio,
                                   target, top_k, say=lambda line: console.print(escape(line)), tokens=Tokens.of(loaded.spec))
    out.mkdir(parents=True, exist_ok=True)
    for image, pixels, record, heat in zip(images, batch, records, maps, strict=True):
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", image.stem)[:100] or "image"
        record = {"image": str(image), "checkpoint": str(path), **record}
        top1 = record["predictions"][0]
        other = "" if top1["label"] == record["class"]["label"] else f" (top-1: {top1['label']} {100 * top1['probability']:.1f}%)"
        title = f"{record['class']['label']} {100 * record['class']['probability']:.1f}%{other}  ({method})  {image.name}"
        # never over an existing file: the same name twice (from different folders, or an earlier run) keeps both
        name = write_new_files(out, stem, {".png": explanation_png(pixels, heat, title),
                                           ".json": (json.dumps(record, indent=2) + "\n").encode()})
        console.print(f"{escape(str(image))}: {record['class']['label']} {100 * record['class']['probability']:.1f}%{other} -> "
                      f"{out / (name + '.png')}, {out / (name + '.json')}")


@app.command()
def loadtest(
    url: Annotated[str, typer.Argument(metavar="URL", help="The server, e.g. http://127.0.0.1:8000 (`vitdeploy serve`).")],
    image: Annotated[Optional[list[Path]], typer.Option(metavar="FILE", help="An image file to send (repeat for several; they are cycled).", show_default="the first --limit CIFAR-10 test images as PNG")] = None,
    data_dir: Annotated[Path, typer.Option(help="CIFAR-10 (the folder holding cifar-10-batches-py) or an image folder, whose test images are sent when no --image is given.")] = Path("data"),
    limit: Annotated[int, typer.Option(help="How many test images to cycle through without --image.")] = 256,
    concurrency: Annotated[str, typer.Option(help="Comma-separated numbers of concurrent clients, one level each.")] = "1,4,16,64",
    requests: Annotated[int, typer.Option(help="Predictions sent at each level.")] = 200,
    timeout_s: Annotated[float, typer.Option(help="Per-request timeout, seconds.")] = 60.0,
    api_key: Annotated[Optional[str], typer.Option(envvar="VITDEPLOY_API_KEY", help="The server's API key, if it has one.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for loadtest.json, loadtest.csv, loadtest.png.")] = Path("loadtest"),
) -> None:
    """Throughput and latency of a running server at rising concurrency (like perf_analyzer), with a plot."""
    import io

    from PIL import Image

    from vitdeploy.bench.loadtest import LoadOptions, check_server, plot_png, run_level
    from vitdeploy.bench.report import records_csv
    from vitdeploy.datasets import is_image_folder
    from vitdeploy.files import atomic_write_bytes

    check_output_dir(out, "--out")
    levels = tuple(_count(text, "--concurrency") for text in concurrency.split(",") if text.strip())
    if image:
        bodies = tuple(path.read_bytes() for path in image if _is_file(path))
    elif is_image_folder(data_dir):  # the folder's own files, as clients would send them
        from vitdeploy.imagefolder.listing import scan

        listing = scan(data_dir)
        files = next(listing.splits[split] for split in ("test", "val", "train") if split in listing.splits)
        bodies = tuple((data_dir / f.path).read_bytes() for f in files[: max(1, limit)])
    else:
        from vitdeploy.data import load_test

        bodies = []
        for pixels in load_test(data_dir).images[: max(1, limit)].numpy():
            buffer = io.BytesIO()
            Image.fromarray(pixels.transpose(1, 2, 0)).save(buffer, format="PNG")
            bodies.append(buffer.getvalue())
        bodies = tuple(bodies)
    options = LoadOptions(url, bodies, levels, requests, timeout_s, api_key)
    options.validate()
    served = check_server(options)
    console.print(f"{escape(url)} serves {served['model']} on {served['backend'].get('name')} "
                  f"{served['backend'].get('precision')}; {requests} predictions per level, {len(bodies)} images cycled")
    records: list[dict] = []
    table = Table("clients", "requests/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "ok", "other statuses",
                  title=f"{served['model']} at {url}")
    for level in levels:
        record = run_level(options, level)
        records.append(record)
        others = ", ".join(f"{k}: {v}" for k, v in record["statuses"].items() if k != "200") or "-"
        console.print(f"{level} clients: {record['requests_per_s']:,.1f} requests/s, p50 {record['latency_ms_p50']} ms, "
                      f"p99 {record['latency_ms_p99']} ms, {record['ok']}/{record['requests']} ok")
        table.add_row(str(level), f"{record['requests_per_s']:,.1f}", *(str(record[f"latency_ms_{q}"]) for q in ("p50", "p90", "p99", "max")),
                      f"{record['ok']}/{record['requests']}", escape(others))
        report = {"url": url, "server": {k: served.get(k) for k in ("model", "backend", "serving")}, "levels": records}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "loadtest.json", (json.dumps(report, indent=2) + "\n").encode())
        atomic_write_bytes(out / "loadtest.csv", records_csv([{**r, "statuses": json.dumps(r["statuses"])} for r in records]).encode())
    atomic_write_bytes(out / "loadtest.png", plot_png(records, f"{served['model']}: {served['backend'].get('name')}"))
    console.print(table)
    console.print(f"wrote {out / 'loadtest.json'}, {out / 'loadtest.csv'}, {out / 'loadtest.png'}")


def _count(text: str, flag: str) -> int:
    if not text.strip().isdigit() or len(text.strip()) > 6:
        raise VitDeployError(f"{flag} takes comma-separated whole numbers, e.g. 1,4,16,64 (got {text.strip()[:20]!r})")
    return int(text.strip())


def _is_file(path: Path) -> bool:
    if not path.is_file():
        raise VitDeployError(f"--image {path} is not a file")
    return True


def check_explain_out(out: Path, images: list[Path]) -> None:
    """Refuse an --out that holds the images being explained or an artifact folder's files: explain adds
    files beside them, and a name clash there is one a user would not expect."""
    from vitdeploy.manifest import MANIFEST

    folder = out.resolve()
    if (folder / MANIFEST).exists():
        raise VitDeployError(f"--out {out} is an artifact folder ({MANIFEST} is there); choose another folder for the maps")
    inputs = [image for image in images if image.resolve().parent == folder]
    if inputs:
        raise VitDeployError(f"--out {out} holds the images being explained ({inputs[0]}); choose another folder")


@app.command()
def serve(
    artifacts: Annotated[Path, typer.Argument(metavar="ARTIFACTS", help="Artifact folder written by `vitdeploy export` (with --backend pytorch also a run folder or checkpoint).")],
    backend: Annotated[str, typer.Option(metavar=BACKEND_METAVAR, help=f"Which runtime serves: {BACKEND_HELP}.")] = registry.DEFAULT,
    precision: Annotated[InferencePrecision, typer.Option(help="Which artifact (ONNX/TensorRT) or arithmetic (pytorch): fp32, fp16, bf16, int8 (auto: fp32).")] = InferencePrecision.auto,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Most images per backend call (within the exported batch range).")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="Longest wait for a batch to fill after its first image.")] = 5.0,
    max_queue: Annotated[int, typer.Option(help="Most prediction requests in progress and images queued; beyond it requests get 503 with Retry-After.")] = 256,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body, MiB (413 beyond).")] = 8.0,
    max_images_per_request: Annotated[int, typer.Option(help="Most images in one /v1/predict/batch request.")] = 64,
    timeout_s: Annotated[float, typer.Option(help="Deadline for answering a request once it has arrived, seconds (504 beyond).")] = 30.0,
    read_timeout_s: Annotated[float, typer.Option(help="Deadline for a request to arrive whole, headers and body, seconds (408 and the connection closed beyond); pipelined requests included.")] = 10.0,
    write_timeout_s: Annotated[float, typer.Option(help="Deadline for a client that stopped reading to take its response, seconds (the connection is dropped beyond).")] = 10.0,
    max_connections: Annotated[int, typer.Option(help="Most open connections; beyond it new requests get 503. Memory for bodies being read is at most this x --max-body-mb.")] = 512,
    api_key: Annotated[Optional[str], typer.Option(envvar="VITDEPLOY_API_KEY", help="Require this key (Authorization: Bearer KEY or X-API-Key) on every endpoint but /healthz, /readyz and the upload page.")] = None,
    cors_origin: Annotated[Optional[list[str]], typer.Option(metavar="ORIGIN", help="Allow browser calls from this origin (repeat for several).", show_default="CORS off")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for ort-cpu and pytorch on the CPU.")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="The training checkpoint, if it moved since the export (pytorch backend).")] = None,
    cuda_graph: Annotated[bool, typer.Option("--cuda-graph", metavar="", help=f"Replay CUDA graphs on the GPU backends ({', '.join(registry.GRAPH_BACKENDS)}): buckets 1, 2, 4, ... up to --max-batch, each batch padded into its bucket.")] = False,
    explain_queue: Annotated[int, typer.Option(help="Most /v1/explain requests running or waiting (one runs at a time, on the server's own PyTorch copy of the model); beyond it 503. 0 turns explanations off.")] = 4,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    tome: Annotated[Optional[str], typer.Option(metavar="R|R1,R2,...", help="Token merging (ToMe): serve the graph exported with it (pytorch merges itself); /v1/explain is then off.")] = None,
) -> None:
    """Serve a model over HTTP with dynamic batching: /v1/predict, /v1/predict/batch, /v1/explain, /healthz, /readyz, /v1/model, /metrics, an upload page at /, and the Open Inference Protocol (KServe v2, Triton's HTTP API) under /v2 for tritonclient and KServe clients."""
    from vitdeploy import tome as tomes
    from vitdeploy.serve.config import ServeConfig, body_bytes

    name = registry.parse_backends(backend, allow_all=False)[0]
    registry.check_cuda_graph(name, cuda_graph)  # a mistake in the options is named before a missing extra
    merging = _served_tome(tomes.parse(tome))
    max_body_bytes = body_bytes(max_body_mb)
    try:
        import uvicorn

        from vitdeploy.serve.app import create_app
        from vitdeploy.serve.protocol import listening_socket, protocol_with_deadlines
    except ImportError as exc:
        raise VitDeployError(f"serving needs the serve extra ({exc.name} is missing): pip install 'vitdeploy[serve]'") from exc
    sock = listening_socket(host, port)  # a port in use is refused before the model loads

    config = ServeConfig(
        artifacts=artifacts, backend=name, precision="fp32" if precision is InferencePrecision.auto else precision.value,
        host=host, port=port, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
        max_body_bytes=max_body_bytes, max_images_per_request=max_images_per_request, timeout_s=timeout_s,
        read_timeout_s=read_timeout_s, write_timeout_s=write_timeout_s, max_connections=max_connections,
        api_key=api_key, cors_origins=tuple(cors_origin or ()), threads=threads,
        checkpoint=checkpoint, cuda_graph=cuda_graph, explain_queue=explain_queue, tome=merging,
    )
    application = create_app(config)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        console.print(f"warning: serving on {host} without --api-key: anyone who can reach it can use it")
    merged = f" merging tokens r={tomes.label_of(merging)}" if merging is not None else ""
    console.print(f"serving {artifacts} with {config.backend} {config.precision}{merged} on http://{host}:{port}/ (SIGTERM or Ctrl-C drains and stops)")
    # uvicorn drains on SIGTERM, then re-raises the signal under the handler it found: a no-op one makes
    # a drained shutdown exit 0, as process managers expect.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server = uvicorn.Server(uvicorn.Config(
        application, log_level=log_level, http=protocol_with_deadlines(config.read_timeout_s, config.write_timeout_s),
        limit_concurrency=config.max_connections, timeout_graceful_shutdown=config.shutdown_timeout_s))
    server.run(sockets=[sock])


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point: domain errors become one line and exit code 1. `--debug` may
    stand anywhere on the command line, not only before the command's name."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv[1:]:
        argv = ["--debug", *(a for a in argv if a != "--debug")]
    try:
        app(args=argv, prog_name="vitdeploy")
    except (VitDeployError, OSError) as exc:
        # OSError: a full disk, a read-only or vanished folder, met while writing results
        if _state["debug"]:
            traceback.print_exc()
        print(f"error: {exc if isinstance(exc, VitDeployError) else describe_os_error(exc)}", file=sys.stderr)
        sys.exit(1)
