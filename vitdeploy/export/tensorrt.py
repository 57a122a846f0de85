"""TensorRT engines from the exported ONNX, for TensorRT 10 and 11.

Precision comes from the ONNX types only: the network is created strongly typed
(`NetworkDefinitionCreationFlag.STRONGLY_TYPED` where it exists; TensorRT 11 is always
strongly typed and accepts or lacks the flag), and no precision builder flag is ever set
(`BuilderFlag.FP16` is gone in 11 and would make 10 pick layer precisions itself). A
TensorRT that cannot build strongly typed networks is refused. Loading engines (and the
version/GPU check before it) lives in `vitdeploy.tensorrt_runtime`, shared with the
trt backend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from vitdeploy.errors import VitDeployError
from vitdeploy.tensorrt_runtime import Profile, default_profiles, major_version  # noqa: F401 - re-exported


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


def check_profiles(profiles: tuple[Profile, ...], min_batch: int, max_batch: int) -> None:
    """Each --trt-profile is MIN <= OPT <= MAX inside the exported batch range; at most 16."""
    if not 1 <= len(profiles) <= 16:
        raise VitDeployError("give 1 to 16 --trt-profile values")
    for lo, opt, hi in profiles:
        if not lo <= opt <= hi:
            raise VitDeployError(f"--trt-profile {lo}:{opt}:{hi} must satisfy MIN <= OPT <= MAX")
        if lo < min_batch or hi > max_batch:
            raise VitDeployError(f"--trt-profile {lo}:{opt}:{hi} is outside the exported batch range {min_batch}..{max_batch}; "
                                 "widen --min-batch/--max-batch or narrow the profile")


@dataclass(frozen=True)
class BuildOptions:
    """Engine build settings; each profile becomes one optimization profile, in order."""

    profiles: tuple[Profile, ...]
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
    rest = tuple(input_shape[1:])
    for lo, opt, hi in options.profiles:
        profile = builder.create_optimization_profile()
        profile.set_shape(input_name, (lo, *rest), (opt, *rest), (hi, *rest))
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


def engine_io(engine: Any, trt: ModuleType) -> list[dict[str, Any]]:
    """Name, mode, dtype and (for inputs) the shape bounds of every profile, of every I/O tensor."""
    records = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        record = {"name": name, "mode": "input" if is_input else "output", "dtype": str(engine.get_tensor_dtype(name)).split(".")[-1]}
        if is_input:
            record["profiles"] = [[list(shape) for shape in engine.get_tensor_profile_shape(name, i)]
                                  for i in range(engine.num_optimization_profiles)]
        records.append(record)
    return records
