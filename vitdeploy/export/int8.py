"""fp32 ONNX -> INT8 ONNX with ONNX Runtime's quantization tools, in two forms.

No single INT8 graph serves every backend (README, "INT8"):

- `cpu` (for ort-cpu): static QDQ with unsigned 8-bit activations and per-channel signed
  8-bit weights, calibrated: fixed activation scales, so an image's answer never depends
  on the other images in its batch (dynamic quantization computes one scale per batch at
  run time, which under serve's batching made one client's answer depend on another's;
  on a VNNI/AMX CPU it was no faster: docs/results/2026-12-01-int8-forms.json). Without
  VNNI or AMX (`avx512_vnni`, `avx_vnni`, `amx_int8` in /proc/cpuinfo) the weights use
  `reduce_range` (7 bits: ONNX Runtime warns that U8S8 can saturate without VNNI); the
  rule and the flags are recorded in the manifest.
- `tensorrt` (for trt and ort-trt): static QDQ with symmetric signed 8-bit activations
  and per-channel symmetric weights, no bias quantization, dedicated Q/DQ pairs, outputs
  not quantized (the options NVIDIA's Model Optimizer uses for TensorRT), calibrated; the
  TensorRT engine takes INT8 from the Q/DQ nodes (strongly typed).

In both only MatMul and Gemm with constant weights are quantized: the attention's QK^T
and softmax x V products, the patch-embedding Conv, LayerNorm, Softmax, GELU and the
residual adds stay float, and so do the nodes `--int8-exclude` names (default: the
classification head, the layer most sensitive to quantization).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from vitdeploy.choices import CALIBRATION_METHODS
from vitdeploy.errors import VitDeployError
from vitdeploy.progress import Ticker
from vitdeploy.versions import peak_rss_mib

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
CHUNK = 32  # images per calibration batch at 32 px; fewer for larger inputs (see `chunk_images`)


def chunk_images(model_px: int) -> int:
    """Images per calibration batch: ONNX Runtime keeps every intermediate output of a batch in
    memory (about 145 MB per image for vit_b_16 at 224 px), so the batch shrinks with the model's
    input area: 32 at 32 px, 1 at 224 px."""
    return max(1, CHUNK * 32 * 32 // (model_px * model_px))


@dataclass(frozen=True)
class Int8Options:
    calib_images: int = 512
    calib_method: str = "minmax"
    exclude: tuple[str, ...] = ()  # empty: the head
    seed: int = 0

    def validate(self) -> None:
        if self.calib_method not in CALIBRATION_METHODS:
            raise VitDeployError(f"unknown --calib-method {self.calib_method!r}; choose {', '.join(CALIBRATION_METHODS)}")
        if self.calib_images < 1:
            raise VitDeployError("--calib-images must be at least 1")


def cpu_form(flags: set[str]) -> dict[str, Any]:
    """The rule: which CPU INT8 graph this instruction set gets, and why (always static: batch-independent)."""
    vnni = sorted(flags & set(VNNI_FLAGS))
    if vnni:
        return {"form": "qdq-u8-vnni", "reason": f"the CPU has {', '.join(vnni)}: static QDQ, u8 activations, per-channel "
                                                 "s8 weights (fixed scales: answers do not depend on the batch)",
                "cpu_int8_flags": vnni}
    return {"form": "qdq-u8", "reason": "the CPU has no VNNI/AMX: static QDQ, u8 activations, per-channel s8 weights, "
                                        "reduce_range (U8S8 can saturate without VNNI)", "cpu_int8_flags": []}


def quantizable_nodes(model: onnx.ModelProto, exclude: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(MatMul/Gemm nodes with a constant weight to quantize, nodes kept float). The default exclusion
    is the head: the Gemm/MatMul that produces the graph output."""
    initializers = {t.name for t in model.graph.initializer}
    constants = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    names = {n.name for n in model.graph.node}
    unknown = [e for e in exclude if e not in names]
    if unknown:
        raise VitDeployError(f"--int8-exclude names no node of the graph: {', '.join(unknown)} (node names: "
                             f"{', '.join(sorted(n.name for n in model.graph.node if n.op_type in ('MatMul', 'Gemm'))[:8])}, ...)")
    matmuls = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    with_weights = [n for n in matmuls if len(n.input) > 1 and (n.input[1] in initializers or n.input[1] in constants)]
    if not exclude and with_weights:
        exclude = (with_weights[-1].name,)  # the classification head
    quantize = [n.name for n in with_weights if n.name not in exclude]
    if not quantize:  # ONNX Runtime reads an empty list as "every node"
        raise VitDeployError(f"--int8-exclude leaves nothing to quantize: it names all {len(with_weights)} MatMul/Gemm "
                             "nodes with weights; exclude fewer, or export without --int8")
    kept = [n.name for n in matmuls if n.name not in quantize]
    return quantize, kept


def quantized_count(path: Path) -> int:
    """MatMul/Gemm nodes that run in INT8 in the written graph: integer kernels (dynamic form) or float
    ones whose weight comes through a DequantizeLinear (Q/DQ forms). What the manifest reports."""
    model = onnx.load(str(path))
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    integer = sum(n.op_type in ("MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul") for n in model.graph.node)
    qdq = sum(n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in dequantized for n in model.graph.node)
    return integer + qdq


@contextmanager
def temporary_files_in(folder: Path) -> Iterator[None]:
    """Point Python's temporary files (ONNX Runtime's quantizer keeps its augmented model and calibration
    data in a tempfile folder) into `folder`, so that an interrupted export leaves nothing in /tmp."""
    scratch = Path(folder) / ".tmp"
    scratch.mkdir(exist_ok=True)
    previous, tempfile.tempdir = tempfile.tempdir, str(scratch)
    try:
        yield
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(scratch, ignore_errors=True)


class _Reader:
    """ONNX Runtime's CalibrationDataReader over uint8 image batches (the graph's own input), with the
    `__len__`/`set_range` that its strided calibration uses to collect one batch at a time."""

    def __init__(self, input_name: str, images: np.ndarray, chunk: int, say: Callable[[str], None] | None = None) -> None:
        self.batches = [images[i:i + chunk] for i in range(0, len(images), chunk)]
        self.input_name = input_name
        self.say, self.ticker, self.served = say, Ticker(), 0
        self.set_range(0, len(self.batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.pending: Iterator[np.ndarray] = iter(self.batches[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.pending, None)
        if batch is None:
            return None
        self.served += 1
        if self.say is not None and self.ticker.due():  # ONNX Runtime's calibrator says nothing for minutes
            self.say(f"calibration: {min(self.served, len(self.batches))}/{len(self.batches)} batches collected")
        return {self.input_name: batch}


def _method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def quantize(source: Path, out: Path, form: str, images: np.ndarray | None, options: Int8Options,
             input_name: str = "input", model_px: int = 32, say: Callable[[str], None] | None = None,
             symbolic_shapes: bool = True) -> dict[str, Any]:
    """Write the INT8 graph of `form` ('dynamic', 'qdq-u8', 'qdq-u8-vnni', 'qdq-s8-symmetric') for `source`; returns
    what the manifest records (form, quantized and float nodes, calibration, peak memory). `symbolic_shapes`
    False: ONNX's own shape inference only (a token-merging graph, whose reductions ONNX Runtime's symbolic
    inference cannot follow; its shapes are static but for the batch)."""
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_name(out.name + ".pre.onnx")
    # ONNX Runtime's own pre-processing (shape inference); no ORT-specific fusions, so the graph stays plain ONNX
    quant_pre_process(str(source), str(prepared), skip_optimization=True, skip_symbolic_shape=not symbolic_shapes)
    model = onnx.load(str(prepared))
    prepared.unlink()
    nodes, kept = quantizable_nodes(model, options.exclude)
    record: dict[str, Any] = {"form": form, "quantized_nodes": len(nodes), "float_matmuls": kept,
                              "op_types": ["MatMul", "Gemm"]}
    if form == "dynamic":
        quantize_dynamic(model, str(out), op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=nodes,
                         per_channel=True, weight_type=QuantType.QInt8)
        record.update(calibration=None, quantized_nodes=quantized_count(out))
        return record
    if images is None or not len(images):
        raise VitDeployError("static INT8 quantization needs calibration images; pass --data-dir with the training batches")
    before = peak_rss_mib()
    symmetric = form == "qdq-s8-symmetric"
    chunk = chunk_images(model_px)
    # One batch per collection, ranges or histograms merged after each: memory bounded by one batch. (Not
    # CalibMaxIntermediateOutputs: ONNX Runtime 1.31.1's MinMax calibrator drops the outputs it caps.)
    extra = {"CalibStridedMinMax": 1,
             "ActivationSymmetric": symmetric, "WeightSymmetric": True, "QuantizeBias": False if symmetric else True,
             "DedicatedQDQPair": symmetric, "AddQDQPairToWeight": False}
    quantize_static(model, str(out), _Reader(input_name, images, chunk, say), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=nodes, per_channel=True,
                    reduce_range=form == "qdq-u8",  # 7-bit weights where U8S8 could saturate (no VNNI)
                    activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=_method(options.calib_method), extra_options=extra)
    peak = peak_rss_mib()
    record["quantized_nodes"] = quantized_count(out)
    record["calibration"] = {"method": options.calib_method, "images": int(len(images)), "seed": options.seed,
                             "source": "training images outside the validation split, through the graph's own preprocessing",
                             "chunk_images": chunk,
                             "process_peak_rss_mib": peak,
                             "peak_rss_growth_mib": None if peak is None else round(max(0.0, peak - before), 1)}
    return record


def scales(path: Path) -> dict[str, tuple[float, int]]:
    """(scale, zero point) of every QuantizeLinear of a graph: what calibration decided."""
    model = onnx.load(str(path))
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            scale = values.get(node.input[1])
            zero = values.get(node.input[2]) if len(node.input) > 2 else np.zeros(1)
            if scale is not None:
                found[node.input[0]] = (float(np.ravel(scale)[0]), int(np.ravel(zero)[0]))
    return found
