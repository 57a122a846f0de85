"""The Open Inference Protocol's (KServe v2, Triton HTTP) inference request and response for
the one model `vitdeploy serve` serves, with Triton's binary tensor data and classification
extensions. No HTTP here: bytes and header values in, checked records out, so every refusal
is made (and tested) before anything is queued or allocated by what a request claims.

A request carries one input, either
- a tensor in the served input contract (name `input`; UINT8 [N,3,S,S], or FP32 for an
  export without preprocessing in its graph), as JSON `data` (row-major, flat or nested) or
  binary data (`parameters.binary_data_size` bytes after the JSON header), or
- encoded images as BYTES, shape [N] or [N,1]: one JPEG/PNG/... file per element, which the
  server decodes as /v1/predict does (binary elements are 4-byte little-endian lengths, each
  followed by that many bytes; JSON elements are UTF-8 strings).
It may ask for the one output, `logits`, as JSON or binary (`binary_data`,
`binary_data_output`), or as its top K classes (`classification`: K), answered as Triton
does: BYTES strings "score:index:label" with the score the logit itself.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from vitdeploy.manifest import OUTPUT
from vitdeploy.serve.service import ApiError, parse_count
from vitdeploy.triton_model import DATATYPES

HEADER_LENGTH = "Inference-Header-Content-Length"
BYTES = "BYTES"
_NUMPY = {"UINT8": np.dtype("<u1"), "FP32": np.dtype("<f4"), "FP16": np.dtype("<f2")}


def bad(message: str) -> ApiError:
    return ApiError(400, message)


@dataclass(frozen=True)
class RequestedOutput:
    """How the answer is written: binary or JSON, and the top `classification` classes (0: the logits)."""

    binary: bool = False
    classification: int = 0


@dataclass(frozen=True)
class InferRequest:
    """A checked inference request: `rows` in the served input contract, or encoded `images`."""

    id: str | None
    rows: np.ndarray | None
    images: tuple[bytes, ...]
    output: RequestedOutput

    @property
    def count(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.images)


def parse_infer(body: bytes, header_length: str | None, contract: dict[str, Any], num_classes: int,
                max_items: int) -> InferRequest:
    """The request in `body` (`header_length`: the Inference-Header-Content-Length header, if sent) for a
    model whose input is `contract` (a manifest tensor record); at most `max_items` images."""
    header, binary = _split(body, header_length)
    request = _json_object(header)
    tensor = _one_input(request, contract["name"])
    parameters = _dict(request, "parameters", "the request")
    if parameters.get("sequence_id") not in (None, 0, ""):
        raise bad("this model is not a sequence model: send no sequence_id")
    datatype = tensor.get("datatype")
    shape = _shape(tensor.get("shape"))
    data = _data(tensor, binary)
    expected = DATATYPES[contract["dtype"]]
    if datatype == BYTES:
        images, rows = tuple(_byte_elements(data, _image_count(shape, max_items))), None
    elif datatype == expected:
        images, rows = (), _tensor(data, shape, expected, contract, max_items)
    else:
        raise bad(f"input {contract['name']!r} takes {expected} tensors of shape {_shape_text(contract)} or BYTES "
                  f"encoded images (got datatype {str(datatype)[:20]!r})")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad("id must be a string")
    return InferRequest(request_id, rows, images, _output(request, parameters, num_classes))


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary data) of the body."""
    if header_length is None:
        return body, b""
    length = parse_count(header_length.strip(), 1, len(body))
    if length is None:
        raise bad(f"{HEADER_LENGTH} must be the byte count of the JSON header, from 1 to the body's {len(body):,} bytes "
                  f"(got {header_length[:20]!r})")
    return body[:length], body[length:]


def _json_object(header: bytes) -> dict[str, Any]:
    try:
        request = json.loads(header, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise bad(f"the request header is not valid JSON ({str(exc)[:100]}); binary data needs {HEADER_LENGTH}") from None
    if not isinstance(request, dict):
        raise bad("the request must be a JSON object with 'inputs'")
    return request


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _dict(record: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = record.get(key, {})
    if not isinstance(value, dict):
        raise bad(f"{key} of {where} must be a JSON object")
    return value


def _one_input(request: dict[str, Any], name: str) -> dict[str, Any]:
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise bad(f"inputs must list exactly one tensor, the model's input {name!r}")
    tensor = inputs[0]
    if tensor.get("name") != name:
        raise bad(f"unknown input {str(tensor.get('name'))[:40]!r}: the model's one input is {name!r}")
    return tensor


def _shape(shape: Any) -> list[int]:
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)):
        raise bad("shape must be a list of 1 to 8 non-negative integers")
    return shape


def _data(tensor: dict[str, Any], binary: bytes) -> Any:
    """The input's binary data (checked against binary_data_size) or its JSON data."""
    parameters = _dict(tensor, "parameters", "the input")
    size = parameters.get("binary_data_size")
    if size is None:
        if binary:
            raise bad(f"{len(binary):,} bytes follow the JSON header, but the input has no binary_data_size")
        if "data" not in tensor:
            raise bad("the input has neither data nor parameters.binary_data_size")
        return tensor["data"]
    if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
        raise bad(f"binary_data_size is {str(size)[:20]} but {len(binary):,} bytes follow the JSON header")
    return binary


def _shape_text(contract: dict[str, Any]) -> str:
    return "[" + ",".join(["-1", *(str(d) for d in contract["shape"][1:])]) + "]"


def _image_count(shape: list[int], max_items: int) -> int:
    if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
        raise bad(f"BYTES images take shape [N] or [N,1] (got {shape})")
    return _count(shape[0], max_items)


def _count(n: int, max_items: int) -> int:
    if not 1 <= n <= max_items:
        raise bad(f"a request carries 1 to {max_items} images (got {n}); --max-images-per-request sets the limit")
    return n


def _byte_elements(data: Any, count: int) -> list[bytes]:
    """The `count` elements of a BYTES input."""
    if isinstance(data, bytes):
        return _binary_elements(data, count)
    flat = _flatten(data, 2)
    if len(flat) != count or not all(isinstance(e, str) for e in flat):
        raise bad(f"BYTES data must be {count} strings, as the shape says")
    return [e.encode("utf-8", "surrogatepass") for e in flat]


def _binary_elements(data: bytes, count: int) -> list[bytes]:
    elements, at = [], 0
    for i in range(count):
        if at + 4 > len(data):
            raise bad(f"BYTES element {i}'s 4-byte length is missing: the binary data ends at byte {len(data):,}")
        (size,) = struct.unpack_from("<I", data, at)
        at += 4
        if size > len(data) - at:
            raise bad(f"BYTES element {i} says {size:,} bytes, but {len(data) - at:,} remain")
        elements.append(data[at:at + size])
        at += size
    if at != len(data):
        raise bad(f"{len(data) - at:,} bytes follow the {count} BYTES elements the shape says")
    return elements


def _flatten(data: Any, depth: int) -> list[Any]:
    if not isinstance(data, list):
        raise bad("data must be a JSON list")
    if depth > 1 and any(isinstance(e, list) for e in data):
        return [x for e in data for x in _flatten(e if isinstance(e, list) else [e], depth - 1)]
    return data


def _tensor(data: Any, shape: list[int], datatype: str, contract: dict[str, Any], max_items: int) -> np.ndarray:
    """The input tensor as an array of the contract's dtype and shape."""
    if len(shape) != len(contract["shape"]) or shape[1:] != list(contract["shape"][1:]):
        raise bad(f"input {contract['name']!r} has shape {_shape_text(contract)} (got {shape})")
    _count(shape[0], max_items)
    dtype = _NUMPY[datatype]
    size = int(np.prod(shape)) * dtype.itemsize
    if isinstance(data, bytes):
        if len(data) != size:
            raise bad(f"{datatype} {shape} is {size:,} bytes, but the binary data is {len(data):,}")
        return _finite(np.frombuffer(data, dtype).reshape(shape))
    try:
        values = np.asarray(data)
    except ValueError:
        raise bad("data must be a flat or evenly nested list of numbers") from None
    if values.size != size // dtype.itemsize or values.dtype.kind not in ("iu" if datatype == "UINT8" else "iuf"):
        raise bad(f"data must be {size // dtype.itemsize:,} {'integers' if datatype == 'UINT8' else 'numbers'}, "
                  f"as {datatype} {shape} says")
    if datatype == "UINT8" and (values.min() < 0 or values.max() > 255):
        raise bad("UINT8 data must be integers from 0 to 255")
    return _finite(values.astype(dtype).reshape(shape))


def _finite(tensor: np.ndarray) -> np.ndarray:
    if tensor.dtype.kind == "f" and not np.isfinite(tensor).all():
        raise bad("the input holds NaN or infinite values")
    return tensor


def _output(request: dict[str, Any], parameters: dict[str, Any], num_classes: int) -> RequestedOutput:
    binary = _bool(parameters, "binary_data_output", False)
    outputs = request.get("outputs")
    if outputs is None or outputs == []:
        return RequestedOutput(binary)
    if not isinstance(outputs, list) or len(outputs) != 1 or not isinstance(outputs[0], dict):
        raise bad(f"outputs must list at most one tensor, the model's output {OUTPUT!r}")
    if outputs[0].get("name") != OUTPUT:
        raise bad(f"unknown output {str(outputs[0].get('name'))[:40]!r}: the model's one output is {OUTPUT!r}")
    options = _dict(outputs[0], "parameters", "the output")
    k = options.get("classification", 0)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise bad(f"classification must be a count of classes, 0 or more (got {str(k)[:20]})")
    return RequestedOutput(_bool(options, "binary_data", binary), min(k, num_classes))  # more than there are: all, as Triton


def _bool(parameters: dict[str, Any], key: str, default: bool) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise bad(f"{key} must be true or false")
    return value


def encode_response(model: str, version: str, request_id: str | None, logits: np.ndarray, output: RequestedOutput,
                    classes: list[str]) -> tuple[bytes, int | None]:
    """(body, the JSON header's length when binary data follows it) of the answer."""
    if output.classification:
        order = np.argsort(-logits, axis=1, kind="stable")[:, :output.classification]
        labels = [[f"{row[i]:f}:{i}:{classes[i]}" for i in picks] for row, picks in zip(logits, order, strict=True)]
        entry: dict[str, Any] = {"name": OUTPUT, "datatype": BYTES, "shape": [len(logits), output.classification]}
        data: Any = [s for row in labels for s in row]
        raw = b"".join(struct.pack("<I", len(b)) + b for b in (s.encode("utf-8") for s in data))
    else:
        entry = {"name": OUTPUT, "datatype": "FP32", "shape": list(logits.shape)}
        data = logits.astype(np.float64).ravel().tolist()
        raw = np.ascontiguousarray(logits, dtype="<f4").tobytes()
    entry = {**entry, "parameters": {"binary_data_size": len(raw)}} if output.binary else {**entry, "data": data}
    header = {"model_name": model, "model_version": version, **({"id": request_id} if request_id is not None else {}),
              "outputs": [entry]}
    text = json.dumps(header, allow_nan=False).encode()
    return (text + raw, len(text)) if output.binary else (text, None)
