"""Facts about this machine that results are recorded with: package versions, devices and
the CPU (which backends run here is each backend's own probe, see `backends.registry`)."""

from __future__ import annotations

import os
import platform
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
    "openvino": ("openvino",),
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
