"""A Triton Inference Server model repository from the exported artifacts.

One model folder per artifact (names and configuration from `vitdeploy.triton_model`):
`<model>_onnx` (onnxruntime_onnx) for each ONNX file and `<model>_trt` (tensorrt_plan) for
an engine, each with config.pbtxt, version 1 and a labels file for Triton's classification
extension. A plan only loads in a Triton release built with the same TensorRT version; the
config records that version.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from vitdeploy.triton_model import LABELS_FILE, VERSION, config_pbtxt


def write_model(repo: Path, config: dict[str, Any], files: list[Path], model_file: str, class_names: list[str]) -> Path:
    """repo/NAME/{config.pbtxt, labels.txt, 1/<model_file> (+ its external data)} for `config`
    (`triton_model.model_config`); returns the folder."""
    folder = repo / config["name"]
    version = folder / VERSION
    version.mkdir(parents=True, exist_ok=True)
    for source in files:
        target = version / (model_file if source == files[0] else source.name)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    (folder / LABELS_FILE).write_text("\n".join(class_names) + "\n")
    (folder / "config.pbtxt").write_text(config_pbtxt(config))
    return folder
