"""Token merging (ToMe, Bolya et al., ICLR 2023) as a model option: in every block, between
attention and MLP, the `r` most similar pairs of tokens are averaged into one, so later
blocks run on fewer tokens. No retraining is needed; the paper reports that fine-tuning with
it on recovers most of the accuracy it costs (`train --tome`).

As in the paper: bipartite soft matching on the attention keys averaged over heads (tokens
at even positions are set A, odd positions set B; each A token's most similar B token is
its edge, the `r` strongest edges merge), size-weighted averages, and proportional
attention (the log of each token's size added to the attention logits). Prefix tokens
(class, distillation, registers) are never merged and stay in front, so the head reads them
where it always does. With one class token this is exactly the reference implementation.

Unlike the reference, every choice is a product with a one-hot matrix built from
comparisons (no argsort, scatter or gather with data-dependent indices): ONNX exports it,
TensorRT parses it, and ties are broken the same way (lowest position first) on every
runtime. The number merged per block is fixed by the schedule, so every shape is static
and known at export.

`Merging` is the one description of a schedule (CLI values, manifest records);
`apply` switches a model's blocks to merging in place, without changing its weights: torchvision's
EncoderBlock, timm's Block and transformers' ViTLayer/DeiTLayer (each block's own attention and MLP,
layer scale and norms included, with the merge between them).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import MethodType
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from vitdeploy.errors import VitDeployError

if TYPE_CHECKING:
    from vitdeploy.models import ModelSpec

AUTO = "auto"
AUTO_FRACTIONS = (1.0, 0.8, 0.6, 0.4, 0.2)  # --tome auto tries r = fraction x (patch tokens / depth), largest first
MAX_SCHEDULE = 1000  # blocks: models.MAX_LAYERS


@dataclass(frozen=True)
class Merging:
    """How many tokens each block merges: `schedule[i]` in block i, `r` the fixed value asked for
    (None for a per-block schedule); `tokens[i]` is the sequence length entering block i and
    `tokens[-1]` the length the head sees; `prefix` tokens are never merged."""

    schedule: tuple[int, ...]
    tokens: tuple[int, ...]
    prefix: int
    r: int | None = None

    @property
    def label(self) -> str:
        """The name in file names and on the command line: `13` for a fixed r, else the schedule `16-16-8-...`."""
        return str(self.r) if self.r is not None else "-".join(map(str, self.schedule))

    @property
    def merged(self) -> int:
        return sum(self.schedule)

    def to_record(self) -> dict[str, Any]:
        return {"r": self.r, "label": self.label, "schedule": list(self.schedule), "tokens": list(self.tokens),
                "prefix_tokens": self.prefix}


def label_of(asked: int | tuple[int, ...] | None) -> str | None:
    """The label of the graphs a parsed --tome value picks (`Merging.label`), without the model."""
    if asked is None:
        return None
    return str(asked) if isinstance(asked, int) else "-".join(map(str, asked))


def from_label(label: str | None) -> int | tuple[int, ...] | None:
    """The parsed --tome value of a label (`label_of`'s inverse)."""
    return None if label is None else parse(label.replace("-", ","))


def patch_tokens(spec: ModelSpec) -> int:
    """The patch tokens of one image (the sequence without its prefix tokens)."""
    return (spec.input_size // spec.patch_size) ** 2


def parse(text: str | None) -> int | tuple[int, ...] | str | None:
    """A --tome value: None or "0" (no merging), `R` (merge R per block), `R1,R2,...` (one per block)
    or `auto` (export: the largest r of a short list that passes the accuracy gate)."""
    if text is None:
        return None
    text = text.strip()
    if text == AUTO:
        return AUTO
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise VitDeployError(f"--tome takes R (tokens merged per block, e.g. 13), a schedule R1,R2,... with one value "
                             f"per block, or auto; not {text[:40]!r}") from None
    if any(v < 0 for v in values):
        raise VitDeployError(f"--tome {text[:40]}: tokens merged per block cannot be negative")
    if len(values) > MAX_SCHEDULE:
        raise VitDeployError(f"--tome lists {len(values)} values; a model has at most {MAX_SCHEDULE} blocks")
    if len(values) == 1:
        return values[0] or None
    return values


def plan(spec: ModelSpec, asked: int | tuple[int, ...] | None) -> Merging | None:
    """The merging `asked` means for `spec` (None: none). A fixed r merges r per block, fewer where
    fewer than 2r patch tokens are left (as in the paper); a schedule is taken exactly, one value
    per block. What the token count cannot hold is refused with the limit."""
    if asked is None or asked == 0:
        return None
    if not isinstance(asked, (int, tuple)) or isinstance(asked, bool):
        raise VitDeployError(f"--tome {asked!r}: give R or a schedule R1,R2,...")
    patches, depth = patch_tokens(spec), spec.num_layers
    if isinstance(asked, int):
        if not 0 < asked <= patches // 2:
            raise VitDeployError(f"--tome {asked}: {spec.name} has {patches} patch tokens, so a block merges at most "
                                 f"{patches // 2}; choose --tome 1..{patches // 2}")
        schedule, left = [], patches
        for _ in range(depth):
            schedule.append(min(asked, left // 2))
            left -= schedule[-1]
        return _merging(spec, tuple(schedule), asked)
    if len(asked) != depth:
        raise VitDeployError(f"--tome lists {len(asked)} values, but {spec.name} has {depth} blocks: give one per block, "
                             "or one R for all")
    left = patches
    for i, r in enumerate(asked):
        if r > left // 2:
            raise VitDeployError(f"--tome: block {i} asks to merge {r} tokens, but only {left} patch tokens reach it "
                                 f"(at most {left // 2} can merge there); lower that value")
        left -= r
    return None if not any(asked) else _merging(spec, asked, None)


def _merging(spec: ModelSpec, schedule: tuple[int, ...], r: int | None) -> Merging:
    tokens = [patch_tokens(spec) + spec.prefix_tokens]
    for merged in schedule:
        tokens.append(tokens[-1] - merged)
    return Merging(schedule, tuple(tokens), spec.prefix_tokens, r)


def auto_candidates(spec: ModelSpec) -> list[int]:
    """The fixed r values --tome auto tries, largest first: fractions of the patch tokens per block."""
    per_block = patch_tokens(spec) / spec.num_layers
    values = {min(patch_tokens(spec) // 2, int(f * per_block)) for f in AUTO_FRACTIONS}
    return sorted((v for v in values if v > 0), reverse=True)


# -- the model option --------------------------------------------------------------------


def _blocks(model: nn.Module) -> tuple[list[nn.Module], Callable[..., Any]]:
    """The transformer blocks of a model, and the merging step for their kind."""
    from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

    from vitdeploy.sources.hf_vit import HFClassifier

    if isinstance(model, VisionTransformer) and all(type(b) is EncoderBlock for b in model.encoder.layers):
        return list(model.encoder.layers), _torchvision_block
    if isinstance(model, HFClassifier):
        base = getattr(model.hf, "vit", None) or getattr(model.hf, "deit", None)
        layers = list(getattr(base, "layers", None) or ())
        if layers and all(type(b).__name__ in ("ViTLayer", "DeiTLayer") and hasattr(b.attention, "q_proj") for b in layers):
            return layers, _hf_block
        raise VitDeployError(f"--tome merges tokens in transformers' ViTLayer and DeiTLayer blocks (transformers 5's "
                             f"layout); this model's are {type(layers[0]).__name__ if layers else 'not found'}: drop --tome")
    if type(model).__module__.startswith("timm."):
        from timm.models.vision_transformer import Attention, Block
        from timm.models.vision_transformer import VisionTransformer as TimmViT

        if isinstance(model, TimmViT) and all(type(b) is Block and type(b.attn) is Attention for b in model.blocks):
            return list(model.blocks), _timm_block
        raise VitDeployError("--tome merges tokens in timm's standard ViT blocks (Block with Attention); this model's "
                             f"are {type(model.blocks[0]).__name__ if hasattr(model, 'blocks') else 'not found'}: drop --tome")
    raise VitDeployError(f"--tome cannot merge tokens in a {type(model).__name__}; it works on torchvision's, timm's "
                         "and transformers' ViTs")


class _Sizes:
    """The token sizes of one forward pass, handed from block to block (the first block starts afresh)."""

    value: torch.Tensor | None = None


def apply(model: nn.Module, merging: Merging | None) -> nn.Module:
    """Switch `model`'s blocks to merge tokens by `merging` (None: back to the plain blocks), in place;
    the weights and the state dict stay the same. Returns the model. Each block's forward is replaced
    by its merging step, bound to the block, so copies of the model (an EMA) merge as well."""
    blocks, step = _blocks(model)
    for block in blocks:
        vars(block).pop("forward", None)
        vars(block).pop("tome", None)
    if merging is None:
        return model
    if len(merging.schedule) != len(blocks):
        raise VitDeployError(f"the token-merging schedule has {len(merging.schedule)} values for {len(blocks)} blocks")
    sizes = _Sizes()
    for i, (block, r) in enumerate(zip(blocks, merging.schedule, strict=True)):
        block.forward = MethodType(functools.partial(_merging_forward, step=step, r=r, first=i == 0, sizes=sizes,
                                                     prefix=merging.prefix), block)
    blocks[0].tome = merging
    return model


def merging_of(model: nn.Module) -> Merging | None:
    """The merging `apply` set on `model` (None: its blocks run unmerged)."""
    return vars(_blocks(model)[0][0]).get("tome")


@contextlib.contextmanager
def merged(model: nn.Module, merging: Merging | None) -> Iterator[nn.Module]:
    """`model` with merging on inside the block (export, cost), unmerged again after it."""
    apply(model, merging)
    try:
        yield model
    finally:
        apply(model, None)


def _merging_forward(block: nn.Module, x: torch.Tensor, *_args: Any, step: Callable[..., Any], r: int, first: bool,
                     sizes: _Sizes, prefix: int, **_kwargs: Any) -> torch.Tensor:
    """One block's forward with merging (the block's other arguments, attention masks, are not used by ViT classifiers)."""
    x, sizes.value = step(block, x, None if first else sizes.value, r, prefix)
    return x


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor | None, dropout: float,
               scale: float | None = None) -> torch.Tensor:
    """Softmax attention with proportional attention: log(size) of each key added to its logits. Written
    out (not scaled_dot_product_attention, whose ONNX form computes its reshapes at run time), so every
    shape in the exported graph is a number but the batch."""
    logits = (q * (scale or q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0].to(logits.dtype)
    weights = logits.softmax(dim=-1)
    return (F.dropout(weights, dropout) if dropout else weights) @ v


def _torchvision_block(block: nn.Module, x: torch.Tensor, size: torch.Tensor | None, r: int,
                       prefix: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """torchvision's EncoderBlock with merging between attention and MLP."""
    attn = block.self_attention
    b, n, d = x.shape
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).reshape(b, n, 3, heads, d // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = _attention(q, k, v, size, attn.dropout if block.training else 0.0).transpose(1, 2).reshape(b, n, d)
    x = x + block.dropout(attn.out_proj(out))
    if r:
        x, size = merge(x, size, k.mean(1), r, prefix)
    return x + block.mlp(block.ln_2(x)), size


def _timm_block(block: nn.Module, x: torch.Tensor, size: torch.Tensor | None, r: int,
                prefix: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """timm's Block (layer scale, q/k norms, gates included) with merging between attention and MLP."""
    attn = block.attn
    b, n, _ = x.shape
    h = block.norm1(x)
    gate = attn.gate(h).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = _attention(q, k, v, size, attn.attn_drop.p if block.training else 0.0, attn.scale)
    out = attn.norm(out.transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim))
    if gate is not None:
        out = out * gate
    x = x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out))))
    if r:
        x, size = merge(x, size, k.mean(1), r, prefix)
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x)))), size


def _hf_block(block: nn.Module, x: torch.Tensor, size: torch.Tensor | None, r: int,
              prefix: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' ViTLayer / DeiTLayer with merging between attention and MLP."""
    attn = block.attention
    b, n, _ = x.shape
    h = block.layernorm_before(x)
    q, k, v = (proj(h).view(b, n, -1, attn.head_dim).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    out = _attention(q, k, v, size, attn.attention_dropout if block.training else 0.0, attn.scaling)
    x = x + block.dropout(attn.o_proj(out.transpose(1, 2).reshape(b, n, -1)))
    if r:
        x, size = merge(x, size, k.mean(1), r, prefix)
    return x + block.dropout(block.mlp(block.layernorm_after(x))), size


def _earlier(n: int, device: torch.device) -> torch.Tensor:
    """[n, n] float32, 1 where the row's position is before the column's: a constant of the graph
    (not CumSum, whose shape ONNX Runtime's quantizer cannot infer)."""
    positions = torch.arange(n, device=device)
    return (positions[:, None] < positions[None, :]).float()


def merge(x: torch.Tensor, size: torch.Tensor | None, metric: torch.Tensor, r: int,
          prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bipartite soft matching: merge `r` tokens of `x` [B, N, C] (sizes [B, N, 1], None: all 1)
    by the similarity of `metric` [B, N, K]; returns the [B, N - r, C] tokens and their sizes.

    Order out: the prefix tokens, set A's unmerged tokens in their order, then set B (each with
    whatever merged into it). Ties go to the lower position, in the edge ranking and in each A
    token's choice of B token. The choices are made in float32 and the counts that place tokens are
    sums, not matrix products, so they stay exact under autocast."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    a0, b0 = prefix + prefix % 2, prefix + 1 - prefix % 2  # the first even and odd positions after the prefix
    metric = metric.float()
    metric = metric / (metric * metric).sum(dim=-1, keepdim=True).sqrt()  # not ReduceL2: ONNX Runtime's quantizer cannot infer its shape
    scores = metric[:, a0::2] @ metric[:, b0::2].transpose(-1, -2)  # [B, nA, nB] cosine similarities
    n_a, n_b = scores.shape[-2:]
    best = scores.amax(dim=-1, keepdim=True)
    is_best = (scores == best).float()
    first = is_best * torch.arange(n_b, 0, -1, device=x.device).float()  # no products with constants: INT8 keeps them float
    edge = (first == first.amax(dim=-1, keepdim=True)).float()  # one-hot: each A token's first best B token
    strength = best[..., 0]
    earlier = _earlier(n_a, x.device)
    outranks = (strength[:, :, None] > strength[:, None, :]).float() + \
        (strength[:, :, None] == strength[:, None, :]).float() * earlier
    merges = (outranks.sum(dim=1) < r).float()  # [B, nA]: the r strongest edges
    keeps = 1 - merges
    slot = (keeps[:, :, None] * earlier).sum(dim=1)  # where each kept A token goes among the kept ones (exact counts)
    slots = torch.arange(n_a - r, device=x.device).float()
    keep = (keeps[:, None, :] * (slot[:, None, :] == slots[None, :, None]).float()).to(x.dtype)  # [B, nA - r, nA]
    into = (edge * merges[..., None]).transpose(1, 2).to(x.dtype)  # [B, nB, nA]: the A tokens merging into each B token
    weighted = x * size
    a_x, b_x, a_s, b_s = weighted[:, a0::2], weighted[:, b0::2], size[:, a0::2], size[:, b0::2]
    out = torch.cat([weighted[:, :prefix], keep @ a_x, b_x + into @ a_x], dim=1)
    sizes = torch.cat([size[:, :prefix], keep @ a_s, b_s + into @ a_s], dim=1)
    return out / sizes, sizes


def gflops(spec: ModelSpec, num_classes: int, merging: Merging | None) -> float:
    """GFLOPs per image of one forward pass with `merging` (models.model_cost's convention), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from vitdeploy.models import build_model

    with torch.device("meta"):
        model = build_model(spec, num_classes).eval()
        x = torch.empty(1, 3, spec.input_size, spec.input_size)
    counter = FlopCounterMode(display=False)
    with merged(model, merging), counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 1e9


def describe(merging: Merging | None) -> str:
    if merging is None:
        return "no token merging"
    left = merging.tokens[-1]
    return (f"token merging r={merging.label}: {merging.merged} of {merging.tokens[0] - merging.prefix} patch tokens merged "
            f"over {len(merging.schedule)} blocks, {left} tokens reach the head ({math.ceil(100 * left / merging.tokens[0])}%)")
