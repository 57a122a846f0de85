"""Training: configuration, the loop with exact resume, and throughput measurement."""

from vitdeploy.train.config import TrainConfig
from vitdeploy.train.loop import (
    StopRequest,
    TrainResult,
    evaluate,
    run_dir_of,
    run_training,
    unfinished_run,
)

__all__ = ["StopRequest", "TrainConfig", "TrainResult", "evaluate", "run_dir_of", "run_training", "unfinished_run"]
