"""The TensorRT builder's decisions, driven against stand-ins shaped like the TensorRT 10
and 11 Python APIs. They check what vitdeploy asks of TensorRT, not TensorRT itself:
the `trt`-marked tests at the end run the real thing on GPU machines (none here)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from vitdeploy.errors import VitDeployError
from vitdeploy import tensorrt_runtime as trt_runtime
from vitdeploy.export import tensorrt as trt_export


class FakeTensorRT:
    """A stand-in `tensorrt` module that records every call the builder makes."""

    def __init__(self, version: str, fp16_flag: bool, strongly_typed_flag: bool, parse_ok: bool = True, build_ok: bool = True) -> None:
        self.__version__ = version
        self.calls: list[tuple] = []
        flags = {"EXPLICIT_BATCH": 0}
        if strongly_typed_flag:
            flags["STRONGLY_TYPED"] = 5
        self.NetworkDefinitionCreationFlag = SimpleNamespace(**flags)
        builder_flags = {"VERSION_COMPATIBLE": "VERSION_COMPATIBLE", "TF32": "TF32"}
        if fp16_flag:
            builder_flags["FP16"] = "FP16"
        self.BuilderFlag = SimpleNamespace(**builder_flags)
        self.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
        self.HardwareCompatibilityLevel = SimpleNamespace(AMPERE_PLUS="AMPERE_PLUS")
        fake = self

        class Logger:
            WARNING = "WARNING"

            def __init__(self, level: str) -> None:
                self.level = level

        class TimingCache:
            def serialize(self) -> bytes:
                return b"cache-after-build"

        class Config:
            hardware_compatibility_level = None

            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("set_memory_pool_limit", pool, size))

            def create_timing_cache(self, data):
                fake.calls.append(("create_timing_cache", bytes(data)))
                return TimingCache()

            def set_timing_cache(self, cache, ignore_mismatch):
                fake.calls.append(("set_timing_cache", ignore_mismatch))
                return True

            def get_timing_cache(self):
                return TimingCache()

            def add_optimization_profile(self, profile):
                fake.calls.append(("add_optimization_profile", profile.shapes))

            def set_flag(self, flag):
                fake.calls.append(("set_flag", flag))

        class Profile:
            def __init__(self) -> None:
                self.shapes = {}

            def set_shape(self, name, min_shape, opt_shape, max_shape):
                self.shapes[name] = (tuple(min_shape), tuple(opt_shape), tuple(max_shape))

        class Builder:
            def __init__(self, logger) -> None:
                self.config = Config()

            def create_network(self, flags=0):
                fake.calls.append(("create_network", flags))
                return SimpleNamespace()

            def create_builder_config(self):
                return self.config

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build_serialized_network", config.hardware_compatibility_level))
                return b"serialized-engine" if build_ok else None

        class OnnxParser:
            def __init__(self, network, logger) -> None:
                self.num_errors = 0 if parse_ok else 1

            def parse_from_file(self, path):
                fake.calls.append(("parse_from_file", path))
                return parse_ok

            def get_error(self, index):
                return "Unsupported ONNX op: Attention"

        class Runtime:
            def __init__(self, logger) -> None:
                pass

            def deserialize_cuda_engine(self, data):
                return None

        self.Logger, self.Builder, self.OnnxParser, self.Runtime = Logger, Builder, OnnxParser, Runtime

    def called(self, name: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == name]


def build(fake: FakeTensorRT, tmp_path: Path, **options) -> bytes:
    settings = dict(min_batch=1, opt_batch=16, max_batch=64, workspace_bytes=1 << 30, timing_cache=tmp_path / "timing.cache")
    settings.update(options)
    return trt_export.build_engine(fake, tmp_path / "model_fp16.onnx", "input", (16, 3, 32, 32), trt_export.BuildOptions(**settings))


@pytest.mark.parametrize("version, fp16_flag, strongly_typed_flag, expected_flags", [
    ("10.13.0", True, True, 1 << 5),   # TensorRT 10: opt in to strong typing
    ("11.4.0", False, True, 1 << 5),   # TensorRT 11 accepts the flag (and ignores it)
    ("11.4.0", False, False, 0),       # a TensorRT 11 without the flag is strongly typed anyway
])
def test_strongly_typed_network_and_no_precision_flag(tmp_path: Path, version, fp16_flag, strongly_typed_flag, expected_flags) -> None:
    fake = FakeTensorRT(version, fp16_flag, strongly_typed_flag)
    (tmp_path / "timing.cache").write_bytes(b"cache-from-earlier-builds")
    assert build(fake, tmp_path) == b"serialized-engine"
    assert fake.called("create_network") == [("create_network", expected_flags)]
    assert not [c for c in fake.called("set_flag") if c[1] == "FP16"]  # precision comes from the ONNX types only
    assert fake.called("parse_from_file") == [("parse_from_file", str(tmp_path / "model_fp16.onnx"))]
    assert fake.called("set_memory_pool_limit") == [("set_memory_pool_limit", "WORKSPACE", 1 << 30)]
    # The timing cache is loaded from the file, used strictly, and saved back for the next build.
    assert fake.called("create_timing_cache") == [("create_timing_cache", b"cache-from-earlier-builds")]
    assert fake.called("set_timing_cache") == [("set_timing_cache", False)]
    assert (tmp_path / "timing.cache").read_bytes() == b"cache-after-build"
    assert fake.called("add_optimization_profile") == [
        ("add_optimization_profile", {"input": ((1, 3, 32, 32), (16, 3, 32, 32), (64, 3, 32, 32))})
    ]


def test_first_build_starts_an_empty_timing_cache(tmp_path: Path) -> None:
    fake = FakeTensorRT("11.4.0", False, True)
    build(fake, tmp_path)
    assert fake.called("create_timing_cache") == [("create_timing_cache", b"")]
    assert (tmp_path / "timing.cache").is_file()


def test_tensorrt_without_strong_typing_is_refused(tmp_path: Path) -> None:
    fake = FakeTensorRT("8.6.1", True, False)
    with pytest.raises(VitDeployError, match="TensorRT 8.6.1 cannot build strongly typed networks.*10.x or 11.x"):
        build(fake, tmp_path)
    assert not fake.called("build_serialized_network")


def test_compatibility_options(tmp_path: Path) -> None:
    fake = FakeTensorRT("10.13.0", True, True)
    build(fake, tmp_path, hardware_compatible=True, version_compatible=True)
    assert fake.called("build_serialized_network") == [("build_serialized_network", "AMPERE_PLUS")]
    assert ("set_flag", "VERSION_COMPATIBLE") in fake.calls


def test_parse_and_build_failures_are_clear(tmp_path: Path) -> None:
    with pytest.raises(VitDeployError, match="could not parse model_fp16.onnx: Unsupported ONNX op: Attention"):
        build(FakeTensorRT("11.4.0", False, True, parse_ok=False), tmp_path)
    with pytest.raises(VitDeployError, match="failed to build an engine"):
        build(FakeTensorRT("11.4.0", False, True, build_ok=False), tmp_path)


def test_engine_for_another_version_or_gpu_is_refused_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trt_runtime, "current_gpu", lambda: {"gpu": "NVIDIA H100", "compute_capability": "9.0"})
    fake = FakeTensorRT("11.4.0", False, True)
    record = {"tensorrt_version": "10.13.0", "gpu": "NVIDIA H100", "compute_capability": "9.0"}
    with pytest.raises(VitDeployError, match="built with TensorRT 10.13.0, this is 11.4.0; rebuild"):
        trt_runtime.deserialize(fake, b"x", record)
    record = {"tensorrt_version": "11.4.0", "gpu": "NVIDIA A10", "compute_capability": "8.6"}
    with pytest.raises(VitDeployError, match="built for NVIDIA A10 .*8.6.*this GPU is NVIDIA H100 .*rebuild"):
        trt_runtime.deserialize(fake, b"x", record)
    # A hardware-compatible engine may move; TensorRT's own None answer still becomes a clear error.
    with pytest.raises(VitDeployError, match="TensorRT could not load the engine"):
        trt_runtime.deserialize(fake, b"x", {**record, "hardware_compatible": True})


@pytest.mark.trt
def test_real_tensorrt_engine_from_fp16_onnx(tmp_path: Path, cifar_root: Path) -> None:
    """On a GPU machine with TensorRT: export builds, checks and verifies a real engine."""
    from vitdeploy.export.artifacts import ExportOptions, export_artifacts
    from vitdeploy.train import TrainConfig, run_training

    run = tmp_path / "run"
    run_training(TrainConfig.from_options("vit_cifar_tiny", data_dir=str(cifar_root), out=str(run), epochs=1, batch_size=16,
                                          val_size=40, max_steps=4))
    manifest = export_artifacts(ExportOptions(source=run, out=tmp_path / "art", fp16=True, max_batch=16, data_dir=cifar_root,
                                              timing_cache=tmp_path / "timing.cache"), say=print)
    engine = next(a for a in manifest["artifacts"] if a["kind"] == "tensorrt")
    assert engine["status"] == "passed" and engine["precision"] == "fp16"
    assert {t["name"] for t in engine["io"]} == {"input", "logits"}
    assert (tmp_path / "timing.cache").stat().st_size > 0
