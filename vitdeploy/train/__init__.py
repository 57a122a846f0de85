"""Training: configuration and recipes, the loop with exact resume, and throughput measurement.

The names below are imported on first use, so that `vitdeploy.train.config` (which the CLI
reads for its help) can be imported without loading torch."""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {
    "TrainConfig": "vitdeploy.train.config",
    "TrainResult": "vitdeploy.train.loop",
    "run_training": "vitdeploy.train.loop",
    "run_dir_of": "vitdeploy.train.run_folder",
    "unfinished_run": "vitdeploy.train.run_folder",
    "StopRequest": "vitdeploy.train.signals",
    "evaluate": "vitdeploy.train.step",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'vitdeploy.train' has no attribute {name!r}")
    return getattr(import_module(_WHERE[name]), name)
