"""CUDA-graph bookkeeping (buckets, capture, the check against the run without a graph, the
fallback) with stand-ins on the CPU, the refusals, and the real thing on GPU machines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_cli
from vitdeploy.backends.graphs import GraphSet, power_of_two_buckets
from vitdeploy.errors import VitDeployError


class FakeStatic:
    """A bucket whose 'device' work doubles the input; `drift` makes the replay differ."""

    def __init__(self, bucket: int, log: list, drift: float = 0.0, fail: bool = False) -> None:
        self.bucket, self.log, self.drift, self.fail = bucket, log, drift, fail
        self.x = np.zeros((bucket, 2), np.float32)
        self.out = np.zeros((bucket, 2), np.float32)

    def load(self, images: np.ndarray) -> None:
        self.x[:] = 0
        self.x[: len(images)] = images

    def _run(self, drift: float = 0.0) -> None:
        self.log.append(("run", self.bucket))
        self.out[:] = self.x * 2 + drift

    def reference(self) -> np.ndarray:
        self._run()
        return self.out.copy()

    def capture(self, graph: FakeGraph) -> None:
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        graph.work = lambda: self._run(self.drift)
        self.log.append(("capture", self.bucket))

    def read(self, rows: int) -> np.ndarray:
        return self.out[:rows].copy()


class FakeGraph:
    def __init__(self) -> None:
        self.work = None

    def replay(self) -> None:
        self.work()


def graph_set(buckets: tuple[int, ...] | None, **static: object) -> tuple[GraphSet, list, list]:
    log: list = []
    said: list = []
    graphs = GraphSet("trt", lambda b: FakeStatic(b, log, **static), FakeGraph, buckets, exact=True, say=said.append)
    return graphs, log, said


def test_buckets() -> None:
    assert power_of_two_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert power_of_two_buckets(24) == (1, 2, 4, 8, 16, 24)
    assert power_of_two_buckets(1) == (1,)
    graphs, _, _ = graph_set((1, 2, 4, 8))
    assert [graphs.bucket_for(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(VitDeployError, match="larger than the largest CUDA-graph bucket 8"):
        graphs.bucket_for(9)
    assert graph_set(None)[0].bucket_for(7) == 7  # bench: each timed size is its own bucket


def test_a_padded_batch_replays_its_bucket_and_equals_the_run_without_a_graph() -> None:
    graphs, log, said = graph_set((1, 2, 4))
    images = np.arange(6, dtype=np.float32).reshape(3, 2)
    out = graphs.run(images)
    np.testing.assert_array_equal(out, images * 2)
    assert ("capture", 4) in log and not said
    log.clear()
    out = graphs.run(images[:2] + 1)  # another bucket: captured once
    np.testing.assert_array_equal(out, (images[:2] + 1) * 2)
    graphs.run(images)  # bucket 4 again: replayed, not captured again
    assert log.count(("capture", 4)) == 0 and graphs.last_bucket == 4
    described = graphs.describe()
    assert described["captured"] == [2, 4] and described["failed"] == {} and described["last_bucket"] == 4


def test_a_replay_that_differs_is_not_used_and_says_so() -> None:
    graphs, _, said = graph_set((4,), drift=1e-3)
    assert graphs.run(np.ones((3, 2), np.float32)) is None  # the caller runs without a graph
    assert len(said) == 1 and "no CUDA graph for batch 4" in said[0] and "replay differs" in said[0]
    assert graphs.run(np.ones((3, 2), np.float32)) is None and len(said) == 1  # said once, not per batch
    assert graphs.describe()["failed"].keys() == {"4"} and graphs.last_bucket is None


def test_a_failed_capture_falls_back_with_one_line() -> None:
    graphs, _, said = graph_set(None, fail=True)
    assert graphs.run(np.ones((2, 2), np.float32)) is None
    assert said == ["trt: no CUDA graph for batch 2 (capture failed: operation not permitted when stream is capturing); "
                    "that batch size runs without one"]


def test_pytorch_tolerance_is_relative() -> None:
    log: list = []
    graphs = GraphSet("pytorch", lambda b: FakeStatic(b, log, drift=1e-9), FakeGraph, None, exact=False, say=lambda _s: None)
    assert graphs.run(np.ones((2, 2), np.float32)) is not None


def test_cuda_graph_on_a_cpu_backend_is_one_line(exported: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_cli("bench", str(exported), "--backend", "ort-cpu", "--cuda-graph", "--out", str(tmp_path / "b"))
    assert result.returncode == 1 and "--cuda-graph is for the GPU backends" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "b" / "bench.json").exists()
    result = run_cli("serve", str(exported), "--cuda-graph", "--max-batch", "8")
    assert result.returncode == 1 and "--cuda-graph is for the GPU backends" in result.stderr and "Traceback" not in result.stderr


def test_bench_all_with_cuda_graph_records_where_none_ran(exported: Path, tmp_path: Path) -> None:
    import json

    result = run_cli("bench", str(exported), "--backend", "all", "--cuda-graph", "--limit", "20", "--batch-sizes", "1,4",
                     "--min-iters", "2", "--max-seconds", "0.3", "--out", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr
    records = json.loads((tmp_path / "b" / "bench.json").read_text())["records"]
    gpu = torch.cuda.is_available()
    for r in records:
        assert set(r) >= {"cuda_graph", "graph_bucket", "trt_profile"}
        if r["backend"] == "ort-cpu" or not gpu:
            assert r["cuda_graph"] is False and r["graph_bucket"] is None


@pytest.mark.gpu
def test_pytorch_graph_replay_equals_eager(trained: Path) -> None:
    from vitdeploy.backends.pytorch import TorchBackend
    from vitdeploy.checkpoint import load_checkpoint
    from vitdeploy.models import model_from_checkpoint
    from vitdeploy.preprocess import Preprocessing

    checkpoint = load_checkpoint(trained / "last.pt")
    _spec, model = model_from_checkpoint(checkpoint, "last.pt")
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    preprocessing = Preprocessing.from_dict(checkpoint["preprocessing"])
    said: list = []
    with TorchBackend(model, preprocessing, "cuda", "fp32") as eager:
        expected = eager.infer(images)
    with TorchBackend(model, preprocessing, "cuda", "fp32", cuda_graph=True, graph_buckets=(1, 2, 4, 8), say=said.append) as graphed:
        got = graphed.infer(images)
        assert graphed.describe()["cuda_graph"]["captured"] == [8] and not said
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
