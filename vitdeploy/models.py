"""The model registry: every ViT vitdeploy trains, by name, with its input size,
loadable weights, preprocessing and the kind of training recipe it takes (`train.recipes`).

All entries are torchvision's `VisionTransformer` class (the torchvision variants with
their published shapes, the CIFAR-native ones at 32 px with 4 px patches), so every
model shares one code path through training, export and serving. Weights come from
local files only: torchvision's ImageNet checkpoints from the torch hub cache (fetched
there when online), or a file given with --weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torchvision.models.vision_transformer import VisionTransformer

from vitdeploy.checkpoint import FORMAT, load_checkpoint, resolve_checkpoint, safe_load
from vitdeploy.errors import VitDeployError
from vitdeploy.preprocess import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
)

HEAD_PREFIX = "heads."


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry. `pretrained` maps a weights tag to torchvision's weights enum."""

    name: str
    description: str
    input_size: int
    patch_size: int
    num_layers: int
    num_heads: int
    hidden_dim: int
    mlp_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    family: str  # whose training recipes it takes: "finetune" or "scratch" (vitdeploy.train.recipes)
    default_recipe: str
    pretrained: dict[str, str] = field(default_factory=dict)

    @property
    def default_pretrained(self) -> str | None:
        return next(iter(self.pretrained), None)

    def preprocessing(self, source_size: int = 32) -> Preprocessing:
        return Preprocessing(source_size, self.input_size, "bilinear", self.mean, self.std)


def _torchvision(name: str, patch: int, layers: int, heads: int, hidden: int, mlp: int, weights: dict[str, str]) -> ModelSpec:
    return ModelSpec(
        name=name,
        description=f"torchvision {name}, 224 px, patch {patch}, fine-tuned from ImageNet",
        input_size=224,
        patch_size=patch,
        num_layers=layers,
        num_heads=heads,
        hidden_dim=hidden,
        mlp_dim=mlp,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        family="finetune",
        default_recipe="short",
        pretrained=weights,
    )


def _cifar(name: str, hidden: int, layers: int, heads: int, mlp: int, what: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        description=f"CIFAR-native ViT, 32 px, patch 4, {what}, trained from scratch",
        input_size=32,
        patch_size=4,
        num_layers=layers,
        num_heads=heads,
        hidden_dim=hidden,
        mlp_dim=mlp,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        family="scratch",
        default_recipe="long",
    )


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _torchvision("vit_b_16", 16, 12, 12, 768, 3072, {
            "IMAGENET1K_V1": "ViT_B_16_Weights.IMAGENET1K_V1",
            "IMAGENET1K_SWAG_LINEAR_V1": "ViT_B_16_Weights.IMAGENET1K_SWAG_LINEAR_V1",
        }),
        _torchvision("vit_b_32", 32, 12, 12, 768, 3072, {"IMAGENET1K_V1": "ViT_B_32_Weights.IMAGENET1K_V1"}),
        _torchvision("vit_l_16", 16, 24, 16, 1024, 4096, {
            "IMAGENET1K_V1": "ViT_L_16_Weights.IMAGENET1K_V1",
            "IMAGENET1K_SWAG_LINEAR_V1": "ViT_L_16_Weights.IMAGENET1K_SWAG_LINEAR_V1",
        }),
        _torchvision("vit_l_32", 32, 24, 16, 1024, 4096, {"IMAGENET1K_V1": "ViT_L_32_Weights.IMAGENET1K_V1"}),
        # torchvision has no IMAGENET1K_V1 for vit_h_14; its SWAG E2E weights are for 518 px.
        _torchvision("vit_h_14", 14, 32, 16, 1280, 5120, {
            "IMAGENET1K_SWAG_LINEAR_V1": "ViT_H_14_Weights.IMAGENET1K_SWAG_LINEAR_V1",
        }),
        _cifar("vit_cifar_tiny", 192, 6, 3, 768, "hidden 192, 6 layers, 3 heads"),
        _cifar("vit_cifar_small", 384, 6, 6, 1536, "hidden 384, 6 layers, 6 heads"),
    )
}


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise VitDeployError(f"unknown model {name!r}; choose one of {', '.join(REGISTRY)} (see `vitdeploy models`)") from None


def build_model(spec: ModelSpec, num_classes: int = 10) -> VisionTransformer:
    """A freshly initialized model with a `num_classes` head."""
    return VisionTransformer(
        image_size=spec.input_size,
        patch_size=spec.patch_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        hidden_dim=spec.hidden_dim,
        mlp_dim=spec.mlp_dim,
        num_classes=num_classes,
    )


@lru_cache(maxsize=None)
def model_cost(name: str, num_classes: int = 10) -> tuple[int, float]:
    """(parameter count, GFLOPs per image for one forward pass), counted on the meta device.

    Convention: one multiply-add is 2 FLOPs, as torch's FlopCounterMode counts matmuls
    and convolutions (elementwise ops, softmax and norms are not counted).
    """
    from torch.utils.flop_counter import FlopCounterMode

    spec = get_spec(name)
    with torch.device("meta"):
        model = build_model(spec, num_classes)
        x = torch.empty(1, 3, spec.input_size, spec.input_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() / 1e9


@dataclass(frozen=True)
class LoadReport:
    """What a weights load did: its source and the keys left freshly initialized."""

    source: str
    initialized: tuple[str, ...]

    def describe(self) -> str:
        fresh = ", ".join(self.initialized) if self.initialized else "none"
        return f"loaded weights from {self.source}; freshly initialized: {fresh}"


def apply_state_dict(model: torch.nn.Module, state: dict[str, Any], spec: ModelSpec, source: str) -> LoadReport:
    """Load `state` into `model`; only the classification head may differ (it is re-initialized)."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VitDeployError(f"{source} is not a state dict of tensors; pass a torchvision state dict or a vitdeploy checkpoint")
    own = model.state_dict()
    usable, mismatched, unexpected = {}, [], []
    for key, value in state.items():
        if key not in own:
            unexpected.append(key)
        elif value.shape != own[key].shape:
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
        else:
            usable[key] = value
    missing = [k for k in own if k not in usable]
    body_problems = [m for m in mismatched if not m.startswith(HEAD_PREFIX)] + unexpected
    body_missing = [k for k in missing if not k.startswith(HEAD_PREFIX)]
    if body_problems or body_missing:
        example = (body_problems + body_missing)[0]
        raise VitDeployError(
            f"{source} does not fit {spec.name}: {len(body_missing)} missing, {len(unexpected)} unexpected and "
            f"{len([m for m in mismatched if not m.startswith(HEAD_PREFIX)])} mis-shaped tensors (e.g. {example}); "
            f"pass weights saved from {spec.name}, or choose the --model they belong to"
        )
    model.load_state_dict(usable, strict=False)
    return LoadReport(source=source, initialized=tuple(missing))


def hub_cache_file(spec: ModelSpec, tag: str) -> tuple[Path, str]:
    """Where torch hub keeps torchvision's `tag` weights for `spec`, and the URL they come from."""
    from torchvision.models import get_weight

    if tag not in spec.pretrained:
        known = ", ".join(spec.pretrained) or "none (train it from scratch, or pass --weights FILE)"
        raise VitDeployError(f"{spec.name} has no pretrained weights {tag!r}; available: {known}")
    url = get_weight(spec.pretrained[tag]).url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name, url


def load_pretrained(model: torch.nn.Module, spec: ModelSpec, tag: str | None = None) -> LoadReport:
    """torchvision's ImageNet weights from the hub cache, downloading them there when online."""
    tag = tag or spec.default_pretrained
    if tag is None:
        raise VitDeployError(f"{spec.name} has no pretrained weights; drop --pretrained or pass --weights FILE")
    path, url = hub_cache_file(spec, tag)
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), progress=True)
        except Exception as exc:  # urllib raises URLError / OSError / HTTPError
            raise VitDeployError(
                f"no cached {tag} weights for {spec.name}: expected {path.name} in {path.parent} "
                f"and downloading {url} failed ({exc}); copy that file there, pass --weights FILE, or train from "
                "scratch with --no-pretrained (offline, the small vit_cifar_tiny and vit_cifar_small need no weights)"
            ) from exc
    return apply_state_dict(model, safe_load(path, "weights file"), spec, f"{path} ({tag})")


def load_weights_file(model: torch.nn.Module, spec: ModelSpec, path: Path) -> LoadReport:
    """A local torchvision-format state dict or vitdeploy checkpoint."""
    data = safe_load(Path(path), "weights file")
    if isinstance(data, dict) and data.get("format") == FORMAT:
        if data.get("model_name") != spec.name:
            raise VitDeployError(
                f"{path} is a checkpoint of {data.get('model_name')}, not {spec.name}; use --model {data.get('model_name')}"
            )
        data = data["model"]
    return apply_state_dict(model, data, spec, str(path))


def load_exact_state(model: torch.nn.Module, state: Any, spec: ModelSpec, source: str) -> None:
    """Load a full state dict (a checkpoint's own weights: every key and shape must match)."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VitDeployError(f"{source} holds no state dict of tensors; pass a checkpoint written by `vitdeploy train`")
    own = model.state_dict()
    problems = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape]
    problems += [f"unexpected {k}" for k in state if k not in own] + [f"missing {k}" for k in own if k not in state]
    if problems:
        raise VitDeployError(
            f"{source} says it holds {spec.name}, but its weights do not fit "
            f"({len(problems)} problems, e.g. {problems[0]}); the file is damaged or was edited: use the checkpoint its run wrote"
        )
    model.load_state_dict(state)


def checkpoint_weights(checkpoint: dict[str, Any]) -> tuple[str, Any]:
    """Which weights a checkpoint deploys, and them: its EMA ('ema') when the run kept one,
    as that is what the run evaluated and chose best.pt by, else the trained ones ('model')."""
    ema = checkpoint.get("ema")
    if ema is not None:
        return "ema", ema.get("state") if isinstance(ema, dict) else None
    return "model", checkpoint["model"]


def model_from_checkpoint(checkpoint: dict[str, Any], source: str) -> tuple[ModelSpec, VisionTransformer]:
    """The registry spec and the model with the deployed weights of a loaded vitdeploy checkpoint."""
    spec = get_spec(checkpoint["model_name"])
    model = build_model(spec, len(checkpoint["class_names"]))
    kind, state = checkpoint_weights(checkpoint)
    load_exact_state(model, state, spec, source if kind == "model" else f"{source} (EMA weights)")
    return spec, model


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint's model ready to deploy: its deployed weights (the EMA where the run kept one)
    in eval mode, with the preprocessing and class names it was trained with."""

    path: Path
    checkpoint: dict[str, Any]
    spec: ModelSpec
    module: VisionTransformer
    preprocessing: Preprocessing
    class_names: list[str]


def load_model(source: Path) -> LoadedModel:
    """The model of a checkpoint file or run folder (its best.pt, else last.pt): the one loading
    path of export, the pytorch backend, explain and serve."""
    path = resolve_checkpoint(source, "deploy")
    checkpoint = load_checkpoint(path)
    spec, model = model_from_checkpoint(checkpoint, str(path))
    return LoadedModel(path, checkpoint, spec, model.eval(), Preprocessing.from_dict(checkpoint["preprocessing"]),
                       list(checkpoint["class_names"]))
