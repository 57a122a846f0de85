"""Optimizer and learning-rate schedule: AdamW with layer-wise LR decay, linear warm-up
then cosine decay to zero, counted in optimizer steps."""

from __future__ import annotations

import math

import torch
from torch import nn

from vitdeploy.models import ModelSpec


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, layer_decay: float, spec: ModelSpec, fused: bool = False
) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases, norms and embeddings, and the LR of block i
    scaled by layer_decay ** (depth - i), so pretrained early layers move least (the model's
    own blocks and embeddings, by `ModelSpec.layer_id`).
    `fused` selects the single-kernel implementation (for CUDA parameters)."""
    groups: dict[tuple[int, bool], dict] = {}
    num_layers = spec.num_layers
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim > 1 and not name.endswith(spec.no_decay)
        depth = spec.layer_id(name)
        group = groups.setdefault((depth, decay), {
            "params": [],
            "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (num_layers + 1 - depth),
        })
        group["params"].append(param)
    param_groups = [groups[key] for key in sorted(groups)]
    for group in param_groups:
        group["lr"] = lr * group["lr_scale"]
    return torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.999), fused=fused or None)


class WarmupCosine:
    """LR factor: linear from 0 over `warmup_steps`, then cosine to 0 at `total_steps`."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, total_steps: int, warmup_steps: int) -> None:
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.total_steps = max(1, total_steps)
        self.warmup_steps = min(max(0, warmup_steps), self.total_steps)
        self.step_count = 0
        self._apply()

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    @property
    def lr(self) -> float:
        return self.base_lr * self.factor(self.step_count)

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * group.get("lr_scale", 1.0)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict[str, int | float]:
        return {"step_count": self.step_count, "base_lr": self.base_lr, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict[str, int | float]) -> None:
        """Restore the position; the current total/warm-up steps stay (a resumed run may extend --epochs)."""
        self.step_count = int(state["step_count"])
        self._apply()
