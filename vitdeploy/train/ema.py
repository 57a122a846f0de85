"""An exponential moving average of the weights, the model a long run evaluates and ships.

torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn (buffers averaged too),
kept on the unwrapped, uncompiled model and updated once per optimizer step on every rank,
so each rank holds the same average and evaluation can be sharded across ranks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from vitdeploy.errors import VitDeployError
from vitdeploy.models import ModelSpec, load_exact_state

EMA_HORIZON_FRACTION = 0.1  # the default average spans about the last tenth of the run's steps
DECAY_RANGE = (0.5, 0.9999)


def default_decay(total_steps: int) -> float:
    """A decay tied to the run's length: 1 - 1/(a tenth of the steps), within DECAY_RANGE.

    A fixed 0.9999 weights the last ~10,000 steps, so over a 700-step run the average would
    stay near the initial weights; 700 steps give 0.986 here."""
    horizon = max(1.0, EMA_HORIZON_FRACTION * total_steps)
    return min(DECAY_RANGE[1], max(DECAY_RANGE[0], 1.0 - 1.0 / horizon))


class WeightEMA:
    """The average of `model`'s weights over the optimizer steps taken so far."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    @property
    def module(self) -> torch.nn.Module:
        return self.averaged.module

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged.item())

    def update(self, model: torch.nn.Module) -> None:
        """One step: the first copies the weights, later ones move the average by (1 - decay)."""
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, record: Any, spec: ModelSpec, source: str) -> None:
        """Restore the average and its update count from a checkpoint's `ema` record."""
        if not isinstance(record, dict) or not isinstance(record.get("updates"), int) or record["updates"] < 0:
            raise VitDeployError(f"{source} has a damaged EMA record; resume from another checkpoint of the run")
        load_exact_state(self.module, record.get("state"), spec, f"{source} (EMA weights)")
        self.averaged.n_averaged.fill_(record["updates"])
