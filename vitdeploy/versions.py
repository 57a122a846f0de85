"""Facts about this machine that results are recorded with: package versions, devices,
and which inference backends can run here (or the one-line reason why not)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch

from vitdeploy import __version__

# Distribution names that provide each importable package, first match wins.
_DISTRIBUTIONS = {
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime-gpu", "onnxruntime"),
    "tensorrt": ("tensorrt-cu13", "tensorrt-cu12", "tensorrt", "tensorrt-cu13-bindings", "tensorrt-cu12-bindings"),
}


def package_version(package: str) -> str | None:
    """Installed version of `package` (by distribution metadata, without importing it)."""
    for dist in _DISTRIBUTIONS.get(package, (package,)):
        try:
            return f"{metadata.version(dist)} ({dist})" if dist != package else metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict[str, str | None]:
    """Versions of vitdeploy, Python and the packages its results depend on."""
    record: dict[str, str | None] = {"vitdeploy": __version__, "python": platform.python_version()}
    record.update({name: package_version(name) for name in _DISTRIBUTIONS})
    record["torch"] = torch.__version__  # the running build, including its CUDA tag
    record["cuda_runtime"] = torch.version.cuda
    return record


def cuda_devices() -> list[dict[str, Any]]:
    """Name, compute capability and memory of every CUDA device PyTorch sees."""
    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append({
            "index": index,
            "name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
        })
    return devices


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "neon", "asimd")


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far in MiB (Linux's ru_maxrss), None where it is not available."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def cpu_name() -> str:
    """The processor's model name (Linux /proc/cpuinfo), else what the platform module knows."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The instruction-set flags of this CPU (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def device_record(device: torch.device) -> dict[str, Any]:
    """What a measurement ran on."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return {
            "type": "cuda",
            "name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "driver": _nvidia_driver(),
        }
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "cores": os.cpu_count()}


def _nvidia_driver() -> str | None:
    try:
        with open("/proc/driver/nvidia/version") as f:
            return f.readline().strip()
    except OSError:
        return None


@dataclass(frozen=True)
class BackendStatus:
    """Whether an inference backend can run on this machine, and why not."""

    name: str
    usable: bool
    reason: str


def _ort_status(provider: str) -> tuple[bool, str]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return False, f"onnxruntime is not installed ({exc}); pip install onnxruntime-gpu"
    available = ort.get_available_providers()
    if provider not in available:
        return False, f"ONNX Runtime {ort.__version__} has no {provider} (available: {', '.join(available)})"
    if provider == "CPUExecutionProvider":
        return True, f"ONNX Runtime {ort.__version__}"
    if not torch.cuda.is_available():
        return False, f"ONNX Runtime {ort.__version__} lists {provider} but there is no CUDA GPU"
    # Listing a provider does not mean its libraries load: open a session and look.
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = min(model.ir_version, 10)
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=[provider])
    except Exception as exc:  # noqa: BLE001 - any failure means unusable, and we say why
        return False, f"creating a {provider} session failed: {str(exc).splitlines()[0]}"
    if provider not in session.get_providers():
        return False, f"ONNX Runtime fell back to {', '.join(session.get_providers())}: the CUDA libraries did not load"
    return True, f"ONNX Runtime {ort.__version__} on {torch.cuda.get_device_name(0)}"


def _trt_status() -> tuple[bool, str]:
    try:
        import tensorrt as trt
    except ImportError:
        return False, "TensorRT is not installed; pip install 'vitdeploy[trt]' on a machine with an NVIDIA GPU"
    if not torch.cuda.is_available():
        return False, f"TensorRT {trt.__version__} is installed but there is no CUDA GPU"
    return True, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name(0)}"


def backend_statuses() -> list[BackendStatus]:
    """pytorch, ort-cpu, ort-cuda, ort-trt and trt: usable here, or the reason they are not."""
    cuda = torch.cuda.is_available()
    statuses = [BackendStatus("pytorch", True, f"torch {torch.__version__} on {'CUDA and CPU' if cuda else 'CPU only'}")]
    for name, provider in (("ort-cpu", "CPUExecutionProvider"), ("ort-cuda", "CUDAExecutionProvider"),
                           ("ort-trt", "TensorrtExecutionProvider")):
        usable, reason = _ort_status(provider)
        statuses.append(BackendStatus(name, usable, reason))
    usable, reason = _trt_status()
    statuses.append(BackendStatus("trt", usable, reason))
    return statuses
