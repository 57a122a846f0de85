"""Per-sample augmentation and the EMA: determinism under any batch split, the ops against
torchvision's kernels, mixup/cutmix targets, and the EMA arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from vitdeploy.models import get_spec
from vitdeploy.preprocess import Preprocess
from vitdeploy.train.augment import (
    OP_NAMES,
    Augmenter,
    AugmentSettings,
    _color_op,
    beta_quantile,
    mix_plan,
    trivial_augment,
    trivial_params,
)
from vitdeploy.train.ema import WeightEMA, default_decay
from vitdeploy.train.sampling import sample_uniforms

LONG = AugmentSettings(crop_padding=4, augment="trivial", erase_prob=0.5, mixup_alpha=0.8, cutmix_alpha=1.0, fill=(125, 123, 114))


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def augmenter(settings: AugmentSettings = LONG, seed: int = 7) -> Augmenter:
    return Augmenter(settings, Preprocess(get_spec("vit_cifar_tiny").preprocessing()), 10, seed)


def test_same_sample_same_augmentation_under_any_split() -> None:
    """A global batch of 64 (positions = the epoch order), whole, in halves (grad accumulation
    or 2 ranks) and in quarters (4 ranks): every sample comes out identical."""
    data, labels = images(64), torch.arange(64) % 10
    ids = torch.randperm(1000, generator=torch.Generator().manual_seed(1))[:64]  # sample ids of the epoch order
    aug = augmenter()
    whole_x, whole_y = aug(data, labels, ids, epoch=3)
    for parts in (2, 4):
        pieces = [aug(d, y, i, epoch=3) for d, y, i in zip(data.chunk(parts), labels.chunk(parts), ids.chunk(parts), strict=True)]
        assert torch.equal(torch.cat([p[0] for p in pieces]), whole_x)
        assert torch.equal(torch.cat([p[1] for p in pieces]), whole_y)
    again = augmenter()(data, labels, ids, epoch=3)
    assert torch.equal(again[0], whole_x)
    assert not torch.equal(aug(data, labels, ids, epoch=4)[0], whole_x)  # a new epoch draws anew
    assert not torch.equal(augmenter(seed=8)(data, labels, ids, epoch=3)[0], whole_x)


def test_every_trivial_op_is_drawn_and_changes_images() -> None:
    data, labels, ids = images(512), torch.zeros(512, dtype=torch.int64), torch.arange(512)
    out, _ = augmenter(AugmentSettings(augment="trivial"))(data, labels, ids, epoch=0)
    flipped_only, _ = augmenter(AugmentSettings())(data, labels, ids, epoch=0)  # flips are always on
    op, _magnitude = trivial_params(sample_uniforms(7, 0, ids, 2, 3))
    assert set(op.tolist()) == set(range(len(OP_NAMES)))
    changed = (out != flipped_only).flatten(1).any(1).numpy()
    assert changed[op == OP_NAMES.index("equalize")].all() and not changed[op == OP_NAMES.index("identity")].any()


@pytest.mark.parametrize("name,magnitudes,reference", [
    ("brightness", (-0.99, -0.3, 0.5, 0.99), lambda x, m: TF.adjust_brightness(x, 1 + m)),
    ("color", (-0.99, -0.3, 0.5, 0.99), lambda x, m: TF.adjust_saturation(x, 1 + m)),
    ("contrast", (-0.99, -0.3, 0.5, 0.99), lambda x, m: TF.adjust_contrast(x, 1 + m)),
    ("sharpness", (-0.99, -0.3, 0.5, 0.99), lambda x, m: TF.adjust_sharpness(x, 1 + m)),
    ("solarize", (0.0, 100.0, 255.0), lambda x, m: TF.solarize(x, m)),
    ("posterize", (2.0, 5.0, 8.0), lambda x, m: TF.posterize(x, int(m))),
])
def test_colour_ops_match_torchvision(name: str, magnitudes: tuple, reference) -> None:
    """Per-sample magnitudes give what torchvision's kernel gives each sample (float rounding
    may put a rare pixel one level apart)."""
    data = images(32)
    for m in magnitudes:
        diff = (_color_op(name, data, np.full(32, m)).int() - reference(data, m).int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.06, (name, m)


def test_geometric_ops() -> None:
    data = images(8)
    rotate, translate = OP_NAMES.index("rotate"), OP_NAMES.index("translate_x")
    assert torch.equal(trivial_augment(data, np.full(8, rotate), np.full(8, 90.0)), TF.rotate(data, 90.0))
    assert torch.equal(trivial_augment(data, np.full(8, rotate), np.full(8, -31.5)), TF.rotate(data, -31.5))
    shifted = torch.zeros_like(data)
    shifted[..., 5:] = data[..., :-5]
    assert torch.equal(trivial_augment(data, np.full(8, translate), np.full(8, 5.6)), shifted)  # whole pixels
    mixed = trivial_augment(data, np.array([rotate, translate] * 4), np.array([90.0, 5.0] * 4))
    assert torch.equal(mixed[0::2], TF.rotate(data[0::2], 90.0)) and torch.equal(mixed[1::2], shifted[1::2])


def test_mixup_and_cutmix_targets() -> None:
    """Targets are probability rows (sum 1) mixing the sample's and its partner's labels with
    the weight of what each contributes to the image: for cutmix the exact pixel share."""
    n = 64
    flat = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous() * 3  # sample i is all 3i
    labels = torch.arange(n) % 10
    aug = augmenter(AugmentSettings(mixup_alpha=None, cutmix_alpha=1.0), seed=2)
    x, y = aug(flat, labels, torch.arange(n), epoch=0)
    torch.testing.assert_close(y.sum(1), torch.ones(n))
    raw = (x[:, 0] - aug.preprocess.shift[0, 0]) / aug.preprocess.scale[0, 0]  # back to the uint8 values
    partner = torch.arange(n) ^ 1
    own_share = (raw.round() == 3 * torch.arange(n).view(n, 1, 1)).float().mean((1, 2))
    own_label = y[torch.arange(n), labels]
    other_label = y[torch.arange(n), labels[partner]]
    same = labels == labels[partner]
    torch.testing.assert_close(own_label[~same], own_share[~same])
    torch.testing.assert_close(other_label[~same], 1 - own_share[~same])
    aug = augmenter(AugmentSettings(mixup_alpha=0.8, cutmix_alpha=None), seed=2)
    x, y = aug(flat, labels, torch.arange(n), epoch=0)
    torch.testing.assert_close(y.sum(1), torch.ones(n))
    plain = aug.preprocess(flat)
    lam = y[torch.arange(n), labels][~same]
    torch.testing.assert_close(x[~same], lam.view(-1, 1, 1, 1) * plain[~same] + (1 - lam.view(-1, 1, 1, 1)) * plain[partner][~same])
    both = augmenter(AugmentSettings(mixup_alpha=0.8, cutmix_alpha=1.0), seed=2)  # a mixup sample whose partner is cut
    x, y = both(flat, labels, torch.arange(n), epoch=0)  # blends with the partner's own image, not its cut one
    plan = mix_plan(sample_uniforms(2, 0, torch.arange(n), 4, 4), 0.8, 1.0, 32, 32)
    blended = torch.from_numpy(~plan.cut & plan.cut[partner.numpy()])
    assert blended.any()
    lam = torch.from_numpy(plan.lam).float().view(-1, 1, 1, 1)
    expected = lam * plain + (1 - lam) * plain[partner]
    torch.testing.assert_close(x[blended], expected[blended])


def test_mix_plan_choice_and_beta_draws() -> None:
    u = np.random.default_rng(0).random((20000, 4))
    plan = mix_plan(u, 0.8, 1.0, 32, 32)
    assert 0.45 < plan.cut.mean() < 0.55 and ((plan.lam > 0) & (plan.lam <= 1)).all()
    for alpha in (0.2, 1.0, 4.0):  # mean 1/2, variance 1 / (4 (2 alpha + 1))
        draws = beta_quantile(alpha, u[:, 1])
        assert abs(draws.mean() - 0.5) < 0.01 and draws.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.03)


def test_ema_arithmetic_and_state() -> None:
    model = torch.nn.Linear(3, 2)
    ema = WeightEMA(model, decay=0.9)
    history = []
    for step in range(4):
        with torch.no_grad():
            model.weight.add_(step + 1.0)
        ema.update(model)
        history.append(model.weight.detach().clone())
    expected = history[0]  # the first update copies, later ones move by (1 - decay)
    for weights in history[1:]:
        expected = 0.9 * expected + 0.1 * weights
    torch.testing.assert_close(ema.module.weight, expected)
    assert ema.updates == 4 and ema.state_dict()["decay"] == 0.9


def test_default_decay_follows_the_run_length() -> None:
    assert default_decay(700) == pytest.approx(1 - 1 / 70)
    assert default_decay(1) == 0.5 and default_decay(10**9) == 0.9999
    assert default_decay(100) < default_decay(10_000)
