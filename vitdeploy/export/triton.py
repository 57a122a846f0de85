"""A Triton Inference Server model repository from the exported artifacts.

One model folder per platform: `<model>_onnx` (onnxruntime_onnx) for each ONNX file and
`<model>_trt` (tensorrt_plan) for an engine, each with config.pbtxt, version 1 and a
labels file for Triton's classification extension. A plan only loads in a Triton
release built with the same TensorRT version; the config records that version.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

TRITON_TYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32", "float16": "TYPE_FP16"}


def model_stem(model_name: str) -> str:
    """A Triton model name from vitdeploy's (timm:X, hf:FOLDER): letters, digits, '.', '_' and '-' only."""
    tail = model_name.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", tail).strip("._-")[:100] or "model"


def config_text(name: str, platform: str, max_batch: int, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]],
                parameters: dict[str, str], max_queue_delay_us: int = 1000) -> str:
    """config.pbtxt in protobuf text format; dims exclude the batch dimension."""

    def tensor(record: dict[str, Any], labels: bool) -> str:
        dims = ", ".join(str(d) for d in record["shape"][1:])
        extra = ' label_filename: "labels.txt"' if labels else ""
        return f'  {{ name: "{record["name"]}" data_type: {TRITON_TYPES[record["dtype"]]} dims: [ {dims} ]{extra} }}'

    lines = [
        f'name: "{name}"',
        f'platform: "{platform}"',
        f"max_batch_size: {max_batch}",
        "input [", ",\n".join(tensor(r, False) for r in inputs), "]",
        "output [", ",\n".join(tensor(r, True) for r in outputs), "]",
        f"dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}",
    ]
    for key, value in parameters.items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


def write_model(repo: Path, name: str, platform: str, files: list[Path], model_file: str, max_batch: int,
                inputs: list[dict[str, Any]], outputs: list[dict[str, Any]], class_names: list[str],
                parameters: dict[str, str]) -> Path:
    """repo/name/{config.pbtxt, labels.txt, 1/<model_file> (+ its external data)}; returns the folder."""
    folder = repo / name
    version = folder / "1"
    version.mkdir(parents=True, exist_ok=True)
    for source in files:
        target = version / (model_file if source == files[0] else source.name)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    (folder / "labels.txt").write_text("\n".join(class_names) + "\n")
    (folder / "config.pbtxt").write_text(config_text(name, platform, max_batch, inputs, outputs, parameters))
    return folder
