"""fp32 ONNX -> fp16 ONNX, under one of two policies (`vitdeploy.choices.FP16_POLICIES`).

`matmul` (the default), AMP-style and explicit: every MatMul, Gemm and Conv computes in fp16 (weights stored in fp16, activations cast
to fp16 on the way in, results cast back to fp32); everything else, LayerNormalization,
Softmax, GELU, residual adds and the logits included, stays fp32. Inputs and outputs
keep their types. Rewriting the exported fp32 graph (rather than exporting under
autocast) gives the same graph whatever device exported it, and keeps fp16 out of the
numerically sensitive ops by construction. TensorRT builds it strongly typed, so this
file, not a builder flag, decides the precision of every layer.

`activations`: every activation in fp16 (fewer casts, half the activation memory
traffic), made with ONNX Runtime's own float16 converter; LayerNormalization keeps
computing its statistics in fp32 internally (`stash_type` 1, the default, checked), and
the graph's input and logits keep their types. The default stays `matmul` until a GPU
measurement shows `activations` at least 10% faster on ONNX Runtime CUDA at batch 32
with parity passing (README, "fp16 policy").
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

LOW_PRECISION_OPS = ("MatMul", "Gemm", "Conv")


def float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of every float32 tensor in the graph, from ONNX shape inference.

    Pass the graph loaded without external data: inference needs only the structure,
    and a model above 2 GB cannot be serialized for it.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    names = {v.name for v in values if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    names |= {t.name for t in inferred.graph.initializer if t.data_type == TensorProto.FLOAT}
    return names


def convert_to_mixed_fp16(model: onnx.ModelProto, floats: set[str]) -> onnx.ModelProto:
    """Rewrite `model` in place so MatMul/Gemm/Conv run in fp16; `floats` from `float_tensors`."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    fp16_names: dict[str, str] = {}  # fp32 tensor -> its fp16 version
    new_initializers: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def to_fp16(name: str) -> str:
        if name in fp16_names:
            return fp16_names[name]
        low = f"{name}__fp16"
        if name in initializers:
            array = numpy_helper.to_array(initializers[name]).astype("float16")
            new_initializers.append(numpy_helper.from_array(array, low))
        else:
            nodes.append(helper.make_node("Cast", [name], [low], to=TensorProto.FLOAT16, name=f"{low}__cast"))
        fp16_names[name] = low
        return low

    for node in graph.node:
        if node.op_type not in LOW_PRECISION_OPS or not all(i in floats for i in node.input if i):
            nodes.append(node)
            continue
        for index, name in enumerate(node.input):
            if name:
                node.input[index] = to_fp16(name)
        output = node.output[0]
        node.output[0] = f"{output}__fp16"
        nodes.append(node)
        nodes.append(helper.make_node("Cast", [node.output[0]], [output], to=TensorProto.FLOAT, name=f"{output}__cast_back"))

    still_used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_initializers)
    del graph.node[:]
    graph.node.extend(nodes)
    # Shapes recorded for the fp32 graph may name tensors that changed type; let inference redo them.
    del graph.value_info[:]
    return model


def node_dtypes(model: onnx.ModelProto) -> list[tuple[str, str, list[int], list[int]]]:
    """(op_type, name, input elem types, output elem types) for every node, after shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    return [
        (n.op_type, n.name, [types.get(i, 0) for i in n.input if i], [types.get(o, 0) for o in n.output if o])
        for n in inferred.graph.node
    ]


def convert_activations_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The `activations` policy: ONNX Runtime's float16 converter with the I/O types kept."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    low = convert_float_to_float16(model, keep_io_types=True)
    for node in low.graph.node:
        stash = [a for a in node.attribute if a.name == "stash_type"]
        if node.op_type == "LayerNormalization" and stash and stash[0].i != 1:
            stash[0].i = 1  # statistics in fp32, whatever the input type
    return low
