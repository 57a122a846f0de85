"""Data-parallel training under torch.distributed, started by `torchrun`.

`vitdeploy train` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT): with WORLD_SIZE > 1 it joins the process group (NCCL on CUDA, gloo on
the CPU, with a timeout on every collective so that a lost rank ends the job instead of
hanging it); without it, everything here is a no-op and training is single-process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from vitdeploy.errors import VitDeployError

DEFAULT_TIMEOUT_S = 300.0  # per collective; VITDEPLOY_DIST_TIMEOUT_S overrides it


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job; rank 0 of a world of 1 when not distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    flag_group: Any = None  # a gloo group for the per-step stop flag (no GPU sync)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_type: str, timeout_s: float | None = None) -> DistContext:
    """Join torchrun's process group when WORLD_SIZE > 1 (once per process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    timeout_s = timeout_s or float(os.environ.get("VITDEPLOY_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    except KeyError as exc:
        raise VitDeployError(f"WORLD_SIZE={world} but {exc.args[0]} is not set; start distributed runs with torchrun") from exc
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    flag_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if backend != "gloo" else None
    return DistContext(rank, world, local_rank, flag_group)


def teardown(ctx: DistContext) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()


def agree_signal(ctx: DistContext, signum: int | None) -> int | None:
    """The stop signal any rank received (the highest number if several), the same on every rank."""
    if not ctx.active:
        return signum
    flag = torch.tensor([signum or 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ctx.flag_group)
    return int(flag.item()) or None


def all_sum(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over ranks (in place; returned for chaining)."""
    if ctx.active:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()


def shard(ctx: DistContext, count: int) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous share of `count` items: shares differ by at most
    one item, no item is dropped or repeated (no padding)."""
    return ctx.rank * count // ctx.world_size, (ctx.rank + 1) * count // ctx.world_size


def replica_checksums(ctx: DistContext, model: torch.nn.Module) -> list[float]:
    """Sum of all parameters on every rank (identical when the replicas agree)."""
    total = torch.zeros(1, dtype=torch.float64, device=next(model.parameters()).device)
    for p in model.parameters():
        total += p.detach().double().sum()
    if not ctx.active:
        return [float(total.item())]
    gathered = [torch.zeros_like(total) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, total)
    return [float(t.item()) for t in gathered]
