"""TensorRT engines from the exported ONNX, for TensorRT 10 and 11.

Precision comes from the ONNX types only: the network is created strongly typed
(`NetworkDefinitionCreationFlag.STRONGLY_TYPED` where it exists; TensorRT 11 is always
strongly typed and accepts or lacks the flag), and no precision builder flag is ever set
(`BuilderFlag.FP16` is gone in 11 and would make 10 pick layer precisions itself). A
TensorRT that cannot build strongly typed networks is refused. An engine only runs on
the TensorRT version and GPU it was built for unless built hardware- or
version-compatible, so the build is recorded next to it and checked before loading:
`deserialize_cuda_engine` returns None and only logs on a mismatch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from vitdeploy.errors import VitDeployError


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


def network_flags(trt: ModuleType) -> int:
    """Creation flags for a strongly typed network, or a clear refusal."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is not None:
        return 1 << int(flag)
    if major_version(trt) >= 11:
        return 0  # strong typing is unconditional from TensorRT 11
    raise VitDeployError(
        f"TensorRT {trt.__version__} cannot build strongly typed networks, so it would choose layer precisions itself; "
        "install TensorRT 10.x or 11.x"
    )


@dataclass(frozen=True)
class BuildOptions:
    """Engine build settings. Batch bounds become the single optimization profile."""

    min_batch: int
    opt_batch: int
    max_batch: int
    workspace_bytes: int = 4 << 30
    timing_cache: Path | None = None
    hardware_compatible: bool = False
    version_compatible: bool = False


def build_engine(trt: ModuleType, onnx_path: Path, input_name: str, input_shape: tuple[int, ...], options: BuildOptions) -> bytes:
    """Parse the ONNX and build a serialized engine; the timing cache file is read and updated."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise VitDeployError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    cache_bytes = b""
    if options.timing_cache is not None and options.timing_cache.is_file():
        cache_bytes = options.timing_cache.read_bytes()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    rest = tuple(input_shape[1:])
    profile.set_shape(input_name, (options.min_batch, *rest), (options.opt_batch, *rest), (options.max_batch, *rest))
    config.add_optimization_profile(profile)
    if options.hardware_compatible:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise VitDeployError(f"TensorRT failed to build an engine from {onnx_path.name} (see the log above); try --workspace-gb larger")
    if options.timing_cache is not None:
        data = bytes(memoryview(config.get_timing_cache().serialize()))
        tmp = options.timing_cache.with_name(options.timing_cache.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, options.timing_cache)
    return bytes(memoryview(serialized))


def current_gpu() -> dict[str, str]:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def engine_io(engine: Any, trt: ModuleType) -> list[dict[str, Any]]:
    """Name, mode, dtype and (for inputs) profile-0 shape bounds of every I/O tensor."""
    records = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        record = {"name": name, "mode": "input" if is_input else "output", "dtype": str(engine.get_tensor_dtype(name)).split(".")[-1]}
        if is_input:
            record["profile"] = [list(shape) for shape in engine.get_tensor_profile_shape(name, 0)]
        records.append(record)
    return records


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
