"""Fine-tuning / training: train_one_epoch, evaluate and `run_training`, with exact resume.

Data order and augmentation are functions of (seed, epoch, sample index), the schedule
counts optimizer steps, and every checkpoint records the position inside the epoch, so
a run stopped by SIGINT/SIGTERM and resumed logs the same losses as one that never
stopped.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from vitdeploy import __version__, tome
from vitdeploy.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    atomic_link,
    atomic_save,
)
from vitdeploy.errors import VitDeployError
from vitdeploy.files import atomic_write_text
from vitdeploy.models import (
    build_model,
    get_spec,
    load_exact_state,
    load_model,
    load_pretrained,
    load_weights_file,
    spec_of_checkpoint,
)
from vitdeploy.preprocess import Preprocessing
from vitdeploy.progress import Ticker, eta
from vitdeploy.train import distributed
from vitdeploy.train.config import TrainConfig
from vitdeploy.train.datasource import load_run_data
from vitdeploy.train.distributed import DistContext
from vitdeploy.train.ema import WeightEMA, default_decay
from vitdeploy.train.precision import choose_precision
from vitdeploy.train.run_folder import (
    carry_metrics,
    check_out_dir,
    checkpoint_step,
    clean_temporary_files,
    make_out_dir,
    unfinished_run,
)
from vitdeploy.train.sampling import epoch_permutation
from vitdeploy.train.schedule import WarmupCosine, build_optimizer
from vitdeploy.train.signals import StopRequest
from vitdeploy.train.step import (
    DeviceData,
    EvaluationStopped,
    StepContext,
    evaluate,
    resolve_device,
    train_step,
)
from vitdeploy.versions import device_record, versions

IMAGES_PER_S_DEFINITION = "training images processed / training-loop wall time (evaluation and checkpointing excluded)"


@dataclass
class RunPosition:
    """Where the run stands; saved in every checkpoint so that resuming continues exactly."""

    epoch: int = 0  # the epoch being trained (0-based)
    batch: int = 0  # the next batch inside that epoch
    step: int = 0  # optimizer steps done
    best_val_acc: float = -1.0
    best_epoch: int = 0  # 1-based epoch the best checkpoint was written in (0: none yet)
    best_step: int = 0
    evaluated_step: int = -1  # the step validation last ran at: a stop during it leaves it behind `step`
    train_images: int = 0
    train_seconds: float = 0.0
    epoch_loss: list[float] = field(default_factory=lambda: [0.0, 0])  # sum, count
    window_loss: list[float] = field(default_factory=lambda: [0.0, 0])  # sum, count since the last log record


@dataclass
class TrainResult:
    """How the run ended; `interrupted` names the signal when it stopped early."""

    out: Path
    summary: dict[str, Any] | None
    interrupted: int | None = None
    checkpoint: Path | None = None


class _Run:
    """The state of one training process: model, optimizer, data, files."""

    def __init__(self, config: TrainConfig, console: Console, resume: dict[str, Any] | None, dist: DistContext,
                 stop: StopRequest) -> None:
        self.stop = stop
        self.started = time.perf_counter()
        self.config = config
        self.console = console
        self.ticker = Ticker()  # progress lines when not on a terminal
        self.dist = dist
        # resumed: the model the run was started with, even where the model's folder or the hub cache is gone
        self.spec = get_spec(config.model) if resume is None else spec_of_checkpoint(resume, "the checkpoint to resume")
        self.out = Path(config.out)
        self.device = resolve_device(config.device)
        if dist.active and self.device.type == "cuda":
            self.device = torch.device("cuda", dist.local_rank)
        config.check_ranks(dist.world_size)
        self.local_batch = config.batch_size // dist.world_size
        self.precision = choose_precision(self.device, config.precision)
        self._init_data()
        if resume is not None:
            self._note_changed_data(resume.get("dataset"))
        torch.manual_seed(config.seed)
        self.model = build_model(self.spec, len(self.class_names))
        if resume is None:
            self._load_initial_weights()
        else:
            load_exact_state(self.model, resume["model"], self.spec, "the checkpoint to resume")
        merging = config.merging(self.spec)
        if merging is not None:  # trained and evaluated merging tokens; the weights stay those of the plain model
            tome.apply(self.model, merging)
            self.console.print(f"fine-tuning with {tome.describe(merging)}")
        self.model.to(self.device)
        wrapped = self.model
        if dist.active:
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.forward_model = torch.compile(wrapped) if config.compile else wrapped
        self.optimizer = build_optimizer(
            self.model, config.lr, config.weight_decay, config.layer_decay, self.spec, fused=self.device.type == "cuda"
        )
        self.schedule = WarmupCosine(self.optimizer, config.lr, self.total_steps, round(config.warmup_frac * self.total_steps))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.ema = self._ema(resume)
        self.progress = self._restore(resume)
        self.step_ctx = StepContext(
            self.forward_model, self.optimizer, self.scaler, self.device, self.precision,
            config.grad_accum, config.grad_clip, config.label_smoothing, ddp=dist.active,
        )

    def _init_data(self) -> None:
        """The splits on the device (training with its augmenter), the step counts, the class names."""
        config = self.config
        data = load_run_data(config, self.spec, self.device, self.dist, self.console.print, self._decode_progress)
        self.preprocessing: Preprocessing = data.preprocessing
        self.class_names = data.class_names
        self.dataset = data.record
        self.train_data, self.val_data, self.test_data = data.train, data.val, data.test
        self.steps_per_epoch = len(self.train_data) // config.batch_size
        if self.steps_per_epoch == 0:
            raise VitDeployError(
                f"the training set has {len(self.train_data)} images, fewer than one batch of {config.batch_size}; "
                "lower --batch-size or raise --subset"
            )
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.eval_batch_size = config.eval_batch_size or config.batch_size

    def _note_changed_data(self, before: Any) -> None:
        """A resumed image-folder run whose files changed since the checkpoint continues on the new ones, and says so."""
        key = before.get("cache_key") if isinstance(before, dict) else None
        if key is not None and key != self.dataset.get("cache_key"):
            self.console.print(f"the images of {self.config.data_dir} changed since the checkpoint (cache {key} -> "
                               f"{self.dataset.get('cache_key')}): the run continues on them, so it no longer repeats "
                               "the batches an uninterrupted run would have seen")

    def _decode_progress(self, done: int, total: int) -> None:
        """Decoding an image folder: a line now and then off a terminal (the bar is rich's on one)."""
        if done == total or self.ticker.due():
            self.console.print(f"decoded {done:,}/{total:,} images")

    def _ema(self, resume: dict[str, Any] | None) -> WeightEMA | None:
        """The EMA of the weights when the run keeps one (the decay it started with, when resumed)."""
        config = self.config
        if not config.ema:
            return None
        decay = config.ema_decay or default_decay(self.total_steps)
        if resume is not None and isinstance(resume.get("ema"), dict) and isinstance(resume["ema"].get("decay"), float):
            decay = resume["ema"]["decay"]  # the decay the run started with, also when --epochs grows
        ema = WeightEMA(self.model, decay)
        if resume is not None:
            ema.load_state_dict(resume.get("ema"), self.spec, "the checkpoint to resume")
        return ema

    def _restore(self, resume: dict[str, Any] | None) -> RunPosition:
        """Optimizer, schedule, scaler and RNG states from the checkpoint; the position it reached."""
        if resume is None:
            return RunPosition()
        try:
            self.optimizer.load_state_dict(resume["optimizer"])
            self.schedule.load_state_dict(resume["scheduler"])
            self.scaler.load_state_dict(resume["scaler"])
            torch.set_rng_state(resume["rng"]["torch"])
            if self.device.type == "cuda" and resume["rng"].get("cuda"):
                torch.cuda.set_rng_state_all(resume["rng"]["cuda"])
            return RunPosition(**resume["progress"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise VitDeployError(f"the checkpoint to resume is damaged ({type(exc).__name__}: {str(exc)[:200]}); "
                                 "resume from another checkpoint of the run (checkpoints/epoch-*.pt)") from None

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights evaluated, selected and shipped: the EMA when the run keeps one."""
        return self.ema.module if self.ema is not None else self.model

    def _load_initial_weights(self) -> None:
        if self.config.weights:
            report = load_weights_file(self.model, self.spec, Path(self.config.weights))
        elif self.config.pretrained:
            report = load_pretrained(self.model, self.spec, self.config.pretrained_weights)
        else:
            self.console.print(f"{self.spec.name}: random initialization (training from scratch)")
            return
        self.console.print(report.describe())

    # -- files --------------------------------------------------------------------------

    def checkpoint_dict(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "vitdeploy_version": __version__,
            "model_name": self.spec.name,
            **({} if self.spec.source == "torchvision" else {"model_source": self.spec.to_record()}),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": dict(self.progress.__dict__),
            "epoch": self.progress.epoch,
            "step": self.progress.step,
            "rng": rng,
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            "config": self.config.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "class_names": list(self.class_names),
            "dataset": self.dataset,
            "precision": self.precision,
        }

    def save_checkpoint(self, is_best: bool = False) -> Path:
        """At an epoch boundary checkpoints/epoch-NNNN.pt (older ones pruned), otherwise a
        mid-epoch position; last.pt always names the newest, best.pt the best on validation.
        Rank 0 writes; every rank returns the path once the file is complete."""
        path = self._write_checkpoint(is_best) if self.dist.is_main else self._checkpoint_path()
        distributed.barrier(self.dist)
        return path

    def _checkpoint_path(self) -> Path:
        prog = self.progress
        if prog.batch == 0 and prog.epoch > 0:
            return self.out / "checkpoints" / f"epoch-{prog.epoch:04d}.pt"
        return self.out / "last.pt"

    def _write_checkpoint(self, is_best: bool) -> Path:
        prog = self.progress
        if prog.batch == 0 and prog.epoch > 0:
            folder = self.out / "checkpoints"
            folder.mkdir(exist_ok=True)
            path = self._checkpoint_path()
            atomic_save(self.checkpoint_dict(), path)
            atomic_link(path, self.out / "last.pt")
            if self.config.keep_checkpoints:
                for old in sorted(folder.glob("epoch-*.pt"))[: -self.config.keep_checkpoints]:
                    old.unlink()
        else:
            path = self.out / "last.pt"
            atomic_save(self.checkpoint_dict(), path)
        if is_best:
            atomic_link(path, self.out / "best.pt")
        return path

    def log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    # -- training -----------------------------------------------------------------------

    def _log_window(self, epoch: int, window_images: int, window_seconds: float) -> dict[str, Any]:
        loss_sum, count = self.progress.window_loss
        record = {
            "type": "step",
            "epoch": epoch + 1,
            "step": self.progress.step,
            "loss": loss_sum / count,
            "lr": self.schedule.lr,
            "train_images_per_s": window_images / window_seconds if window_seconds > 0 else None,
        }
        self.log(record)
        self.progress.window_loss = [0.0, 0]
        return record

    def _progress_line(self, record: dict[str, Any]) -> None:
        """Off a terminal (nohup, a log file, CI) the live bar is off: a line at most every
        `progress.LINE_S` seconds instead, with position, loss, rate and time left."""
        if self.console.is_terminal or not self.ticker.due():
            return
        prog = self.progress
        rate = prog.train_images / prog.train_seconds if prog.train_seconds else 0.0
        left = (self.total_steps - prog.step) * self.config.batch_size / rate if rate else None
        self.console.print(f"step {prog.step}/{self.total_steps} ({100 * prog.step / self.total_steps:.0f}%)  "
                           f"epoch {record['epoch']}  loss {record['loss']:.4f}  {rate:,.0f} img/s  "
                           f"training left ~{eta(left)} (evaluations not included)")

    def train_one_epoch(self, epoch: int, stop: StopRequest, bar: Progress, task: Any) -> bool:
        """Train from the saved position to the end of `epoch` (or --max-steps); False if stopped."""
        cfg, prog = self.config, self.progress
        order = epoch_permutation(cfg.seed, epoch, len(self.train_data))
        pending: list[torch.Tensor] = []
        window = {"images": 0, "seconds": 0.0, "start": time.perf_counter()}

        def flush() -> None:
            """Bring pending losses to the host (the one sync per logging window) and count time."""
            elapsed = time.perf_counter() - window["start"]
            stacked = torch.stack(pending) if pending else torch.zeros(0, device=self.device)
            losses = (distributed.all_sum(self.dist, stacked) / self.dist.world_size).tolist()  # global batch means
            pending.clear()
            prog.train_seconds += elapsed
            window["seconds"] += elapsed
            for value in losses:
                if not math.isfinite(value):
                    raise VitDeployError(f"the training loss became {value} near step {prog.step}; lower --lr or use --precision fp32")
                prog.window_loss = [prog.window_loss[0] + value, prog.window_loss[1] + 1]
                prog.epoch_loss = [prog.epoch_loss[0] + value, prog.epoch_loss[1] + 1]
            window["start"] = time.perf_counter()

        def mine(batch: int) -> torch.Tensor:
            """This rank's share of the epoch's `batch`-th global batch."""
            indices = order[batch * cfg.batch_size: (batch + 1) * cfg.batch_size]
            return indices[self.dist.rank * self.local_batch: (self.dist.rank + 1) * self.local_batch]

        last = min(self.steps_per_epoch, prog.batch + self.total_steps - prog.step)
        stopped = False
        with closing(self.train_data.batches((mine(b) for b in range(prog.batch, last)), epoch)) as batches:
            while prog.batch < self.steps_per_epoch and prog.step < self.total_steps:
                signum = distributed.agree_signal(self.dist, stop.signum)  # every rank stops at the same step
                if signum:
                    stop.set(signum)
                    stopped = True
                    break
                inputs, targets = next(batches)
                pending.append(train_step(self.step_ctx, inputs, targets))
                if self.ema is not None:
                    self.ema.update(self.model)
                self.schedule.step()
                prog.batch += 1
                prog.step += 1
                prog.train_images += cfg.batch_size
                window["images"] += cfg.batch_size
                if prog.step % cfg.log_every == 0 or prog.batch == self.steps_per_epoch or prog.step == self.total_steps:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    flush()
                    record = self._log_window(epoch, window["images"], window["seconds"])
                    bar.update(task, completed=prog.step, loss=record["loss"], lr=record["lr"],
                               ips=record["train_images_per_s"] or 0.0)
                    self._progress_line(record)
                    window["images"], window["seconds"] = 0, 0.0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        flush()
        return not stopped

    def evaluate(self, model: torch.nn.Module, data: DeviceData) -> dict[str, float]:
        """`evaluate` with this run's batch size, precision and ranks, stopped by a signal."""
        return evaluate(model, data, self.eval_batch_size, self.precision, self.dist, self.stop)

    def evaluate_and_checkpoint(self, epoch: int) -> dict[str, Any]:
        """Validation, the epoch record and a checkpoint; at an epoch's end the position moves to the next epoch."""
        prog = self.progress
        val = self.evaluate(self.eval_model, self.val_data)
        prog.evaluated_step = prog.step
        if not math.isfinite(val["loss"]):  # diverged: the previous checkpoints stay as they are
            raise VitDeployError(f"the validation loss became {val['loss']} at step {prog.step}: the weights diverged; "
                                 f"the last good checkpoint in {self.out} is kept; lower --lr or use --precision fp32")
        complete = prog.batch == self.steps_per_epoch
        is_best = val["acc"] > prog.best_val_acc
        if is_best:
            prog.best_val_acc, prog.best_epoch, prog.best_step = val["acc"], epoch + 1, prog.step
        record = {
            "type": "epoch",
            "epoch": epoch + 1,
            "step": prog.step,
            "complete": complete,
            "train_loss": prog.epoch_loss[0] / max(1, prog.epoch_loss[1]),
            "val_acc": val["acc"],
            "val_loss": val["loss"],
            "train_images_per_s": prog.train_images / prog.train_seconds if prog.train_seconds else None,
            "train_seconds": prog.train_seconds,
            "wall_seconds_this_process": time.perf_counter() - self.started,
        }
        if self.config.test_each_epoch and self.test_data is not None:  # reported, never used to choose
            record["test_acc"] = self.evaluate(self.eval_model, self.test_data)["acc"]
        self.log(record)
        if complete:
            prog.epoch, prog.batch, prog.epoch_loss = epoch + 1, 0, [0.0, 0]
        self.save_checkpoint(is_best)
        return record

    def final_report(self, wall_seconds: float) -> dict[str, Any]:
        """summary.json: test accuracy of the final and the best weights (null with --test-size 0),
        and how many images each number was measured on."""
        prog = self.progress
        final = best = raw = None
        if self.test_data is not None:
            final = self.evaluate(self.eval_model, self.test_data)
            best = final
            if prog.best_step != prog.step and (self.out / "best.pt").is_file():
                best = self.evaluate(load_model(self.out / "best.pt").module.to(self.device), self.test_data)
            if self.ema is not None:
                raw = self.evaluate(self.model, self.test_data)
            self.log({"type": "test", "step": prog.step, "final_test_acc": final["acc"], "best_test_acc": best["acc"]})
        summary = {
            "model": self.spec.name,
            "recipe": self.config.recipe,
            "weights": "ema" if self.ema is not None else "model",
            "ema_decay": self.ema.decay if self.ema is not None else None,
            "epochs_completed": prog.epoch,
            "ended_in_epoch": prog.epoch + (1 if prog.batch else 0) if prog.step else 0,
            "steps": prog.step,
            "best_epoch": prog.best_epoch,
            "best_step": prog.best_step,
            "best_val_acc": prog.best_val_acc,
            "val_images": len(self.val_data),
            "best_test_acc": best["acc"] if best else None,
            "final_test_acc": final["acc"] if final else None,
            "final_test_acc_without_ema": raw["acc"] if raw else None,
            "test_images": final["images"] if final else 0,
            "train_images": prog.train_images,
            "train_loop_seconds": prog.train_seconds,
            "train_images_per_s": prog.train_images / prog.train_seconds if prog.train_seconds else None,
            "train_images_per_s_definition": IMAGES_PER_S_DEFINITION,
            "wall_seconds_this_process": wall_seconds,
            "precision": self.precision,
            "batch_size": self.config.batch_size,
            "world_size": self.dist.world_size,
            "replica_parameter_sums": distributed.replica_checksums(self.dist, self.model),
            "device": device_record(self.device),
            "versions": versions(),
            "config": self.config.to_dict(),
            "dataset": self.dataset,
        }
        if self.dist.is_main:
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary

    def reconcile_best(self, resume_dir: Path) -> None:
        """Make best.pt hold the checkpoint the resumed position calls best.

        Resuming from an older checkpoint, or into another folder, can leave a best.pt from
        a later (abandoned) stretch of the run, or none. The checkpoint written when the
        recorded best was reached is looked up by its step; if it no longer exists, the
        choice of the best checkpoint starts over from here, and the run says so."""
        prog = self.progress
        best = self.out / "best.pt"
        if prog.best_step and checkpoint_step(best) == prog.best_step:
            return
        candidates = [resume_dir / "best.pt", resume_dir / "last.pt", *sorted((resume_dir / "checkpoints").glob("epoch-*.pt")),
                      *sorted((self.out / "checkpoints").glob("epoch-*.pt"))]
        match = next((c for c in candidates if prog.best_step and checkpoint_step(c) == prog.best_step), None)
        if match is not None:
            atomic_link(match, best)
            return
        if best.is_file() or prog.best_step:
            self.console.print(f"the checkpoint of the best epoch so far ({prog.best_epoch}) is gone: "
                               "the best checkpoint is chosen again from the epochs still to come")
        best.unlink(missing_ok=True)
        prog.best_val_acc, prog.best_epoch, prog.best_step = -1.0, 0, 0


def run_training(
    config: TrainConfig,
    resume: dict[str, Any] | None = None,
    resume_dir: Path | None = None,
    console: Console | None = None,
    stop: StopRequest | None = None,
) -> TrainResult:
    """Train per `config` (from `resume`, a loaded checkpoint, if given) until done or stopped.

    Under torchrun (WORLD_SIZE > 1) this is one rank of a data-parallel job: only rank 0
    prints, logs and writes files."""
    stop = StopRequest() if stop is None else stop
    dist = distributed.setup(resolve_device(config.device).type)
    try:
        console = Console(soft_wrap=True) if console is None else console
        if not dist.is_main:
            console = Console(quiet=True)
        return _train(config, resume, resume_dir, console, stop, dist)
    finally:
        distributed.teardown(dist)


def _stopped(run: _Run, stop: StopRequest, console: Console, where: str) -> TrainResult:
    """Save a resumable checkpoint after a stop signal and say how to continue."""
    path = run.save_checkpoint()
    console.print(f"stopped by signal {stop.signum} at step {run.progress.step}{where}; resumable checkpoint {path} "
                  f"(continue with: vitdeploy train --resume {path})")
    return TrainResult(run.out, None, interrupted=stop.signum, checkpoint=path)


def _train(config: TrainConfig, resume: dict[str, Any] | None, resume_dir: Path | None, console: Console,
           stop: StopRequest, dist: DistContext) -> TrainResult:
    wall_start = time.perf_counter()
    out = Path(config.out)
    check_out_dir(out, resuming=resume is not None)
    restart = resume is None and unfinished_run(out)
    run = _Run(config, console, resume, dist, stop)
    if dist.is_main:
        make_out_dir(out)
        clean_temporary_files(out)
        if restart:
            console.print(f"{out} holds a run stopped before its first checkpoint: starting it over")
            (out / "metrics.jsonl").unlink(missing_ok=True)
        if resume is not None:
            carry_metrics(resume_dir or out, out, run.progress.step)
            run.reconcile_best(resume_dir or out)
        atomic_write_text(out / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    distributed.barrier(dist)
    prog = run.progress
    ranks = f" x {dist.world_size} ranks ({config.batch_size // dist.world_size} per rank)" if dist.active else ""
    console.print(
        f"training {run.spec.name} on {run.device} ({run.precision}): {len(run.train_data)} train / "
        f"{len(run.val_data)} val / {len(run.test_data) if run.test_data else 0} test images, {run.total_steps} steps of "
        f"{config.batch_size}{ranks}, recipe {config.recipe}{', EMA' if run.ema else ''}; output in {out}"
    )
    columns = [
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[ips]:,.0f} img/s"),
        TimeRemainingColumn(),
    ]
    with stop.on_signals(), Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task("train", total=run.total_steps, completed=prog.step, loss=float("nan"), lr=run.schedule.lr, ips=0.0)
        while (prog.epoch < config.epochs and prog.step < run.total_steps) or prog.evaluated_step < prog.step:
            epoch = prog.epoch
            try:
                if not run.train_one_epoch(epoch, stop, bar, task):
                    return _stopped(run, stop, console, "")
                record = run.evaluate_and_checkpoint(epoch)
            except EvaluationStopped:  # the checkpoint resumes into this evaluation
                return _stopped(run, stop, console, " during evaluation")
            console.print(
                f"epoch {epoch + 1}/{config.epochs}{'' if record['complete'] else ' (partial, --max-steps)'}  "
                f"train_loss {record['train_loss']:.4f}  val_acc {100 * record['val_acc']:.2f}%  "
                f"val_loss {record['val_loss']:.4f}  {record['train_images_per_s'] or 0:,.0f} img/s"
            )
    try:
        summary = run.final_report(time.perf_counter() - wall_start)
    except EvaluationStopped:  # every epoch is done: a resume goes straight to the test evaluation
        return _stopped(run, stop, console, " during the test evaluation")
    tested = (f"test_acc final {100 * summary['final_test_acc']:.2f}% / of best.pt (chosen on validation) "
              f"{100 * summary['best_test_acc']:.2f}% "
              f"on {summary['test_images']} images" if summary["test_images"] else "no test pass (--test-size 0)")
    console.print(
        f"done: best val_acc {100 * summary['best_val_acc']:.2f}% (epoch {summary['best_epoch']}) on {summary['val_images']} images, "
        f"{tested}, {summary['train_images_per_s'] or 0:,.0f} train img/s; {out / 'summary.json'}"
    )
    return TrainResult(out, summary, checkpoint=out / "last.pt")
