"""The TensorRT builder's decisions, driven against stand-ins shaped like the TensorRT 10
and 11 Python APIs. They check what vitdeploy asks of TensorRT, not TensorRT itself:
the `trt`-marked tests at the end run the real thing on GPU machines (none here)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from vitdeploy import tensorrt_runtime as trt_runtime
from vitdeploy.errors import VitDeployError
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
    settings = dict(profiles=((1, 1, 1), (2, 16, 64)), workspace_bytes=1 << 30, timing_cache=tmp_path / "timing.cache")
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
        ("add_optimization_profile", {"input": ((1, 3, 32, 32), (1, 3, 32, 32), (1, 3, 32, 32))}),
        ("add_optimization_profile", {"input": ((2, 3, 32, 32), (16, 3, 32, 32), (64, 3, 32, 32))}),
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
    assert engine["profiles"] == [{"min": 1, "opt": 1, "max": 1}, {"min": 2, "opt": 16, "max": 16}]
    from vitdeploy.backends.factory import open_backend
    from vitdeploy.backends.ort import OrtBackend
    from vitdeploy.data import load_test

    images = load_test(cifar_root).images[:9].numpy()
    with OrtBackend(tmp_path / "art" / "model.onnx") as ort_cpu, open_backend(tmp_path / "art", manifest, "trt", "fp16") as trt:
        for batch in (images[:1], images):  # the 1:1:1 profile, then the 2:16:16 one
            np.testing.assert_allclose(trt.infer(batch), ort_cpu.infer(batch), atol=0.1)
            assert trt.last_profile == (0 if len(batch) == 1 else 1)
    assert (tmp_path / "timing.cache").stat().st_size > 0


# -- optimization profiles --------------------------------------------------------------------


@pytest.mark.parametrize(("lo", "hi", "expected"), [
    (1, 256, ((1, 1, 1), (2, 32, 256))),
    (1, 16, ((1, 1, 1), (2, 16, 16))),
    (1, 1, ((1, 1, 1),)),
    (4, 8, ((4, 8, 8),)),
    (1, 2, ((1, 1, 1), (2, 2, 2))),
])
def test_default_profiles(lo: int, hi: int, expected: tuple) -> None:
    assert trt_export.default_profiles(lo, hi) == expected
    trt_export.check_profiles(expected, lo, hi)


@pytest.mark.parametrize(("profiles", "message"), [
    (((4, 2, 8),), "MIN <= OPT <= MAX"),
    (((1, 1, 512),), "outside the exported batch range 1..256"),
    ((), "1 to 16"),
])
def test_bad_profiles_are_refused(profiles: tuple, message: str) -> None:
    with pytest.raises(VitDeployError, match=message):
        trt_export.check_profiles(profiles, 1, 256)


def test_the_narrowest_profile_holding_the_batch_is_chosen() -> None:
    profiles = [{"min": 2, "opt": 32, "max": 256}, {"min": 1, "opt": 1, "max": 1}, {"min": 8, "opt": 8, "max": 16}]
    assert [trt_runtime.choose_profile(profiles, b) for b in (1, 2, 8, 16, 17, 256, 257)] == [1, 0, 2, 2, 0, 0, None]


class FakeEngine:
    """An ICudaEngine stand-in with several profiles; contexts record what they are asked."""

    def __init__(self, profiles: int) -> None:
        self.num_optimization_profiles = profiles
        self.device_memory_size_v2 = 4096
        self.contexts: list[SimpleNamespace] = []

    def create_execution_context(self, strategy=None):
        calls: list[tuple] = [("create", strategy)]
        context = SimpleNamespace(calls=calls)
        context.set_device_memory = lambda ptr, size: calls.append(("memory", ptr, size))
        context.set_optimization_profile_async = lambda index, stream: calls.append(("profile", index, stream)) or True
        self.contexts.append(context)
        return context


def test_one_context_per_profile_sharing_one_memory_block(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from vitdeploy.backends import trt as trt_backend

    for version, has_strategy in (("10.13.0", True), ("11.4.0", True), ("10.0.1", False)):
        fake = FakeTensorRT(version, False, True)
        if has_strategy:
            fake.ExecutionContextAllocationStrategy = SimpleNamespace(USER_MANAGED="USER_MANAGED")
        engine = FakeEngine(2)
        monkeypatch.setattr(trt_backend, "import_tensorrt", lambda fake=fake: fake)
        monkeypatch.setattr(trt_backend, "deserialize", lambda trt, data, record, engine=engine: engine)
        (tmp_path / "m.plan").write_bytes(b"engine")
        allocations: list[int] = []
        stream = SimpleNamespace(cuda_stream=77, synchronize=lambda: None)
        record = {"profiles": [{"min": 1, "opt": 1, "max": 1}, {"min": 2, "opt": 32, "max": 256}]}
        backend = trt_backend.TrtBackend(tmp_path / "m.plan", record, stream_factory=lambda stream=stream: stream,
                                         allocate=lambda size, seen=allocations: seen.append(size) or SimpleNamespace(data_ptr=lambda: 1234))
        backend.activate()
        assert len(engine.contexts) == 2
        for index, context in enumerate(engine.contexts):
            assert ("profile", index, 77) in context.calls
            if has_strategy:
                assert context.calls[0] == ("create", "USER_MANAGED") and ("memory", 1234, 4096) in context.calls
            else:
                assert context.calls[0] == ("create", None)
        assert allocations == ([4096] if has_strategy else [])
        assert backend.context_for(1) is engine.contexts[0] and backend.last_profile == 0
        assert backend.context_for(100) is engine.contexts[1] and backend.describe()["last_profile"] == 1
        with pytest.raises(VitDeployError, match="outside every optimization profile.*1..1, 2..256"):
            backend.context_for(300)
        backend.deactivate()


def test_an_engine_whose_profiles_disagree_with_its_record_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from vitdeploy.backends import trt as trt_backend

    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: FakeTensorRT("11.4.0", False, True))
    monkeypatch.setattr(trt_backend, "deserialize", lambda *a: FakeEngine(1))
    (tmp_path / "m.plan").write_bytes(b"engine")
    backend = trt_backend.TrtBackend(tmp_path / "m.plan", {"profiles": [{"min": 1, "opt": 1, "max": 1}] * 2},
                                     stream_factory=lambda: SimpleNamespace(cuda_stream=1, synchronize=lambda: None))
    with pytest.raises(VitDeployError, match="1 optimization profiles, its record 2"):
        backend.activate()


def test_cli_profile_errors_are_one_line(trained: Path, cifar_root: Path, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    for value, message in (("4:2:8", "MIN <= OPT <= MAX"), ("1:1:999", "outside the exported batch range"), ("1-2-3", "MIN:OPT:MAX")):
        result = run_cli("export", str(trained), "--out", str(tmp_path / "art"), "--trt-profile", value, "--max-batch", "16",
                         "--data-dir", str(cifar_root))
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "art").exists()
