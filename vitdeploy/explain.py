"""Where a ViT looks: attention rollout (Abnar & Zuidema 2020) and its gradient-weighted
form (Chefer et al. 2021) over the patch grid, for every model vitdeploy deploys.

torchvision's encoder calls attention with `need_weights=False` (and a fused kernel in
eval mode), and timm's `Attention` uses the fused scaled-dot-product kernel, so the
weights are never materialized. `AttentionHooks` adds a forward hook to each such module
that recomputes it from the same input with explicit weights A and returns the module's
output from A V: the model's output is unchanged (within float rounding), no library code
is copied or forked, and A stays in the autograd graph, so the gradient of a class score
with respect to every A is available. transformers' models return their own attention
probabilities (eager attention, `output_attentions=True`), which are used as they are.
Prefix tokens (class, distillation, registers) are dropped from the map; the map is the
relevance to the tokens the head reads (`Tokens`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitdeploy.choices import EXPLAIN_METHODS, HEAD_FUSIONS
from vitdeploy.errors import VitDeployError
from vitdeploy.manifest import MANIFEST, read_manifest, recorded_checkpoint
from vitdeploy.models import LoadedModel, load_model
from vitdeploy.predictions import top_k as top_k_predictions
from vitdeploy.preprocess import Preprocess, Preprocessing
from vitdeploy.progress import Ticker

EXPLAIN_CHUNK = 8  # images per forward (and backward) pass


@dataclass(frozen=True)
class Tokens:
    """The token layout of a model: `prefix` tokens before the patches, of which the head reads the
    first `readout` (1: the class token; 2: class and distillation tokens, averaged; 0: the patches' mean)."""

    prefix: int = 1
    readout: int = 1

    @classmethod
    def of(cls, spec: Any) -> Tokens:
        return cls(spec.prefix_tokens, spec.readout_tokens)

    def patch_scores(self, relevance: torch.Tensor) -> torch.Tensor:
        """B x T x T token relevance -> B x patches: the rows of what the head reads, over the patches."""
        rows = relevance[:, :self.readout] if self.readout else relevance[:, self.prefix:]
        return rows.mean(dim=1)[:, self.prefix:]


def _is_timm_attention(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("qkv", "num_heads", "q_norm", "k_norm", "proj", "scale"))


class AttentionHooks:
    """While active, each layer's attention of `model` (torchvision's `nn.MultiheadAttention` and
    timm's `Attention`, recomputed with explicit weights; a transformers model's own) is kept in
    `attentions` (one B x heads x tokens x tokens per layer)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.recorder = model.recording() if hasattr(model, "recording") else None  # transformers (sources.hf_vit)
        self.modules = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention) or _is_timm_attention(m)]
        if not self.modules and self.recorder is None:
            raise VitDeployError("the model has no attention layers to explain")
        self.attentions: list[torch.Tensor] = []
        self._handles: list[Any] = []

    def __enter__(self) -> AttentionHooks:
        if self.recorder is not None:
            self.attentions = self.recorder.__enter__()
            return self
        self._handles = [m.register_forward_hook(self._hook if isinstance(m, nn.MultiheadAttention) else self._timm_hook)
                         for m in self.modules]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.recorder is not None:
            self.recorder.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _timm_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """timm's Attention.forward with the softmax written out (its eager path)."""
        x = args[0]
        b, n, _ = x.shape
        h = module.num_heads
        q, k, v = module.qkv(x).reshape(b, n, 3, h, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = module.q_norm(q), module.k_norm(k)
        weights = torch.softmax((q * module.scale) @ k.transpose(-2, -1), dim=-1)
        self.attentions.append(weights)
        out = getattr(module, "norm", nn.Identity())((weights @ v).transpose(1, 2).reshape(b, n, -1))
        gate = getattr(module, "gate", None)
        if gate is not None:
            out = out * gate(x).sigmoid()
        return module.proj_drop(module.proj(out))

    def _hook(self, module: nn.MultiheadAttention, args: tuple, output: Any) -> tuple[torch.Tensor, None]:
        x = args[0]  # torchvision passes the same normalized tokens as query, key and value (batch first)
        b, n, e = x.shape
        h = module.num_heads
        q, k, v = F.linear(x, module.in_proj_weight, module.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, h, e // h).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(e // h), dim=-1)
        self.attentions.append(weights)
        out = (weights @ v).transpose(1, 2).reshape(b, n, e)
        return module.out_proj(out), None


def fuse_heads(attention: torch.Tensor, head_fusion: str) -> torch.Tensor:
    """B x heads x T x T -> B x T x T."""
    if head_fusion == "mean":
        return attention.mean(dim=1)
    if head_fusion == "max":
        return attention.amax(dim=1)
    raise VitDeployError(f"unknown head fusion {head_fusion!r}; use {' or '.join(HEAD_FUSIONS)}")


def rollout(attentions: list[torch.Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0,
            tokens: Tokens = Tokens()) -> torch.Tensor:
    """Attention rollout: per layer the head-fused attention, its weakest `discard_ratio` of
    entries dropped (the first token's own column kept), plus the identity for the residual
    path, rows renormalized; multiplied through the layers. Returns the read-out tokens' rows
    over the patch tokens (B x patches, see `Tokens`)."""
    result = None
    for attention in attentions:
        fused = fuse_heads(attention.detach().float(), head_fusion)
        b, t, _ = fused.shape
        if discard_ratio > 0:
            flat = fused.reshape(b, -1).clone()
            drop = flat.topk(int(flat.shape[1] * discard_ratio), dim=1, largest=False).indices
            keep_cls = drop % t == 0  # entries of column 0 (attention to the class token) stay
            flat.scatter_(1, drop, torch.where(keep_cls, flat.gather(1, drop), torch.zeros_like(drop, dtype=flat.dtype)))
            fused = flat.reshape(b, t, t)
        step = (fused + torch.eye(t, device=fused.device)) / 2
        step = step / step.sum(dim=-1, keepdim=True)
        result = step if result is None else step @ result
    assert result is not None
    return tokens.patch_scores(result)


def grad_rollout(attentions: list[torch.Tensor], gradients: list[torch.Tensor], tokens: Tokens = Tokens()) -> torch.Tensor:
    """Gradient-weighted rollout (Chefer et al. 2021): R = I, then per layer
    R <- R + mean_heads(relu(grad * A)) R. Returns the read-out tokens' rows over the patch
    tokens (B x patches, see `Tokens`)."""
    relevance = None
    for attention, grad in zip(attentions, gradients, strict=True):
        weighted = (grad.detach().float() * attention.detach().float()).clamp(min=0).mean(dim=1)
        if relevance is None:
            relevance = torch.eye(weighted.shape[-1], device=weighted.device).expand_as(weighted).clone()
        relevance = relevance + weighted @ relevance
    assert relevance is not None
    return tokens.patch_scores(relevance)


@dataclass(frozen=True)
class Explanation:
    """One batch's maps (B x grid x grid, each scaled to a maximum of 1), the logits, and the
    class each map explains."""

    maps: torch.Tensor
    logits: torch.Tensor
    classes: torch.Tensor


def explain_batch(model: nn.Module, inputs: torch.Tensor, method: str = "rollout", head_fusion: str = "mean",
                  discard_ratio: float = 0.0, target: torch.Tensor | None = None, tokens: Tokens = Tokens()) -> Explanation:
    """Maps for a batch of model inputs (normalized, at the model's input size). `target`
    (B class indices) picks the class for grad-rollout; default: each image's top-1."""
    check_options(method, head_fusion, discard_ratio)
    model.eval()
    with AttentionHooks(model) as hooks, torch.set_grad_enabled(method == "grad-rollout"):
        logits = model(inputs)
        classes = logits.argmax(dim=1) if target is None else target
        if method == "rollout":
            patch_scores = rollout(hooks.attentions, head_fusion, discard_ratio, tokens)
        else:
            score = logits.gather(1, classes[:, None]).sum()
            gradients = torch.autograd.grad(score, hooks.attentions)
            patch_scores = grad_rollout(hooks.attentions, list(gradients), tokens)
    grid = math.isqrt(patch_scores.shape[1])
    if grid * grid != patch_scores.shape[1]:
        raise VitDeployError(f"{patch_scores.shape[1]} patch tokens do not form a square grid")
    maps = patch_scores.reshape(-1, grid, grid)
    maps = maps / maps.flatten(1).amax(dim=1).clamp(min=1e-12)[:, None, None]
    return Explanation(maps.cpu(), logits.detach().float().cpu(), classes.detach().cpu())


def load_explained_model(source: Path, checkpoint: Path | None = None) -> LoadedModel:
    """The PyTorch model behind an artifact folder (its recorded checkpoint, or `checkpoint`,
    which must be that same file), a run folder or a checkpoint file."""
    source = Path(source)
    if (source / MANIFEST).is_file():
        path = recorded_checkpoint(read_manifest(source), checkpoint, "explain needs the PyTorch weights")
    else:
        path = checkpoint or source
    return load_model(path)


def class_index(choice: str, class_names: list[str]) -> int:
    """A class given by name or by index (ASCII digits)."""
    if choice in class_names:
        return class_names.index(choice)
    if choice.isascii() and choice.isdigit() and len(choice) <= 9 and int(choice) < len(class_names):
        return int(choice)
    raise VitDeployError(f"--class must be a class name ({', '.join(class_names)}) or an index from 0 to "
                         f"{len(class_names) - 1} (got {choice[:40]!r})")


def check_options(method: str, head_fusion: str, discard_ratio: float) -> None:
    """Refuse an unknown method or head fusion, or a discard ratio outside [0, 1), before any work."""
    if method not in EXPLAIN_METHODS:
        raise VitDeployError(f"unknown method {method!r}; use {' or '.join(EXPLAIN_METHODS)}")
    if head_fusion not in HEAD_FUSIONS:
        raise VitDeployError(f"unknown head fusion {head_fusion!r}; use {' or '.join(HEAD_FUSIONS)}")
    if not 0 <= discard_ratio < 1:
        raise VitDeployError(f"--discard-ratio must be in [0, 1) (got {discard_ratio})")


def explain_images(model: nn.Module, preprocessing: Preprocessing, class_names: list[str], images: np.ndarray,
                   method: str = "rollout", head_fusion: str = "mean", discard_ratio: float = 0.0,
                   target: int | None = None, top_k: int = 5, say: Callable[[str], None] | None = None,
                   tokens: Tokens = Tokens()) -> tuple[list[dict[str, Any]], np.ndarray]:
    """For uint8 images (N x 3 x H x W at the source size): one JSON-ready record each (top-k
    classes, the class explained, the map as numbers) and the maps (N x grid x grid)."""
    check_options(method, head_fusion, discard_ratio)
    preprocess = Preprocess(preprocessing)
    results = []
    ticker = Ticker()
    for first in range(0, len(images), EXPLAIN_CHUNK):  # bounded memory: attention of every layer is kept per chunk
        chunk = torch.from_numpy(np.ascontiguousarray(images[first:first + EXPLAIN_CHUNK]))
        chosen = None if target is None else torch.full((len(chunk),), target, dtype=torch.int64)
        results.append(explain_batch(model, preprocess(chunk), method, head_fusion, discard_ratio, chosen, tokens))
        done = first + len(chunk)
        if say is not None and done < len(images) and ticker.due():
            say(f"explained {done}/{len(images)} images")
    maps = torch.cat([r.maps for r in results]).numpy()
    all_logits = torch.cat([r.logits for r in results]).numpy()
    all_classes = torch.cat([r.classes for r in results]).tolist()
    grid = maps.shape[-1]
    records = []
    for logits, cls, heat in zip(all_logits, all_classes, maps, strict=True):
        logits = logits.astype(np.float64)
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        records.append({
            "method": method,
            **({"head_fusion": head_fusion, "discard_ratio": discard_ratio} if method == "rollout" else {}),
            "class": {"index": cls, "label": class_names[cls], "probability": float(probabilities[cls])},
            "predictions": top_k_predictions(logits, class_names, top_k),
            "grid": [grid, grid],
            "patch_size": preprocessing.input_size // grid,
            "input_size": preprocessing.input_size,
            "map": np.round(heat, 5).tolist(),
            "map_definition": "relevance of each patch (row-major, top-left first) to the token(s) the head reads "
                              "(the class token; for distilled models also the distillation token; for pooled models "
                              "the patches' mean), scaled to a maximum of 1",
        })
    return records, maps
