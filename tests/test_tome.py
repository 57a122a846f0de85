"""Token merging: the one-hot formulation equals the paper's algorithm (a reference written here with
argsort, gather and scatter_reduce), the schedule's limits, and the model option's plumbing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.vision_transformer import VisionTransformer

from vitdeploy import tome
from vitdeploy.errors import VitDeployError
from vitdeploy.models import REGISTRY, model_cost

# -- the reference: Bolya et al.'s bipartite soft matching, as the paper describes it --------------


def reference_matching(metric: torch.Tensor, r: int, protected: int):
    """Alternate tokens into sets A (even positions) and B (odd); A's edges to their most similar B
    token, the r strongest merge; protected leading tokens never merge (their scores are -inf)."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    for p in range(protected):  # a protected token is a row of A (even position) or a column of B (odd)
        if p % 2 == 0:
            scores[..., p // 2, :] = -math.inf
        else:
            scores[..., :, p // 2] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :].sort(dim=1)[0]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(x: torch.Tensor) -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
        return torch.cat([unm, dst], dim=1)

    return merge


def reference_block(block, x: torch.Tensor, size: torch.Tensor | None, r: int):
    attn = block.self_attention
    b, n, d = x.shape
    h = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(d // h)
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]  # proportional attention
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    x = x + attn.out_proj(out)
    if r:
        if size is None:
            size = torch.ones_like(x[..., :1])
        merge = reference_matching(k.mean(1), r, protected=1)
        x, size = merge(x * size), merge(size)
        x = x / size
    return x + block.mlp(block.ln_2(x)), size


def reference_forward(model: VisionTransformer, images: torch.Tensor, schedule: tuple[int, ...]) -> torch.Tensor:
    x = model._process_input(images)
    x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1) + model.encoder.pos_embedding
    size = None
    for block, r in zip(model.encoder.layers, schedule, strict=True):
        x, size = reference_block(block, x, size, r)
    return model.heads(model.encoder.ln(x)[:, 0])


def tiny_vit(layers: int = 4, image: int = 32, patch: int = 4) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=image, patch_size=patch, num_layers=layers, num_heads=3, hidden_dim=48,
                              mlp_dim=96, num_classes=10).eval()
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero: logits would all be 0
    return model


@pytest.mark.parametrize("schedule", [(4, 4, 4, 4), (16, 8, 0, 3), (32, 16, 8, 4)])
def test_merging_equals_the_reference(schedule):
    model = tiny_vit()
    images = torch.randn(6, 3, 32, 32)
    spec = REGISTRY["vit_cifar_tiny"]
    merging = tome._merging(spec, schedule, None)
    with torch.no_grad():
        expected = reference_forward(model, images, schedule)
        with tome.merged(model, merging):
            got = model(images)
        plain = model(images)
    assert got.shape == (6, 10)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # it merged: the unmerged model answers differently


def test_no_merging_is_the_plain_model():
    model = tiny_vit()
    images = torch.randn(3, 3, 32, 32)
    merging = tome._merging(REGISTRY["vit_cifar_tiny"], (0, 0, 0, 0), None)
    with torch.no_grad():
        plain = model(images)
        with tome.merged(model, merging):
            zero = model(images)
    torch.testing.assert_close(zero, plain, rtol=1e-5, atol=1e-5)
    assert tome.merging_of(model) is None  # the context restored the plain blocks


def test_ties_go_to_the_lower_position():
    """Identical tokens make every score a tie: the choice is still deterministic (lowest positions merge)."""
    x = torch.arange(1, 10, dtype=torch.float32).reshape(1, 9, 1).repeat(1, 1, 2)
    metric = torch.ones(1, 9, 4)
    out, sizes = tome.merge(x, None, metric, 2, prefix=1)
    # A = positions 2,4,6,8 (values 3,5,7,9), B = 1,3,5,7 (2,4,6,8): every edge ties, so A's first two
    # tokens merge, each into B's first token
    assert sizes[0, :, 0].tolist() == [1, 1, 1, 3, 1, 1, 1]
    torch.testing.assert_close(out[0, :, 0], torch.tensor([1, 7, 9, (2 + 3 + 5) / 3, 4, 6, 8]))


def test_prefix_tokens_stay_in_front():
    torch.manual_seed(1)
    x, metric = torch.randn(2, 12, 8), torch.randn(2, 12, 8)
    for prefix in (0, 1, 2, 5):
        out, sizes = tome.merge(x, None, metric, 3, prefix)
        assert out.shape == (2, 9, 8)
        torch.testing.assert_close(out[:, :prefix], x[:, :prefix])
        assert sizes.sum(1).flatten().tolist() == [12.0, 12.0]  # every token is somewhere


def test_timm_blocks_merge_like_torchvision():
    """A timm ViT with one class token merges by the same algorithm (layer scale and all)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=4,
                              depth=3, init_values=0.1).eval()
    spec = REGISTRY["vit_cifar_tiny"]
    merging = tome._merging(spec, (8, 8, 8), None)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(images)
        with tome.merged(model, tome._merging(spec, (0, 0, 0), None)):
            torch.testing.assert_close(model(images), plain, rtol=1e-5, atol=1e-5)
        with tome.merged(model, merging):
            got = model(images)
    assert got.shape == (2, 10) and torch.isfinite(got).all() and (got - plain).abs().max() > 1e-4


def test_plan_fixed_r_clamps_like_the_paper():
    spec = REGISTRY["vit_b_16"]
    m = tome.plan(spec, 16)
    assert m.schedule == (16,) * 11 + (10,)  # 196 - 176 = 20 patch tokens left for block 11: 10 can merge
    assert m.tokens[0] == 197 and m.tokens[-1] == 197 - 186 and m.label == "16"
    assert tome.plan(spec, 13).schedule == (13,) * 12
    assert tome.plan(spec, 0) is None and tome.plan(spec, (0,) * 12) is None
    assert tome.plan(spec, (20,) + (0,) * 11).label == "20-" + "-".join(["0"] * 11)


@pytest.mark.parametrize("asked, message", [
    (99, "at most 98"),
    ((4,) * 11, "12 blocks"),
    ((98, 50) + (0,) * 10, "block 1 asks to merge 50"),
])
def test_plan_refuses_what_the_tokens_cannot_hold(asked, message):
    with pytest.raises(VitDeployError, match=message):
        tome.plan(REGISTRY["vit_b_16"], asked)


@pytest.mark.parametrize("text, message", [("-1", "negative"), ("x", "takes R"), ("1,,2", "takes R"),
                                           (",".join(["1"] * 1001), "at most 1000")])
def test_parse_refuses_bad_values(text, message):
    with pytest.raises(VitDeployError, match=message):
        tome.parse(text)


def test_parse_values():
    assert tome.parse(None) is None and tome.parse("0") is None
    assert tome.parse("13") == 13 and tome.parse("auto") == "auto" and tome.parse("1,2") == (1, 2)


def test_gflops_fall_with_r():
    spec = REGISTRY["vit_cifar_tiny"]
    plain = model_cost("vit_cifar_tiny")[1]
    assert tome.gflops(spec, 10, None) == pytest.approx(plain, rel=1e-6)
    costs = [tome.gflops(spec, 10, tome.plan(spec, r)) for r in (2, 4, 8)]
    assert plain > costs[0] > costs[1] > costs[2] > 0


def test_auto_candidates():
    assert tome.auto_candidates(REGISTRY["vit_b_16"]) == [16, 13, 9, 6, 3]
    assert tome.auto_candidates(REGISTRY["vit_cifar_tiny"]) == [10, 8, 6, 4, 2]


@pytest.mark.parametrize("arch, prefix", [("ViTForImageClassification", 1), ("DeiTForImageClassificationWithTeacher", 2)])
def test_transformers_layers_merge(arch, prefix):
    """transformers' ViT and DeiT (class and distillation tokens kept in front, where both heads read them)."""
    transformers = pytest.importorskip("transformers")
    from dataclasses import replace

    from vitdeploy.sources.hf_vit import HFClassifier

    config_class = transformers.DeiTConfig if "DeiT" in arch else transformers.ViTConfig
    config = config_class(image_size=32, patch_size=4, num_hidden_layers=3, hidden_size=48, num_attention_heads=3,
                          intermediate_size=96, num_labels=10)
    torch.manual_seed(0)
    model = HFClassifier(getattr(transformers, arch)(config)).eval()
    spec = replace(REGISTRY["vit_cifar_tiny"], source="hf", num_layers=3, prefix_tokens=prefix)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(images)
        with tome.merged(model, tome._merging(spec, (0, 0, 0), None)):
            torch.testing.assert_close(model(images), plain, rtol=1e-5, atol=1e-5)  # the blocks as transformers runs them
        merging = tome.plan(spec, 8)
        with tome.merged(model, merging):
            got = model(images)
    assert merging.tokens[-1] == 64 + prefix - 24
    assert got.shape == (2, 10) and torch.isfinite(got).all() and (got - plain).abs().max() > 1e-4


def test_unknown_blocks_are_refused():
    with pytest.raises(VitDeployError, match="cannot merge tokens in a Linear"):
        tome.apply(torch.nn.Linear(2, 2), tome.plan(REGISTRY["vit_cifar_tiny"], 2))
