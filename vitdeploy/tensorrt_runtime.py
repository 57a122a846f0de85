"""TensorRT at run time, shared by export (which builds and verifies engines) and the trt
backend (which runs them): importing TensorRT with a clear error where it is missing,
and loading an engine only on the TensorRT version and GPU it was built for.

An engine only runs on the TensorRT version and GPU it was built for unless it was built
hardware- or version-compatible, so the build is recorded next to it and checked before
loading: `deserialize_cuda_engine` returns None and only logs on a mismatch.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from vitdeploy.errors import VitDeployError

Profile = tuple[int, int, int]  # (min, opt, max) batch sizes of one optimization profile


def import_tensorrt() -> ModuleType:
    """The tensorrt module, or a clear error saying how to get it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise VitDeployError(
            "TensorRT is not installed here; on a machine with an NVIDIA GPU: pip install 'vitdeploy[trt]' "
            "(the CUDA 13 TensorRT wheels from NVIDIA's index)"
        ) from exc
    return tensorrt


def major_version(trt: ModuleType) -> int:
    return int(str(trt.__version__).split(".")[0])


def current_gpu() -> dict[str, str]:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def check_compatible(record: dict[str, Any], trt: ModuleType) -> None:
    """Refuse an engine built for another TensorRT version or GPU, before TensorRT sees it."""
    here = current_gpu()
    fix = "rebuild it here with `vitdeploy export ... --trt`"
    if record["tensorrt_version"] != trt.__version__ and not record.get("version_compatible"):
        raise VitDeployError(f"the engine was built with TensorRT {record['tensorrt_version']}, this is {trt.__version__}; {fix}")
    if record["compute_capability"] != here["compute_capability"] and not record.get("hardware_compatible"):
        raise VitDeployError(
            f"the engine was built for {record['gpu']} (compute capability {record['compute_capability']}), "
            f"this GPU is {here['gpu']} ({here['compute_capability']}); {fix}"
        )


def deserialize(trt: ModuleType, data: bytes, record: dict[str, Any]) -> Any:
    """The ICudaEngine, after the version/GPU check; None from TensorRT becomes a clear error."""
    check_compatible(record, trt)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    if record.get("version_compatible"):
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise VitDeployError("TensorRT could not load the engine (see its log above); rebuild it with `vitdeploy export ... --trt`")
    return engine


def choose_profile(profiles: list[dict[str, int]], batch: int) -> int | None:
    """Index of the narrowest optimization profile whose range holds `batch` (None if none does).

    Narrow profiles are tuned closer to the batch they run (TensorRT picks kernels for the
    profile's opt size), so a batch of 1 runs the 1:1:1 profile when there is one."""
    fitting = [(p["max"] - p["min"], p["max"], i) for i, p in enumerate(profiles) if p["min"] <= batch <= p["max"]]
    return min(fitting)[2] if fitting else None


def default_profiles(min_batch: int, max_batch: int) -> tuple[Profile, ...]:
    """One profile for latency (1:1:1) and one for throughput (2:min(32, max):max), within the
    exported batch range: a wide profile costs latency at batch 1, a narrow one cannot batch."""
    profiles: list[Profile] = []
    if min_batch <= 1:
        profiles.append((1, 1, 1))
    low = max(2, min_batch)
    if low <= max_batch:
        profiles.append((low, min(max(32, low), max_batch), max_batch))
    return tuple(profiles)
