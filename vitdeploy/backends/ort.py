"""ONNX Runtime backends: `ort-cpu`; `ort-cuda`, which refuses to run if the session
silently fell back to the CPU and feeds the session through I/O binding to device buffers
(torch CUDA tensors), so that copies are explicit and device mode copies nothing; and
`ort-trt`, ONNX Runtime's TensorRT execution provider, which is refused unless every node
of the graph runs inside TensorRT (checked from ONNX Runtime's own profile)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch  # imported before onnxruntime: loads the CUDA libraries from the torch wheels before onnxruntime looks for them

from vitdeploy.backends import registry
from vitdeploy.backends.base import Backend, OpenRequest
from vitdeploy.backends.graphs import GraphSet, load_padded
from vitdeploy.errors import VitDeployError
from vitdeploy.manifest import artifact_path, find_artifact, tome_label

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "trt": "TensorrtExecutionProvider"}
TRT_CACHE = ".ort-trt-cache"  # engine and timing caches, inside the artifact folder


def _ort():  # noqa: ANN202 - the module
    try:
        import onnxruntime
    except ImportError as exc:
        raise VitDeployError("onnxruntime is not installed; pip install onnxruntime-gpu (or onnxruntime)") from exc
    return onnxruntime


def session_options(threads: int | None = None, optimization: str = "all") -> Any:
    """Session options: graph optimization level ('basic', 'extended', 'all') and intra-op threads."""
    ort = _ort()
    options = ort.SessionOptions()
    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options.graph_optimization_level = levels[optimization]
    if threads:
        options.intra_op_num_threads = threads
    return options


def probe(entry: Any) -> tuple[bool, str]:
    """Whether the provider of `entry` (ort-cpu, ort-cuda, ort-trt) runs here: listed, and for the
    GPU providers, a session that really uses it (listing a provider does not mean its libraries load)."""
    try:
        ort = _ort()
    except VitDeployError as exc:
        return False, str(exc)
    provider = PROVIDERS[entry.name.removeprefix("ort-")]
    available = ort.get_available_providers()
    if provider not in available:
        return False, f"ONNX Runtime {ort.__version__} has no {provider} (available: {', '.join(available)})"
    if provider == PROVIDERS["cpu"]:
        return True, f"ONNX Runtime {ort.__version__}"
    if not torch.cuda.is_available():
        return False, f"ONNX Runtime {ort.__version__} lists {provider} but there is no CUDA GPU"
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


def open_for(entry: Any, request: OpenRequest) -> OrtBackend:
    """A session on the request's ONNX file; ort-trt takes the engine's profiles (or the default ones)."""
    from vitdeploy.tensorrt_runtime import default_profiles
    from vitdeploy.versions import cpu_flags

    manifest, precision, artifact = request.manifest, request.precision, request.artifact
    if entry.name == "ort-cpu" and precision == "int8":
        required = artifact["int8"].get("cpu_int8_flags") or []
        if required and not (cpu_flags() & set(required)):
            request.say(f"warning: the INT8 graph was chosen for a CPU with {', '.join(required)}, which this CPU lacks: "
                        "it runs, but may be slower than fp32 here (re-export with --int8 on this kind of CPU)")
    engine = find_artifact(manifest, "tensorrt", precision, entry.int8_target, tome_label(artifact))
    profiles = engine["profiles"] if engine is not None else [
        {"min": lo, "opt": opt, "max": hi} for lo, opt, hi in default_profiles(manifest["batch"]["min"], manifest["batch"]["max"])]
    return OrtBackend(artifact_path(request.folder, artifact), entry.name.removeprefix("ort-"), threads=request.threads,
                      precision=precision, max_batch=manifest["batch"]["max"], trt_profiles=profiles,
                      input_shape=manifest["input"]["shape"], **request.graphs())


class OrtBackend(Backend):
    """An InferenceSession on one ONNX file with one execution provider."""

    def __init__(self, onnx_path: Path, device: str = "cpu", threads: int | None = None, precision: str = "fp32",
                 max_batch: int | None = None, trt_profiles: list[dict[str, int]] | None = None,
                 input_shape: list[Any] | None = None, cuda_graph: bool = False,
                 graph_buckets: tuple[int, ...] | None = None, say: Any = print) -> None:
        if device not in PROVIDERS:
            raise VitDeployError(f"unknown ONNX Runtime device {device!r}; use cpu, cuda or trt")
        self.name = f"ort-{device}"
        self.onnx_path = Path(onnx_path)
        self.device = device
        self.threads = threads
        # ONNX Runtime's CPU provider crashes (SIGSEGV, 1.31.1) building an all-fp16 ViT graph at the
        # "all" level, whose extra CPU layout passes gain nothing for fp16; fp16 on the CPU stops at "extended".
        self.optimization = "extended" if device == "cpu" and precision == "fp16" else "all"
        self.precision = precision
        self.max_batch = max_batch
        self.device_mode = device in ("cuda", "trt")
        self.trt_profiles = trt_profiles or []
        self.input_shape = input_shape
        self.provider_options: dict[str, str] = {}
        self.session = self.graph_session = None
        self.num_classes = 0
        self.graphs = None
        self.say = say
        if cuda_graph:
            if device != "cuda":
                raise VitDeployError(f"--cuda-graph is for the GPU backends {', '.join(registry.GRAPH_BACKENDS)}, not {self.name}")
            self.graphs = GraphSet("ort-cuda", self._static, CallGraph, graph_buckets, exact=True, say=say)

    def activate(self) -> None:
        ort = _ort()
        provider = PROVIDERS[self.device]
        if self.device != "cpu" and not torch.cuda.is_available():
            raise VitDeployError(f"{self.name} needs a CUDA GPU and PyTorch sees none here; use --backend ort-cpu")
        if provider not in ort.get_available_providers():
            raise VitDeployError(f"ONNX Runtime {ort.__version__} here has no {provider}; install onnxruntime-gpu on a CUDA machine")
        options = session_options(self.threads, self.optimization)
        providers: list[Any] = [provider]
        if self.device == "trt":
            self.provider_options = self._trt_options()
            providers = [(provider, self.provider_options)]
            options.enable_profiling = True  # to see where each node ran
            options.profile_file_prefix = str(Path(self.provider_options["trt_engine_cache_path"]) / "profile")
        try:
            self.session = ort.InferenceSession(str(self.onnx_path), sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types
            raise VitDeployError(f"ONNX Runtime could not load {self.onnx_path.name}: {str(exc).splitlines()[0]}") from exc
        if self.session.get_providers()[0] != provider:
            used = ", ".join(self.session.get_providers())
            self.session = None
            raise VitDeployError(
                f"ONNX Runtime fell back to {used} instead of {provider} (CUDA libraries missing or no GPU); "
                "the ort-cuda numbers would be CPU numbers, so nothing was run"
            )
        self.num_classes = int(self.session.get_outputs()[0].shape[1])
        if self.device == "trt":
            self._check_all_nodes_in_tensorrt()
        if self.graphs is not None:  # a second session that captures: one graph per gpu_graph_id
            try:
                self.graph_session = ort.InferenceSession(
                    str(self.onnx_path), sess_options=session_options(self.threads, self.optimization),
                    providers=[(provider, {"enable_cuda_graph": "1"})])
            except Exception as exc:  # noqa: BLE001
                self.graphs = None
                self.say(f"ort-cuda: no CUDA graphs ({str(exc).splitlines()[0]}); running without them")

    def _trt_options(self) -> dict[str, str]:
        """TensorRT provider options: caches inside the artifact folder, the manifest's profiles,
        and precision from the graph's own types (fp16 kernels allowed only for the fp16 graph)."""
        cache = self.onnx_path.parent / TRT_CACHE
        try:
            cache.mkdir(exist_ok=True)
        except OSError as exc:
            raise VitDeployError(f"ort-trt keeps its engine cache in {cache}, which cannot be created ({exc.strerror}); "
                                 "copy the artifact folder somewhere writable") from None
        options = {
            "trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache),
            "trt_fp16_enable": "True" if self.precision == "fp16" else "False",
        }
        if self.trt_profiles and self.input_shape:
            rest = "x".join(str(d) for d in self.input_shape[1:])
            for key, field in (("trt_profile_min_shapes", "min"), ("trt_profile_opt_shapes", "opt"), ("trt_profile_max_shapes", "max")):
                options[key] = ",".join(f"{self.input_name}:{p[field]}x{rest}" for p in self.trt_profiles)
        return options

    def _check_all_nodes_in_tensorrt(self) -> None:
        """Run one batch and read ONNX Runtime's profile: a node outside TensorRT means the numbers
        would not be TensorRT's, so the session is refused, naming the nodes."""
        shape = [1, *self.input_shape[1:]] if self.input_shape else None
        if shape is not None:
            dtype = np.uint8 if self.session.get_inputs()[0].type == "tensor(uint8)" else np.float32
            self.session.run([self.output_name], {self.input_name: np.zeros(shape, dtype)})
        profile = Path(self.session.end_profiling())
        try:
            outside = nodes_outside(json.loads(profile.read_text()), PROVIDERS["trt"])
        finally:
            profile.unlink(missing_ok=True)  # one per activation: do not let them pile up in the cache folder
        if outside:
            self.session = None
            raise VitDeployError(f"ort-trt ran {len(outside)} nodes outside TensorRT ({', '.join(outside[:5])}); "
                                 "its numbers would not be TensorRT's, so nothing was run (check the TensorRT preflight "
                                 "in manifest.json)")

    def active(self) -> bool:
        return self.session is not None

    def _infer_eager(self, images: np.ndarray) -> np.ndarray:
        if not self.device_mode:
            return self.session.run([self.output_name], {self.input_name: images})[0]
        binding, _, out = self._stage_eager(images)
        self.session.run_with_iobinding(binding)
        return out.cpu().numpy()

    def _stage_eager(self, images: np.ndarray) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """An I/O binding whose input and output are CUDA buffers (the tensors are kept alive with it)."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to("cuda")
        out = torch.empty((len(images), self.num_classes), dtype=torch.float32, device="cuda")
        torch.cuda.current_stream().synchronize()  # the input is on the device before ONNX Runtime's stream reads it
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", x.device.index or 0, images.dtype, tuple(x.shape), x.data_ptr())
        binding.bind_output(self.output_name, "cuda", out.device.index or 0, np.float32, tuple(out.shape), out.data_ptr())
        return binding, x, out

    def _run_staged_eager(self, staged: tuple[Any, torch.Tensor, torch.Tensor]) -> None:
        self.session.run_with_iobinding(staged[0])  # returns when the CUDA work has finished

    def _static(self, bucket: int) -> _OrtStatic:
        return _OrtStatic(self, bucket, len(self.graphs.entries))

    def deactivate(self) -> None:
        self.session = self.graph_session = None

    def describe(self) -> dict[str, Any]:
        ort = _ort()
        return {"name": self.name, "device": self.device, "precision": self.precision, "onnxruntime": ort.__version__,
                "threads": self.threads, "graph_optimization": self.optimization, "model": self.onnx_path.name,
                **({"provider_options": self.provider_options} if self.provider_options else {}),
                "cuda_graph": self.graphs.describe() if self.graphs else False}


class CallGraph:
    """ONNX Runtime captures its CUDA graph itself (on the first run with a gpu_graph_id):
    capturing is that run, replaying is running again with the same id."""

    def __init__(self) -> None:
        self.work = None

    def capture(self, work: Any) -> None:
        work()
        self.work = work

    def replay(self) -> None:
        self.work()


class _OrtStatic:
    """One bucket's fixed OrtValues (torch CUDA buffers) bound to the capturing session."""

    def __init__(self, backend: OrtBackend, bucket: int, graph_id: int) -> None:
        self.backend, self.bucket = backend, bucket
        self.x: torch.Tensor | None = None
        self.out = torch.empty((bucket, backend.num_classes), dtype=torch.float32, device="cuda")
        self.run_options = _ort().RunOptions()
        self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        self.binding = None

    def load(self, images: np.ndarray) -> None:
        first = self.x is None
        self.x = load_padded(self.x, images, self.bucket, "cuda")
        if first:
            b = self.backend
            self.binding = b.graph_session.io_binding()
            self.binding.bind_input(b.input_name, "cuda", 0, images.dtype, tuple(self.x.shape), self.x.data_ptr())
            self.binding.bind_output(b.output_name, "cuda", 0, np.float32, tuple(self.out.shape), self.out.data_ptr())
        torch.cuda.current_stream().synchronize()  # ONNX Runtime's stream reads the input next

    def reference(self) -> np.ndarray:
        """The same bucket on the session without graphs."""
        b = self.backend
        return b.session.run([b.output_name], {b.input_name: self.x.cpu().numpy()})[0]

    def capture(self, graph: CallGraph) -> None:
        try:
            graph.capture(lambda: self.backend.graph_session.run_with_iobinding(self.binding, self.run_options))
        except Exception as exc:
            raise RuntimeError(f"{str(exc).splitlines()[0]} (ONNX Runtime captures a graph only when every node runs "
                               "on the CUDA provider with no host copies)") from exc

    def read(self, rows: int) -> np.ndarray:
        torch.cuda.synchronize()
        return self.out[:rows].cpu().numpy()


def nodes_outside(profile: list[dict[str, Any]], provider: str) -> list[str]:
    """Names of the nodes an ONNX Runtime profile shows running on another provider than `provider`."""
    names = []
    for event in profile:
        args = event.get("args") or {}
        if event.get("cat") == "Node" and args.get("provider") and args["provider"] != provider:
            name = str(event.get("name", "?")).removesuffix("_kernel_time").removesuffix("_fence_before").removesuffix("_fence_after")
            if name not in names:
                names.append(name)
    return names
