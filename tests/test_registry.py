"""The backend registry is the one list of backends: the CLI, bench, info and the factory
read it, and its rules (which precisions, which INT8 graph, which refusals) hold."""

from __future__ import annotations

import re

import pytest

from tests.conftest import run_cli
from vitdeploy import choices
from vitdeploy.backends import registry
from vitdeploy.errors import VitDeployError


def test_every_entry_is_complete_and_names_are_unique() -> None:
    assert len(set(registry.NAMES)) == len(registry.NAMES) >= 6
    for entry in registry.BACKENDS:
        assert entry.kind in ("checkpoint", "onnx", "tensorrt"), entry
        assert set(entry.precisions) <= set(choices.PRECISIONS), entry
        assert entry.int8_target in (None, "cpu", "tensorrt"), entry
        assert ("int8" in entry.precisions) == (entry.int8_target is not None), entry
        assert entry.summary, entry
        for precision in set(choices.PRECISIONS) - set(entry.precisions):
            assert entry.why_not(precision).startswith(entry.name), (entry.name, precision)


def test_probes_say_usable_or_why_not() -> None:
    statuses = registry.statuses()
    assert [s.name for s in statuses] == list(registry.NAMES)
    assert all(isinstance(s.usable, bool) and s.reason for s in statuses)
    assert next(s for s in statuses if s.name == "pytorch").usable


def test_refusals_name_the_backends_that_do_run_it() -> None:
    pytorch_int8 = registry.get("pytorch").why_not("int8")
    assert "the pytorch backend has no INT8 path" in pytorch_int8
    assert all(name in pytorch_int8 for name in registry.INT8_BACKENDS)
    assert registry.get("ort-cuda").why_not("int8").startswith("ort-cuda does not run INT8")
    assert "bf16 runs only on --backend pytorch" in registry.get("openvino").why_not("bf16")


@pytest.mark.parametrize(("text", "allow_all", "expected"), [
    ("all", True, ("all",)),
    ("ort-cpu, openvino,ort-cpu", True, ("ort-cpu", "openvino")),
    ("pytorch", False, ("pytorch",)),
])
def test_backend_lists_parse_one_way(text: str, allow_all: bool, expected: tuple[str, ...]) -> None:
    assert registry.parse_backends(text, allow_all) == expected


@pytest.mark.parametrize(("text", "allow_all", "message"), [
    ("onnx", True, "unknown backend 'onnx'; choose from all, pytorch"),
    ("all", False, "unknown backend 'all'"),
    ("ort-cpu,openvino", False, "takes one backend here"),
    (" , ", True, "--backend needs a name"),
])
def test_bad_backend_lists_are_refused(text: str, allow_all: bool, message: str) -> None:
    with pytest.raises(VitDeployError, match=re.escape(message)):
        registry.parse_backends(text, allow_all)


def test_cli_choices_are_the_registry(exported) -> None:  # noqa: ANN001 - a fixture
    for command in ("predict", "serve", "bench"):
        help_text = run_cli(command, "--help").stdout
        assert all(name in help_text for name in registry.NAMES), command
    result = run_cli("predict", str(exported), "x.png", "--backend", "onnx")
    assert result.returncode == 1 and result.stderr.strip() == (
        f"error: unknown backend 'onnx'; choose from {', '.join(registry.NAMES)}"), result.stderr


def test_cuda_graph_is_refused_where_no_graph_runs() -> None:
    with pytest.raises(VitDeployError, match="--cuda-graph is for the GPU backends pytorch, ort-cuda, trt; openvino is not"):
        registry.check_cuda_graph("openvino", True)
    registry.check_cuda_graph("openvino", False)
