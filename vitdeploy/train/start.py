"""What `vitdeploy train` starts: a new run from the options, or the continuation of an
earlier one, decided here once (the CLI only passes the options along)."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitdeploy.checkpoint import load_checkpoint
from vitdeploy.choices import DEFAULT_MODEL
from vitdeploy.errors import VitDeployError
from vitdeploy.train.config import TrainConfig
from vitdeploy.train.run_folder import run_dir_of, unfinished_run


@dataclass(frozen=True)
class RunStart:
    """The run to start: its config, and the checkpoint and run folder it continues from (None: from
    the beginning), with a line to tell the user what was decided."""

    config: TrainConfig
    checkpoint: dict[str, Any] | None
    run_dir: Path | None
    note: str | None


def plan_start(options: dict[str, Any], resume: Path | None) -> RunStart:
    """`options` are the training options as given (None: not given). With `resume`, the run
    continues from that checkpoint (or run folder) with the options it may change; a run folder
    stopped before its first checkpoint starts over with its recorded settings; else a new run
    of `options["model"]` (or the default model) in `options["out"]` (or runs/MODEL-TIME)."""
    options = dict(options)
    if resume is not None and unfinished_run(resume):  # stopped before its first checkpoint: nothing to continue
        options["out"] = options["out"] or str(resume)
        return RunStart(_saved_config(resume / "config.json").resumed(options), None, None,
                        f"{resume} was stopped before its first checkpoint: starting that run over with its settings")
    if resume is not None:
        checkpoint = load_checkpoint(resume)
        run_dir = run_dir_of(resume)
        options["out"] = options["out"] or str(run_dir)
        config = TrainConfig.from_dict(checkpoint["config"]).resumed(options)
        return RunStart(config, checkpoint, run_dir, f"resuming {config.model} from {resume} at step {checkpoint['step']}")
    name = options.pop("model") or DEFAULT_MODEL
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name.rstrip("/").rsplit("/", 1)[-1])  # timm:X, hf:FOLDER: a plain folder name
    options["out"] = options["out"] or f"runs/{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return RunStart(TrainConfig.from_options(name, **options), None, None, None)


def _saved_config(path: Path) -> TrainConfig:
    """The TrainConfig a run folder's config.json records."""
    try:
        return TrainConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, AttributeError, RecursionError, OSError) as exc:
        raise VitDeployError(f"{path} is damaged ({type(exc).__name__}); start a new run with --out and the options you want") from None
