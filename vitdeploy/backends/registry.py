"""Every inference backend vitdeploy has, one entry each: the artifact it runs, the
precisions it runs, which INT8 graph it takes, whether it can time inputs already on the
device or replay CUDA graphs, whether it runs on this machine (and why not), and how to
open it. The factory, bench, `vitdeploy info`, the manifest look-up and the CLI choices
all read this table; adding a backend is one module (with `probe` and `open_for`) and
one entry here.

Backend modules (and torch) are imported only when an entry is probed, opened or asked
about this machine, so that the CLI can build its choices from this table cheaply and a
machine without ONNX Runtime, TensorRT or OpenVINO can still list and run the others.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from vitdeploy.choices import EXPORTED_PRECISIONS
from vitdeploy.errors import VitDeployError


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _pytorch() -> ModuleType:
    from vitdeploy.backends import pytorch

    return pytorch


def _ort() -> ModuleType:
    from vitdeploy.backends import ort

    return ort


def _trt() -> ModuleType:
    from vitdeploy.backends import trt

    return trt


def _openvino() -> ModuleType:
    from vitdeploy.backends import openvino

    return openvino


@dataclass(frozen=True)
class BackendEntry:
    """One backend: what it runs and what it can do.

    `kind` is the artifact it runs ('checkpoint' for the training weights, 'onnx',
    'tensorrt'); `gpu_precisions` are those it runs only with a CUDA GPU; `int8_target`
    names the exported INT8 graph it runs ('cpu' or 'tensorrt', None: no INT8);
    `refuses` says why it does not run a precision and what to use instead.
    """

    name: str
    kind: str
    precisions: tuple[str, ...]
    module: Callable[[], ModuleType] = field(repr=False)
    gpu_precisions: tuple[str, ...] = ()
    int8_target: str | None = None
    device_mode: bool = False  # can time inputs already on a CUDA device
    cuda_graph: bool = False  # can replay CUDA graphs
    refuses: Mapping[str, str] = field(default_factory=dict)
    summary: str = ""

    def probe(self) -> tuple[bool, str]:
        """(usable here, one line saying which runtime, or why not)."""
        return self.module().probe(self)

    def open(self, request: Any) -> Any:
        """The backend for `request` (a `base.OpenRequest`), not yet activated."""
        return self.module().open_for(self, request)

    def precisions_here(self) -> tuple[str, ...]:
        """The precisions it can run on this machine (before looking at what was exported)."""
        cuda = _cuda()
        return tuple(p for p in self.precisions if cuda or p not in self.gpu_precisions)

    def device_mode_here(self) -> bool:
        """Whether it can be timed with inputs already on the device, on this machine."""
        return self.device_mode and _cuda()

    def cuda_graph_here(self) -> bool:
        return self.cuda_graph and _cuda()

    def why_not(self, precision: str) -> str:
        """Why this backend does not run `precision` here (for precisions outside `precisions_here`)."""
        if precision in self.refuses:
            reason = self.refuses[precision].format(int8_backends=", ".join(INT8_BACKENDS))
            return reason if reason.startswith(self.name) else f"{self.name} {precision}: {reason}"
        if precision in self.gpu_precisions:
            return f"{self.name} {precision}: needs a CUDA GPU (use fp32 here)"
        return f"{self.name} does not run {precision}"


_INT8_ELSEWHERE = "INT8 runs on {int8_backends}"  # filled in from the table by `why_not`
_BF16_ONLY_PYTORCH = "bf16 runs only on --backend pytorch (with a GPU); the exported files are fp32, fp16 or int8"

BACKENDS: tuple[BackendEntry, ...] = (
    BackendEntry("pytorch", "checkpoint", ("fp32", "fp16", "bf16"), _pytorch, gpu_precisions=("fp16", "bf16"),
                 device_mode=True, cuda_graph=True,
                 refuses={"int8": f"the pytorch backend has no INT8 path; {_INT8_ELSEWHERE} (--backend ort-cpu --precision int8)"},
                 summary="the training checkpoint in PyTorch: the reference"),
    BackendEntry("ort-cpu", "onnx", EXPORTED_PRECISIONS, _ort, int8_target="cpu",
                 refuses={"bf16": _BF16_ONLY_PYTORCH}, summary="ONNX Runtime, CPU provider"),
    BackendEntry("ort-cuda", "onnx", ("fp32", "fp16"), _ort, device_mode=True, cuda_graph=True,
                 refuses={"int8": "ort-cuda does not run INT8: ONNX Runtime's CUDA provider runs these quantized graphs no "
                                  "faster than fp16; use {int8_backends} for INT8, or ort-cuda with fp16",
                          "bf16": _BF16_ONLY_PYTORCH},
                 summary="ONNX Runtime, CUDA provider (I/O binding to device buffers)"),
    BackendEntry("ort-trt", "onnx", EXPORTED_PRECISIONS, _ort, int8_target="tensorrt", device_mode=True,
                 refuses={"bf16": _BF16_ONLY_PYTORCH}, summary="ONNX Runtime, TensorRT provider (every node in TensorRT)"),
    BackendEntry("trt", "tensorrt", EXPORTED_PRECISIONS, _trt, int8_target="tensorrt", device_mode=True, cuda_graph=True,
                 refuses={"bf16": _BF16_ONLY_PYTORCH}, summary="a TensorRT engine built by export"),
    BackendEntry("openvino", "onnx", EXPORTED_PRECISIONS, _openvino, int8_target="tensorrt",
                 refuses={"bf16": _BF16_ONLY_PYTORCH},
                 summary="OpenVINO on the CPU (inference precision set to f32, never chosen by the CPU)"),
)

NAMES: tuple[str, ...] = tuple(b.name for b in BACKENDS)
DEFAULT = "ort-cpu"  # what predict and serve run when no --backend is given
INT8_BACKENDS: tuple[str, ...] = tuple(b.name for b in BACKENDS if b.int8_target)
GRAPH_BACKENDS: tuple[str, ...] = tuple(b.name for b in BACKENDS if b.cuda_graph)


def get(name: str) -> BackendEntry:
    """The entry of backend `name`, or an error listing the choices."""
    for entry in BACKENDS:
        if entry.name == name:
            return entry
    raise VitDeployError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")


def parse_backends(text: str, allow_all: bool = True) -> tuple[str, ...]:
    """Backend names from a --backend value: one name, a comma-separated list, or `all`."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise VitDeployError(f"--backend needs a name: {'all, ' if allow_all else ''}{', '.join(NAMES)}")
    if "all" in names and allow_all:
        return ("all",)
    for name in names:
        if name not in NAMES:
            raise VitDeployError(f"unknown backend {name!r}; choose from {'all, ' if allow_all else ''}{', '.join(NAMES)}")
    if not allow_all and len(names) > 1:
        raise VitDeployError(f"--backend takes one backend here, not {len(names)}; name one of {', '.join(NAMES)} "
                             "(bench compares several)")
    return names


def check_cuda_graph(name: str, cuda_graph: bool) -> None:
    """Refuse --cuda-graph for a backend that cannot replay graphs here (before anything is loaded)."""
    if cuda_graph and not get(name).cuda_graph_here():
        where = "runs on the CPU here" if get(name).cuda_graph else "is not one of them"
        raise VitDeployError(f"--cuda-graph is for the GPU backends {', '.join(GRAPH_BACKENDS)}; {name} {where}")


@dataclass(frozen=True)
class BackendStatus:
    """Whether an inference backend can run on this machine, and why not."""

    name: str
    usable: bool
    reason: str


def statuses(names: tuple[str, ...] = NAMES) -> list[BackendStatus]:
    """Each backend in `names`: usable here, or the reason it is not."""
    return [BackendStatus(name, *get(name).probe()) for name in names]
