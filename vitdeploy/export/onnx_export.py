"""PyTorch model -> verified ONNX graph with a dynamic batch dimension.

Input contract (default): the graph takes uint8 RGB NCHW images at the dataset's
resolution, named `input`, and contains the preprocessing (float conversion,
normalization, resize), so every backend and the server feed bytes and nobody
re-implements preprocessing. With `preprocess_in_graph=False` it takes float32
normalized images at the model's input size. The output is float32 `logits`.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from vitdeploy.errors import VitDeployError
from vitdeploy.export.trt_compat import single_cast_input
from vitdeploy.manifest import INPUT, OUTPUT
from vitdeploy.preprocess import Preprocess, Preprocessing

OPSET = 18  # native LayerNormalization; below 23, so no ONNX Attention op
EXTERNAL_DATA_BYTES = 1 << 30  # above 1 GiB of weights, store them beside the graph (protobuf caps at 2 GB)


class InferenceModel(nn.Module):
    """Preprocessing (optional) followed by the classifier: what the ONNX graph computes."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing, preprocess_in_graph: bool = True) -> None:
        super().__init__()
        self.preprocess = Preprocess(preprocessing) if preprocess_in_graph else nn.Identity()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(images))


def example_input(preprocessing: Preprocessing, preprocess_in_graph: bool, batch: int) -> torch.Tensor:
    if preprocess_in_graph:
        size = preprocessing.source_size
        return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    return torch.randn(batch, 3, preprocessing.input_size, preprocessing.input_size)


def export_onnx(
    module: InferenceModel,
    example: torch.Tensor,
    path: Path,
    min_batch: int,
    max_batch: int,
    metadata: dict[str, str],
) -> bool:
    """Export with the dynamo exporter and save to `path`; returns whether weights went to external data.

    The example batch has at least 2 images so the graph does not specialize on 1.
    """
    module = module.eval()
    dynamic = None
    if max_batch > min_batch:
        dynamic = ({0: torch.export.Dim("batch", min=min_batch, max=max_batch)},)
    log = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(log):
            program = torch.onnx.export(
                module, (example,), dynamo=True, dynamic_shapes=dynamic, input_names=[INPUT],
                output_names=[OUTPUT], opset_version=OPSET, optimize=True, verify=False,
            )
    except Exception as exc:  # the exporter raises many types; all mean the same to the user
        raise VitDeployError(f"torch.onnx.export failed: {str(exc).splitlines()[0]}; rerun with --debug for details") from exc
    for key, value in metadata.items():
        program.model.metadata_props[key] = value
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    program.save(str(path), external_data=external)
    save_graph(onnx.load(str(path), load_external_data=False), path)  # external weights keep their file
    return external


def check_onnx(path: Path) -> None:
    """onnx.checker with full_check (shape inference included), on the path so external data works."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise VitDeployError(
            f"{path.name} failed the ONNX checker: {str(exc).splitlines()[0]}; rerun with --debug and report it with your "
            "torch and onnx versions (`vitdeploy info`)"
        ) from exc


def io_records(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Names, dtypes and shapes (symbolic batch) of the graph's inputs and outputs."""
    model = onnx.load(str(path), load_external_data=False)

    def describe(value: onnx.ValueInfoProto) -> dict[str, Any]:
        tensor = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        return {"name": value.name, "dtype": dtype, "shape": dims}

    return [describe(v) for v in model.graph.input], [describe(v) for v in model.graph.output]


def save_graph(model: onnx.ModelProto, path: Path, external_location: str | None = None) -> None:
    """Write an ONNX file the way every exported graph is written: TensorRT's input rule first.

    With `external_location`, weights go to that file beside the graph; tensors that
    already refer to external data keep their reference.
    """
    single_cast_input(model)
    if external_location is None:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external_location)
