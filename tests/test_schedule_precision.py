"""Precision choice per device, the LR schedule and the optimizer's parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from vitdeploy.errors import VitDeployError
from vitdeploy.models import build_model, get_spec
from vitdeploy.train.precision import choose_precision
from vitdeploy.train.schedule import WarmupCosine, build_optimizer

CUDA = torch.device("cuda")


@pytest.mark.parametrize(
    "capability, expected",
    [((9, 0), "bf16"), ((8, 9), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"), ((7, 0), "fp16"), ((6, 1), "fp16")],
)
def test_auto_precision_by_compute_capability(capability: tuple[int, int], expected: str) -> None:
    assert choose_precision(CUDA, "auto", capability) == expected


def test_explicit_precisions() -> None:
    assert choose_precision(torch.device("cpu")) == "fp32"
    assert choose_precision(CUDA, "fp32", (9, 0)) == "fp32"
    assert choose_precision(CUDA, "fp16", (9, 0)) == "fp16"
    with pytest.raises(VitDeployError, match="no native bf16; use --precision fp16"):
        choose_precision(CUDA, "bf16", (7, 5))
    with pytest.raises(VitDeployError, match="needs a CUDA GPU"):
        choose_precision(torch.device("cpu"), "fp16")


def test_warmup_then_cosine() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1.0)
    sched = WarmupCosine(opt, base_lr=1.0, total_steps=100, warmup_steps=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lrs[99] < 0.001 and all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    restored = WarmupCosine(torch.optim.AdamW([param], lr=1.0), 1.0, 100, 10)
    restored.load_state_dict({"step_count": 55})
    assert restored.lr == pytest.approx(lrs[55])


def test_parameter_groups_layer_decay_and_no_decay() -> None:
    spec = get_spec("vit_cifar_tiny")
    model = build_model(spec)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5, spec=spec)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    head, first = by_param[id(named["heads.head.weight"])], by_param[id(named["encoder.layers.encoder_layer_0.mlp.0.weight"])]
    embed = by_param[id(named["conv_proj.weight"])]
    assert head["lr"] == pytest.approx(1e-3) and first["lr"] == pytest.approx(1e-3 * 0.5**6)
    assert embed["lr"] == pytest.approx(1e-3 * 0.5**7)
    assert head["weight_decay"] == 0.05
    for name in ("heads.head.bias", "encoder.ln.weight", "class_token", "encoder.pos_embedding"):
        assert by_param[id(named[name])]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)
