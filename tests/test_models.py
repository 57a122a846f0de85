"""Model registry, cost accounting, and weight loading from local files only."""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import pytest
import torch

from vitdeploy.checkpoint import FORMAT, FORMAT_VERSION
from vitdeploy.errors import VitDeployError
from vitdeploy.models import (
    REGISTRY,
    build_model,
    get_spec,
    load_pretrained,
    load_weights_file,
    model_cost,
)


def analytic_gflops(spec) -> float:
    """2 FLOPs per multiply-add over the patch embedding, every encoder block and the head."""
    tokens = (spec.input_size // spec.patch_size) ** 2
    d, m, t = spec.hidden_dim, spec.mlp_dim, tokens + 1
    embed = 2 * tokens * 3 * spec.patch_size**2 * d
    block = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * m
    return (embed + spec.num_layers * block + 2 * d * 10) / 1e9


def test_registry_holds_the_promised_models() -> None:
    for name in ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"):
        assert REGISTRY[name].input_size == 224 and REGISTRY[name].pretrained
    assert "IMAGENET1K_V1" not in REGISTRY["vit_h_14"].pretrained
    for name in ("vit_cifar_tiny", "vit_cifar_small"):
        assert REGISTRY[name].input_size == 32 and REGISTRY[name].patch_size == 4 and not REGISTRY[name].pretrained
    with pytest.raises(VitDeployError, match="unknown model 'vit_x'.*vit_cifar_tiny"):
        get_spec("vit_x")


@pytest.mark.parametrize("name", ["vit_cifar_tiny", "vit_cifar_small", "vit_b_16", "vit_h_14"])
def test_cost_matches_analytic_count(name: str) -> None:
    params, gflops = model_cost(name)
    assert gflops == pytest.approx(analytic_gflops(get_spec(name)), rel=1e-6)
    if name == "vit_cifar_tiny":
        assert 2.6e6 < params < 2.8e6


def test_tiny_forward() -> None:
    model = build_model(get_spec("vit_cifar_tiny"))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def imagenet_style_state(name: str) -> dict[str, torch.Tensor]:
    """A state dict shaped like torchvision's ImageNet checkpoint (1000-class head)."""
    torch.manual_seed(1)
    return build_model(get_spec(name), num_classes=1000).state_dict()


def test_imagenet_weights_replace_only_the_head(tmp_path: Path) -> None:
    spec = get_spec("vit_cifar_tiny")
    path = tmp_path / "imagenet.pth"
    state = imagenet_style_state("vit_cifar_tiny")
    torch.save(state, path)
    model = build_model(spec)
    report = load_weights_file(model, spec, path)
    assert set(report.initialized) == {"heads.head.weight", "heads.head.bias"}
    assert "freshly initialized: heads.head.weight, heads.head.bias" in report.describe()
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("heads."))


def test_vitdeploy_checkpoint_as_weights(tmp_path: Path) -> None:
    spec = get_spec("vit_cifar_tiny")
    source = build_model(spec)
    ckpt = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_name": spec.name, "model": source.state_dict()}
    torch.save(ckpt, tmp_path / "run.pt")
    model = build_model(spec)
    assert load_weights_file(model, spec, tmp_path / "run.pt").initialized == ()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values(), strict=True))
    with pytest.raises(VitDeployError, match="checkpoint of vit_cifar_tiny, not vit_cifar_small; use --model vit_cifar_tiny"):
        load_weights_file(build_model(get_spec("vit_cifar_small")), get_spec("vit_cifar_small"), tmp_path / "run.pt")


def test_weights_of_another_architecture(tmp_path: Path) -> None:
    torch.save(imagenet_style_state("vit_cifar_small"), tmp_path / "small.pth")
    spec = get_spec("vit_cifar_tiny")
    with pytest.raises(VitDeployError, match="does not fit vit_cifar_tiny"):
        load_weights_file(build_model(spec), spec, tmp_path / "small.pth")


def test_missing_and_corrupt_weights(tmp_path: Path) -> None:
    spec = get_spec("vit_cifar_tiny")
    with pytest.raises(VitDeployError, match="does not exist"):
        load_weights_file(build_model(spec), spec, tmp_path / "absent.pth")
    torch.save(imagenet_style_state("vit_cifar_tiny"), tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(VitDeployError, match="truncated or not a torch file"):
        load_weights_file(build_model(spec), spec, tmp_path / "cut.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(VitDeployError, match="not a state dict"):
        load_weights_file(build_model(spec), spec, tmp_path / "list.pth")


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"model": _Exploit(marker)}, tmp_path / "evil.pt")
    spec = get_spec("vit_cifar_tiny")
    with pytest.raises(VitDeployError, match="refused to load"):
        load_weights_file(build_model(spec), spec, tmp_path / "evil.pt")
    assert not marker.exists()


def test_pretrained_offline_without_cache_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*_args, **_kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    spec = get_spec("vit_b_32")
    with torch.device("meta"):
        model = build_model(spec)
    with pytest.raises(VitDeployError) as err:
        load_pretrained(model, spec)
    message = str(err.value)
    assert "vit_b_32-d86f8d99.pth" in message and str(tmp_path / "hub" / "checkpoints") in message and "--weights" in message


def test_pretrained_from_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached torchvision checkpoint loads with no network; only the head is re-initialized."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("must not download"))
    spec = get_spec("vit_b_32")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    state = imagenet_style_state("vit_b_32")
    torch.save(state, tmp_path / "hub" / "checkpoints" / "vit_b_32-d86f8d99.pth")
    model = build_model(spec)
    report = load_pretrained(model, spec)
    assert set(report.initialized) == {"heads.head.weight", "heads.head.bias"}
    assert torch.equal(model.state_dict()["encoder.ln.weight"], state["encoder.ln.weight"])
    with pytest.raises(VitDeployError, match="no pretrained weights 'IMAGENET1K_V2'"):
        load_pretrained(model, spec, "IMAGENET1K_V2")
