"""One training step and one evaluation pass, on data already on the device: the device
and autocast choice, the device-resident image sets, the step (forward and loss under
autocast, one optimizer step per accumulation) and evaluation, sharded across ranks."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitdeploy.data import ImageSet
from vitdeploy.errors import VitDeployError
from vitdeploy.imagefolder.splits import StoredSet
from vitdeploy.precision import TORCH_DTYPES
from vitdeploy.preprocess import Preprocess
from vitdeploy.train import distributed
from vitdeploy.train.augment import Augmenter
from vitdeploy.train.distributed import DistContext
from vitdeploy.train.sampling import center_crop
from vitdeploy.train.signals import StopRequest

PREFETCH_BATCHES = 2  # batches a streamed set reads ahead


def resolve_device(name: str) -> torch.device:
    """'auto' is the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VitDeployError("--device cuda was asked for but PyTorch sees no CUDA GPU here; use --device cpu or auto")
    return device


def autocast(device: torch.device, precision: str):  # noqa: ANN201 - a context manager
    """Autocast for bf16/fp16; a no-op for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=TORCH_DTYPES[precision])


class DeviceData:
    """One image set held on the device as uint8; batches are gathered, augmented and
    preprocessed there, so the host never touches individual images. Images stored larger
    than the model's crop (`crop`) are seen through their centre crop in evaluation, through
    the augmenter's random crops in training."""

    def __init__(self, data: ImageSet, preprocess: Preprocess, device: torch.device, augmenter: Augmenter | None = None,
                 crop: int | None = None) -> None:
        pin = device.type == "cuda" and data.images.device.type == "cpu"
        images = data.images.pin_memory() if pin else data.images
        self.images = images.to(device, non_blocking=pin)
        self._feed(data.labels.to(device, non_blocking=pin), preprocess, device, augmenter, crop)

    def _feed(self, labels: torch.Tensor, preprocess: Preprocess, device: torch.device, augmenter: Augmenter | None,
              crop: int | None) -> None:
        """What turns gathered images into model input: shared by the held and the streamed sets."""
        self.labels = labels
        self.preprocess = preprocess.to(device)
        self.augmenter = augmenter
        self.device = device
        self.crop = crop

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _inputs(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                epoch: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if epoch is None or self.augmenter is None:
            return self.preprocess(center_crop(images, self.crop) if self.crop else images), labels
        return self.augmenter(images, labels, indices, epoch)

    def batch(self, indices: torch.Tensor, epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Model input and targets for `indices`, augmented for `epoch` when given (training)."""
        idx = indices.to(self.device, non_blocking=True)
        return self._inputs(self.images[idx], self.labels[idx], indices, epoch)

    def batches(self, plan: Iterable[torch.Tensor], epoch: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`batch` for each index tensor of `plan`, in order."""
        for indices in plan:
            yield self.batch(indices, epoch)


class StreamData(DeviceData):
    """An image set left in its memory-mapped file (too large for memory or the device): a
    background thread reads the next batches into pinned host memory while the device works on
    this one; each arrives on the device as the same uint8 images DeviceData would gather, so
    the batches are bitwise those of the in-memory path."""

    def __init__(self, data: StoredSet, preprocess: Preprocess, device: torch.device, augmenter: Augmenter | None = None,
                 crop: int | None = None, prefetch: int = PREFETCH_BATCHES) -> None:
        self.stored = data
        self.prefetch = prefetch
        self._feed(data.labels.to(device), preprocess, device, augmenter, crop)

    def _read(self, indices: torch.Tensor) -> torch.Tensor:
        images = self.stored.gather(indices.numpy())
        return images.pin_memory() if self.device.type == "cuda" else images

    def batch(self, indices: torch.Tensor, epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self.batches([indices], epoch))

    def batches(self, plan: Iterable[torch.Tensor], epoch: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = iter(plan)
        with ThreadPoolExecutor(1, thread_name_prefix="vitdeploy-stream") as reader:
            pending: deque[tuple[torch.Tensor, Future]] = deque()
            for indices in itertools.islice(plan, self.prefetch):
                pending.append((indices, reader.submit(self._read, indices)))
            while pending:
                indices, future = pending.popleft()
                nxt = next(plan, None)
                if nxt is not None:
                    pending.append((nxt, reader.submit(self._read, nxt)))
                images = future.result().to(self.device, non_blocking=True)
                yield self._inputs(images, self.labels[indices.to(self.device)], indices, epoch)


@dataclass
class StepContext:
    """What one optimizer step needs besides the batch."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    precision: str
    grad_accum: int
    grad_clip: float
    label_smoothing: float
    ddp: bool = False  # the model is DistributedDataParallel: all-reduce gradients once per step


def train_step(ctx: StepContext, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Forward and backward over `grad_accum` micro-batches, then one optimizer step.

    Returns the batch's mean loss as a device tensor (no host sync).
    """
    total = torch.zeros((), device=ctx.device)
    micro = list(zip(inputs.chunk(ctx.grad_accum), labels.chunk(ctx.grad_accum), strict=True))
    for i, (x, y) in enumerate(micro):
        sync = not ctx.ddp or i == len(micro) - 1  # DDP all-reduces on the last micro-batch only
        with nullcontext() if sync else ctx.model.no_sync():
            with autocast(ctx.device, ctx.precision):
                loss = F.cross_entropy(ctx.model(x), y, label_smoothing=ctx.label_smoothing)
            ctx.scaler.scale(loss / ctx.grad_accum).backward()
        total += loss.detach().float() / ctx.grad_accum
    if ctx.grad_clip > 0:
        ctx.scaler.unscale_(ctx.optimizer)
        torch.nn.utils.clip_grad_norm_(ctx.model.parameters(), ctx.grad_clip)
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    ctx.optimizer.zero_grad(set_to_none=True)
    return total


class EvaluationStopped(Exception):
    """A stop signal arrived during an evaluation, which is abandoned (it is redone on resume)."""


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: DeviceData, batch_size: int, precision: str,
             dist: DistContext | None = None, stop: StopRequest | None = None) -> dict[str, float]:
    """Top-1 accuracy (fraction) and mean cross-entropy over the whole set; in a distributed
    run each rank takes a contiguous share (no padding, no image counted twice) and the sums
    are added up across ranks. With `stop`, a signal ends it between two batches (every rank
    at the same one) by raising EvaluationStopped: a long evaluation never delays a stop."""
    dist = dist or DistContext()
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=data.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=data.device)
    first, last = distributed.shard(dist, len(data))
    plan = (torch.arange(start, min(start + batch_size, last)) for start in range(first, last, batch_size))
    for x, y in data.batches(plan):
        if stop is not None and distributed.agree_signal(dist, stop.signum):
            model.train()
            raise EvaluationStopped
        with autocast(data.device, precision):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    distributed.all_sum(dist, correct)
    distributed.all_sum(dist, loss_sum)
    model.train()
    n = len(data)
    return {"acc": correct.item() / n, "loss": loss_sum.item() / n, "images": n}
