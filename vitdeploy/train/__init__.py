"""Training: configuration, the loop with exact resume, and throughput measurement."""

from vitdeploy.train.config import TrainConfig
from vitdeploy.train.loop import StopRequest, TrainResult, evaluate, run_dir_of, run_training

__all__ = ["StopRequest", "TrainConfig", "TrainResult", "evaluate", "run_dir_of", "run_training"]
