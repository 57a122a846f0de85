"""Models by name: the registry of torchvision ViTs vitdeploy trains, and the names of
the other sources (`timm:NAME`, `hf:FOLDER_OR_REPO`, see `vitdeploy.sources`), each with
its input size, loadable weights, preprocessing and the kind of training recipe it takes
(`train.recipes`).

Registry entries are torchvision's `VisionTransformer` class (the torchvision variants
with their published shapes, the CIFAR-native ones at 32 px with 4 px patches). A
`ModelSpec` says everything the rest of vitdeploy needs of any model (how to build it,
where its head, blocks and embeddings are, its preprocessing and classes), so every model
shares one code path through training, export and serving. Weights come from local files
only: torchvision's ImageNet checkpoints from the torch hub cache (fetched there when
online), timm and Hugging Face weights from the Hugging Face cache or a folder, or a
file given with --weights.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torchvision.models.vision_transformer import VisionTransformer

from vitdeploy.checkpoint import FORMAT, load_checkpoint, read_weights, resolve_checkpoint, safe_load
from vitdeploy.errors import VitDeployError
from vitdeploy.preprocess import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
)

SOURCES = ("torchvision", "timm", "hf")
MAX_PARAMS = 4_000_000_000  # above timm's largest ViT (1.8 B): a description asking for more is not a ViT we deploy
MAX_LAYERS, MAX_WIDTH = 1000, 16384


@dataclass(frozen=True)
class ModelSpec:
    """One model by name. `pretrained` maps a weights tag to torchvision's weights enum (registry
    models) or to the local weights file a timm/Hugging Face model loads ("local"). `build`
    holds what its source needs to rebuild the architecture (plain types: it is stored in
    checkpoints, so a deployment needs no hub cache); `labels` are the model's own class
    names, `crop_fraction` and `interpolation` its published evaluation transform."""

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
    source: str = "torchvision"
    build: dict[str, Any] = field(default_factory=dict)
    interpolation: str = "bilinear"
    crop_fraction: float | None = None
    labels: tuple[str, ...] = ()
    prefix_tokens: int = 1  # class token, distillation token, registers: before the patch tokens
    readout_tokens: int = 1  # leading tokens the head reads (class, distillation); 0: the mean of the patch tokens
    head_prefixes: tuple[str, ...] = ("heads.",)  # parameters replaced for a new class count
    block_pattern: str = r"encoder\.layers\.encoder_layer_(\d+)\."  # group 1: the block index
    embed_pattern: str = r"(conv_proj|class_token|encoder\.pos_embedding)"
    no_decay: tuple[str, ...] = ("class_token", "pos_embedding")  # name endings kept out of weight decay

    @property
    def default_pretrained(self) -> str | None:
        return next(iter(self.pretrained), None)

    def preprocessing(self, source_size: int = 32) -> Preprocessing:
        """Training on source_size-px images (CIFAR-10): resized to the model's input size in the model's mode."""
        return Preprocessing(source_size, self.input_size, self.interpolation, self.mean, self.std)

    def own_preprocessing(self) -> Preprocessing:
        """Deploying the model as published: pictures fitted to its input size with its crop."""
        return Preprocessing(self.input_size, self.input_size, self.interpolation, self.mean, self.std, self.crop_fraction)

    def layer_id(self, name: str) -> int:
        """0 for the patch/position embeddings and prefix tokens, i+1 for block i, num_layers+1 for the rest."""
        if re.match(self.embed_pattern, name):
            return 0
        block = re.match(self.block_pattern, name)
        return int(block.group(1)) + 1 if block else self.num_layers + 1

    def is_head(self, key: str) -> bool:
        return key.startswith(self.head_prefixes)

    def to_record(self) -> dict[str, Any]:
        """Plain types, for checkpoints (weights_only loading)."""
        record = asdict(self)
        for key in ("mean", "std", "labels", "head_prefixes", "no_decay"):
            record[key] = list(record[key])
        return record

    @classmethod
    def from_record(cls, record: Any, where: str) -> ModelSpec:
        """A spec stored by `to_record`, checked field by field (a checkpoint may be hostile)."""
        names = {f for f in cls.__dataclass_fields__}
        if not isinstance(record, dict) or set(record) != names:
            raise VitDeployError(f"{where} holds a damaged model description; use a checkpoint written by `vitdeploy train` or export")
        try:
            spec = cls(**{**record, **{k: tuple(record[k]) for k in ("mean", "std", "labels", "head_prefixes", "no_decay")}})
            for pattern in (spec.block_pattern, spec.embed_pattern):
                re.compile(pattern)
            ok = (spec.source in SOURCES and 1 <= spec.num_layers <= MAX_LAYERS and 2 <= spec.input_size <= 1024
                  and 1 <= spec.hidden_dim <= MAX_WIDTH and 0 <= spec.mlp_dim <= 4 * MAX_WIDTH
                  and all(isinstance(v, str) for v in (*spec.labels, *spec.head_prefixes, *spec.no_decay))
                  and isinstance(spec.build, dict) and spec.interpolation in ("bilinear", "bicubic", "nearest"))
            spec.own_preprocessing()  # the numbers' ranges
        except (TypeError, ValueError, re.error, VitDeployError) as exc:
            raise VitDeployError(f"{where} holds a damaged model description ({str(exc)[:120]})") from None
        if not ok:
            raise VitDeployError(f"{where} holds a damaged model description (fields out of range)")
        return spec


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
        crop_fraction=0.875,  # torchvision's evaluation transform: resize to 256, centre crop 224
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
    """The spec a model name means: a registry name, `timm:NAME` or `hf:FOLDER_OR_REPO`."""
    from vitdeploy import sources

    source = sources.source_of(name)
    if source == "timm":
        from vitdeploy.sources import timm_vit

        return timm_vit.spec(name)
    if source == "hf":
        from vitdeploy.sources import hf_vit

        return hf_vit.spec(name)
    try:
        return REGISTRY[name]
    except KeyError:
        raise VitDeployError(f"unknown model {name!r}; choose one of {', '.join(REGISTRY)}, or name a timm or Hugging "
                             "Face model as timm:NAME or hf:FOLDER_OR_REPO (see `vitdeploy models`)") from None


def build_model(spec: ModelSpec, num_classes: int = 10) -> torch.nn.Module:
    """A freshly initialized model with a `num_classes` head: a module from normalized images to logits.

    A timm or Hugging Face model is first built on the meta device (no memory) and checked
    against its spec and a size limit: its description may come from a hostile checkpoint."""
    if spec.source != "torchvision":
        with torch.device("meta"):
            probe = _build(spec, num_classes)
        params = sum(p.numel() for p in probe.parameters())
        blocks = {int(m.group(1)) for name, _ in probe.named_parameters() if (m := re.match(spec.block_pattern, name))}
        if params > MAX_PARAMS or len(blocks) != spec.num_layers:
            raise VitDeployError(f"{spec.name}'s description builds {params:,} parameters in {len(blocks)} blocks, not "
                                 f"the {spec.num_layers} blocks it names (at most {MAX_PARAMS:,} parameters); the "
                                 "checkpoint or model folder is damaged")
    return _build(spec, num_classes)


def _build(spec: ModelSpec, num_classes: int) -> torch.nn.Module:
    if spec.source == "timm":
        from vitdeploy.sources import timm_vit

        return timm_vit.build(spec, num_classes)
    if spec.source == "hf":
        from vitdeploy.sources import hf_vit

        return hf_vit.build(spec, num_classes)
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
    body_mismatched = [m for m in mismatched if not spec.is_head(m)]
    body_missing = [k for k in missing if not spec.is_head(k)]
    if body_mismatched or unexpected or body_missing:
        example = (body_mismatched + unexpected + body_missing)[0]
        raise VitDeployError(
            f"{source} does not fit {spec.name}: {len(body_missing)} missing, {len(unexpected)} unexpected and "
            f"{len(body_mismatched)} mis-shaped tensors (e.g. {example}); "
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
    """The model's published weights: torchvision's from the torch hub cache (downloaded there when
    online), timm's and Hugging Face's from their local file (never downloaded)."""
    if spec.source != "torchvision" and tag not in (None, *spec.pretrained):
        raise VitDeployError(f"--pretrained-weights picks torchvision's ImageNet weights; {spec.name} has one set, its "
                             "local file: drop --pretrained-weights")
    if spec.source == "hf":
        from vitdeploy.sources import hf_vit

        return hf_vit.load_pretrained(model, spec)
    tag = tag or spec.default_pretrained
    if tag is None:
        raise VitDeployError(f"{spec.name} has no pretrained weights; drop --pretrained or pass --weights FILE")
    if spec.source == "timm":
        from vitdeploy.sources import timm_vit

        path = timm_vit.cached_weights(spec)
        return apply_state_dict(model, read_weights(path, "weights file"), spec, str(path))
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
    """A local state dict of the model's own layout (safetensors, or a torch file of tensors) or a
    vitdeploy checkpoint."""
    if spec.source == "hf":
        raise VitDeployError(f"{spec.name}: a Hugging Face model takes its weights from its folder (config.json and "
                             "model.safetensors); drop --weights, or name the folder the weights are in as hf:FOLDER")
    data = read_weights(Path(path), "weights file")
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


def spec_of_checkpoint(checkpoint: dict[str, Any], source: str) -> ModelSpec:
    """The spec a checkpoint was written with: the registry's for a registry model, else the
    description it carries (so a deployment needs neither the hub cache nor the model folder)."""
    name = checkpoint["model_name"]
    if name in REGISTRY:
        return REGISTRY[name]
    if "model_source" not in checkpoint:
        return get_spec(name)  # an unknown name: its one error
    spec = ModelSpec.from_record(checkpoint["model_source"], source)
    if spec.name != name:
        raise VitDeployError(f"{source} holds a damaged model description (it names {spec.name!r}, the checkpoint {name!r})")
    return spec


def model_from_checkpoint(checkpoint: dict[str, Any], source: str) -> tuple[ModelSpec, torch.nn.Module]:
    """The spec and the model with the deployed weights of a loaded vitdeploy checkpoint."""
    spec = spec_of_checkpoint(checkpoint, source)
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
    module: torch.nn.Module
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
