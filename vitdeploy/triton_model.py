"""How a vitdeploy model looks to Triton and to clients of the Open Inference Protocol: its
model name, platform and datatypes, and its Triton model configuration.

One owner for both places that state it: `export --triton` writes the configuration as
config.pbtxt, and `vitdeploy serve` answers the same record as JSON at
/v2/models/NAME/config, so a client (or perf_analyzer) reads the same model from either.
"""

from __future__ import annotations

import json
import re
from typing import Any

VERSION = "1"  # the one version of each model, as the repository lays it out and the server answers it
LABELS_FILE = "labels.txt"
TRITON_TYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32", "float16": "TYPE_FP16"}  # model configuration
DATATYPES = {"uint8": "UINT8", "float32": "FP32", "float16": "FP16"}  # Open Inference Protocol tensors
PLATFORMS = {"onnx": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "checkpoint": "pytorch"}


def model_stem(model_name: str) -> str:
    """A Triton model name from vitdeploy's (timm:X, hf:FOLDER): letters, digits, '.', '_' and '-' only."""
    tail = model_name.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", tail).strip("._-")[:100] or "model"


def model_name(model: str, artifact: dict[str, Any] | None, tome: str | None = None) -> str:
    """The Triton name of one artifact of `model`: `<stem>_onnx`, `_onnx_fp16`, `_onnx_int8_<target>`, `_trt`,
    `_trt_int8`; the stem alone for the training checkpoint (`artifact` None), which Triton does not serve.
    A graph that merges tokens has `_tome<label>` after the stem (`tome`: the checkpoint's merging)."""
    stem = model_stem(model)
    label = artifact["tome"]["label"] if artifact is not None and "tome" in artifact else tome
    if label is not None:
        stem = f"{stem}_tome{label}"
    if artifact is None:
        return stem
    precision = artifact["precision"]
    if artifact["kind"] == "onnx":
        if precision == "int8":  # one graph per target
            return f"{stem}_onnx_int8_{artifact['int8']['target']}"
        return f"{stem}_onnx" + ("_fp16" if precision == "fp16" else "")
    return f"{stem}_trt" + ("_int8" if precision == "int8" else "")


def parameters(artifact: dict[str, Any] | None, precision: str) -> dict[str, str]:
    """The configuration's parameters for `artifact` (None: the training checkpoint, run at `precision`)."""
    if artifact is None:
        return {"precision": precision}
    extra = {"tensorrt_version": artifact["tensorrt_version"]} if artifact["kind"] == "tensorrt" else {}
    return {"precision": artifact["precision"], **extra}


def model_config(name: str, platform: str, max_batch: int, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]],
                 parameters: dict[str, str], max_queue_delay_us: int) -> dict[str, Any]:
    """Triton's model configuration in its JSON form; tensor records are the manifest's (batch first)."""

    def tensor(record: dict[str, Any], labels: bool) -> dict[str, Any]:
        entry = {"name": record["name"], "data_type": TRITON_TYPES[record["dtype"]], "dims": list(record["shape"][1:])}
        return {**entry, "label_filename": LABELS_FILE} if labels else entry

    return {
        "name": name, "platform": platform, "max_batch_size": max_batch,
        "input": [tensor(r, False) for r in inputs], "output": [tensor(r, True) for r in outputs],
        "dynamic_batching": {"max_queue_delay_microseconds": max_queue_delay_us},
        "parameters": {key: {"string_value": value} for key, value in parameters.items()},
    }


def config_pbtxt(config: dict[str, Any]) -> str:
    """`model_config`'s record as config.pbtxt (protobuf text format)."""

    def tensor(record: dict[str, Any]) -> str:
        dims = ", ".join(str(d) for d in record["dims"])
        labels = f" label_filename: {_quoted(record['label_filename'])}" if "label_filename" in record else ""
        return f"  {{ name: {_quoted(record['name'])} data_type: {record['data_type']} dims: [ {dims} ]{labels} }}"

    lines = [
        f"name: {_quoted(config['name'])}",
        f"platform: {_quoted(config['platform'])}",
        f"max_batch_size: {config['max_batch_size']}",
        "input [", ",\n".join(tensor(r) for r in config["input"]), "]",
        "output [", ",\n".join(tensor(r) for r in config["output"]), "]",
        f"dynamic_batching {{ max_queue_delay_microseconds: {config['dynamic_batching']['max_queue_delay_microseconds']} }}",
    ]
    for key, value in config["parameters"].items():
        lines.append(f"parameters {{ key: {_quoted(key)} value: {{ string_value: {_quoted(value['string_value'])} }} }}")
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    """A protobuf text-format string literal (JSON's escapes are a subset of its C-style ones)."""
    return json.dumps(text, ensure_ascii=True)
