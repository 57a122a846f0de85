"""ONNX graphs TensorRT can build, and a preflight that checks them without TensorRT.

TensorRT's ONNX parser accepts a UINT8 network input only when a Cast reads it directly
and nothing else does ("All UINT8 inputs must directly feed into a cast layer"); the
dynamo exporter also reads the input's Shape for the batch size. `single_cast_input`
gives every UINT8 input exactly one reader, a Cast to float, and every ONNX file the
exporter writes goes through it (`onnx_export.save_graph`).

`preflight` checks a graph against the rules the parser documents, per TensorRT major
version, with the supported-operator lists kept as data in `tensorrt_ops/` (each names
its source). It catches what would certainly fail to parse; it is no substitute for a
real build, which `vitdeploy export --trt` still does where TensorRT exists.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import onnx
from onnx import TensorProto, helper

CAST_TARGETS = (TensorProto.FLOAT, TensorProto.FLOAT16)
RESIZE_MODES = ("nearest", "linear")
NOTE = ("checked against TensorRT's documented ONNX parser rules, without TensorRT: no substitute for a build "
        "(`vitdeploy export --trt` on a machine with TensorRT builds and verifies for real)")


def single_cast_input(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewire `model` in place so every UINT8 graph input is read by exactly one Cast to float.

    Other readers (e.g. a Shape taking the batch size) read the Cast's output instead,
    which has the same shape, so results are unchanged. The Cast moves to the front of
    the node list, which keeps the order topological (it reads only the graph input).
    """
    graph = model.graph
    for value in graph.input:
        if value.type.tensor_type.elem_type != TensorProto.UINT8:
            continue
        readers = [n for n in graph.node if value.name in n.input]
        cast = next((n for n in readers if n.op_type == "Cast" and _attr(n, "to") in CAST_TARGETS), None)
        if cast is None:
            cast = helper.make_node("Cast", [value.name], [f"{value.name}__float"], to=TensorProto.FLOAT,
                                    name=f"{value.name}__cast")
        else:
            graph.node.remove(cast)
        for node in readers:
            if node is not cast:
                for i, name in enumerate(node.input):
                    if name == value.name:
                        node.input[i] = cast.output[0]
        graph.node.insert(0, cast)
    return model


@functools.lru_cache(maxsize=None)
def support_lists() -> tuple[dict[str, Any], ...]:
    """The supported-operator lists in the repository, newest TensorRT first."""
    folder = resources.files("vitdeploy.export").joinpath("tensorrt_ops")
    lists = [json.loads(entry.read_text()) for entry in folder.iterdir() if entry.name.endswith(".json")]
    return tuple(sorted(lists, key=lambda d: d["major"], reverse=True))


def preflight(model: onnx.ModelProto, lists: tuple[dict[str, Any], ...] | None = None) -> dict[str, Any]:
    """{"ok", "problems", "versions", "note"}: `ok` and `problems` for the newest list (the
    TensorRT major versions vitdeploy builds for), `versions` the result under every list."""
    lists = support_lists() if lists is None else lists
    structural = _structural_problems(model)
    versions = {}
    for support in lists:
        problems = structural + _support_problems(model, support)
        versions[support["tensorrt"]] = {"ok": not problems, "problems": problems, "source": support["source"]}
    newest = versions[lists[0]["tensorrt"]]
    return {"ok": newest["ok"], "problems": newest["problems"], "checked_against": f"TensorRT {lists[0]['tensorrt']}",
            "versions": versions, "note": NOTE}


def _support_problems(model: onnx.ModelProto, support: dict[str, Any]) -> list[str]:
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not support["opset_min"] <= opset <= support["opset_max"]:
        problems.append(f"opset {opset} is outside TensorRT {support['tensorrt']}'s parser range "
                        f"{support['opset_min']}..{support['opset_max']}")
    known = set(support["operators"])
    unsupported = sorted({n.op_type for n in _nodes(model) if n.domain in ("", "ai.onnx") and n.op_type not in known})
    problems += [f"operator {op} is not supported by TensorRT {support['tensorrt']}'s ONNX parser" for op in unsupported]
    return problems


def _structural_problems(model: onnx.ModelProto) -> list[str]:
    """Rules that hold for every TensorRT version vitdeploy targets."""
    problems = []
    graph = model.graph
    for node in _nodes(model):
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"node {node.name or node.op_type} uses the custom domain {node.domain!r} ({node.op_type})")
        if node.op_type == "Resize":
            mode = _attr(node, "mode") or b"nearest"
            mode = mode.decode() if isinstance(mode, bytes) else str(mode)
            if mode not in RESIZE_MODES:
                problems.append(f"Resize {node.name} uses mode {mode!r}; TensorRT supports {', '.join(RESIZE_MODES)} "
                                "(a model asking for bicubic cannot become an engine: export with --resize bilinear, whose cost the export measures)")
            if _attr(node, "antialias"):
                problems.append(f"Resize {node.name} asks for antialiasing, which TensorRT does not support")
        if node.op_type == "LayerNormalization" and len([o for o in node.output if o]) > 1:
            problems.append(f"LayerNormalization {node.name} uses more than its first output")
    if model.functions:
        problems.append(f"the graph has {len(model.functions)} local functions; TensorRT needs them inlined")
    types = _tensor_types(model)
    inputs = {v.name for v in graph.input}
    for value in graph.input:
        if value.type.tensor_type.elem_type != TensorProto.UINT8:
            continue
        readers = [n for n in graph.node if value.name in n.input]
        if len(readers) != 1 or readers[0].op_type != "Cast" or _attr(readers[0], "to") not in CAST_TARGETS:
            found = ", ".join(f"{n.op_type} {n.name}" for n in readers) or "nothing"
            problems.append(f"UINT8 input {value.name} must be read by exactly one Cast to FLOAT or FLOAT16, "
                            f"but is read by {found}")
    uint8 = sorted(name for name, t in types.items() if t == TensorProto.UINT8 and name not in inputs)
    if uint8:
        problems.append(f"UINT8 is allowed only as a graph input; these tensors are UINT8 too: {', '.join(uint8[:5])}")
    return problems


def _nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every node, subgraphs (If/Loop bodies) included."""
    found = []

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            found.append(node)
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    walk(attribute.g)
                for sub in attribute.graphs:
                    walk(sub)

    walk(model.graph)
    return found


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - a graph inference cannot type is checked on what it declares
        inferred = model
    values = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    return types


def _attr(node: onnx.NodeProto, name: str) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return None
