"""Training: configuration and recipes, the loop with exact resume, and throughput measurement."""

from vitdeploy.train.config import TrainConfig
from vitdeploy.train.loop import TrainResult, run_training
from vitdeploy.train.run_folder import run_dir_of, unfinished_run
from vitdeploy.train.signals import StopRequest
from vitdeploy.train.step import evaluate

__all__ = ["StopRequest", "TrainConfig", "TrainResult", "evaluate", "run_dir_of", "run_training", "unfinished_run"]
