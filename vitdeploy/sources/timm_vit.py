"""`timm:NAME`: timm's Vision Transformers (`VisionTransformer` and the DeiT variants built
on it: class, distillation and register tokens, any patch and input size timm allows).

NAME is timm's `ARCH` or `ARCH.TAG` (e.g. `vit_small_patch16_224.augreg_in21k_ft_in1k`).
The architecture, preprocessing and class names come from the cached model's
config.json when the Hugging Face cache holds `timm/NAME` (timm's own hub layout), else
from timm's built-in configuration of NAME; the weights from that cache or --weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vitdeploy.errors import VitDeployError
from vitdeploy.models import ModelSpec
from vitdeploy.sources import channel_values, hub_cache, import_extra, read_json

PREFIX = "timm:"
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
MAX_ARG = 16384  # any integer architecture argument (depth, width, patch, image size, tokens) beyond this is refused


def _ref(name: str) -> str:
    ref = name[len(PREFIX):]
    if "/" in ref or not hub_cache.valid_repo(ref):
        raise VitDeployError(f"{name!r} is not a timm model name; write timm:ARCH or timm:ARCH.TAG "
                             "(`vitdeploy models --source timm` lists them)")
    return ref


def _labels(config: dict[str, Any], pretrained_cfg: dict[str, Any], num_classes: int) -> tuple[str, ...]:
    """The model's class names: its config's label_names, or ImageNet-1k's for a 1000-class head."""
    names = config.get("label_names", pretrained_cfg.get("label_names"))
    if isinstance(names, dict):
        try:
            names = [names[k] for k in sorted(names, key=int)]
        except (TypeError, ValueError):
            names = None
    if isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) for n in names):
        return tuple(n[:200] for n in names)
    if num_classes == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return tuple(info.index_to_description(i)[:200] for i in range(1000))
    return ()


def _args_in_range(args: Any) -> bool:
    """timm architecture arguments that cannot size memory or time without bound (they may come from a
    downloaded config.json or a checkpoint): integers in -1..16384, depth at most 1000."""
    from vitdeploy.models import MAX_LAYERS

    return isinstance(args, dict) and all(isinstance(k, str) for k in args) and \
        all(not isinstance(v, int) or -1 <= v <= MAX_ARG for v in args.values()) and \
        (not isinstance(args.get("depth"), int) or args["depth"] <= MAX_LAYERS)


def _repo(timm: Any, ref: str) -> str:
    """The hub repository of NAME's weights: timm/NAME when cached, else its pretrained config's hf_hub_id
    (for a bare architecture, its default tag's: timm/vit_base_patch16_224.augreg2_in21k_ft_in1k)."""
    if hub_cache.snapshot(f"timm/{ref}") is not None or not timm.is_model(ref.split(".")[0]):
        return f"timm/{ref}"
    hub = getattr(timm.models.get_pretrained_cfg(ref), "hf_hub_id", None)
    return hub if isinstance(hub, str) and hub_cache.valid_repo(hub) else f"timm/{ref}"


def spec(name: str) -> ModelSpec:
    """What `timm:NAME` is, read from local files only; a name timm does not know, or a model that
    is not one of timm's ViTs, is refused."""
    timm = import_extra("timm")
    from timm.models.vision_transformer import VisionTransformer

    ref = _ref(name)
    repo = _repo(timm, ref)
    folder = hub_cache.snapshot(repo)
    config = read_json(folder / "config.json", "timm config") if folder and (folder / "config.json").is_file() else {}
    arch = config.get("architecture", ref.split(".")[0])
    if not isinstance(arch, str) or not timm.is_model(arch):
        close = timm.list_models(f"*{str(arch)[:40]}*")[:5]
        raise VitDeployError(f"timm has no model {arch!r}" + (f" (close: {', '.join(close)})" if close else "")
                             + "; `vitdeploy models --source timm` lists timm's ViTs")
    pretrained_cfg = config.get("pretrained_cfg")
    if not isinstance(pretrained_cfg, dict):
        found = timm.models.get_pretrained_cfg(ref if "." in ref else arch)
        pretrained_cfg = found.to_dict() if found is not None else {}
    model_args = config.get("model_args", {})
    if not _args_in_range(model_args):
        raise VitDeployError(f"{folder}/config.json has malformed or out-of-range model_args; use an intact model folder")
    num_classes = config.get("num_classes", pretrained_cfg.get("num_classes", 1000))
    if not isinstance(num_classes, int) or not 0 <= num_classes <= 100_000:
        raise VitDeployError(f"{folder}/config.json has a malformed num_classes; use an intact model folder")
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **model_args)
    except Exception as exc:  # noqa: BLE001 - timm's factories raise many types for bad arguments
        raise VitDeployError(f"timm could not build {arch} with {model_args} ({type(exc).__name__}: {str(exc)[:160]})") from None
    if not isinstance(model, VisionTransformer):
        raise VitDeployError(f"timm:{arch} is a {type(model).__name__}, not one of timm's Vision Transformers; "
                             "vitdeploy deploys ViTs (`vitdeploy models --source timm` lists them)")
    weights = hub_cache.weights_in(folder) if folder else None
    expected = weights or hub_cache.repo_folder(repo) / "snapshots" / "REVISION" / hub_cache.WEIGHT_FILES[0]
    return _spec_of(model, name, {"architecture": arch, "model_args": model_args}, pretrained_cfg,
                    _labels(config, pretrained_cfg, model.num_classes), str(expected))


def _spec_of(model: Any, name: str, build: dict[str, Any], cfg: dict[str, Any], labels: tuple[str, ...],
             weights: str) -> ModelSpec:
    height, width = model.patch_embed.img_size
    patch = model.patch_embed.patch_size
    if height != width or patch[0] != patch[1]:
        raise VitDeployError(f"{name} takes {height}x{width} images with {patch[0]}x{patch[1]} patches; vitdeploy's "
                             "contract is square images and patches")
    block = model.blocks[0]
    fc1 = getattr(getattr(block, "mlp", None), "fc1", None)
    crop = cfg.get("crop_pct") if cfg.get("crop_mode", "center") != "squash" else None
    interpolation = cfg.get("interpolation", "bicubic")
    distilled = hasattr(model, "head_dist")
    return ModelSpec(
        name=name,
        description=f"timm {build['architecture']}, {height} px, patch {patch[0]}",
        input_size=int(height), patch_size=int(patch[0]), num_layers=len(model.blocks),
        num_heads=int(block.attn.num_heads), hidden_dim=int(model.embed_dim),
        mlp_dim=int(fc1.out_features) if fc1 is not None else 0,
        mean=channel_values(cfg.get("mean"), (0.485, 0.456, 0.406), f"{name}'s pretrained config (mean)"),
        std=channel_values(cfg.get("std"), (0.229, 0.224, 0.225), f"{name}'s pretrained config (std)"),
        family="finetune", default_recipe="short", pretrained={"local": weights},
        source="timm", build=build,
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bicubic",
        crop_fraction=float(crop) if isinstance(crop, (int, float)) and 0.25 <= crop <= 1 else None,
        labels=labels, prefix_tokens=int(model.num_prefix_tokens),
        readout_tokens=(2 if distilled else 1) if model.global_pool == "token" else 0,
        head_prefixes=("head.", "head_dist.") if distilled else ("head.",),
        block_pattern=r"blocks\.(\d+)\.", embed_pattern=r"(patch_embed|cls_token|reg_token|dist_token|pos_embed)",
        no_decay=("cls_token", "reg_token", "dist_token", "pos_embed"),
    )


def build(spec: ModelSpec, num_classes: int) -> torch.nn.Module:
    timm = import_extra("timm")
    arch, args = spec.build.get("architecture"), spec.build.get("model_args")
    if not isinstance(arch, str) or not timm.is_model(arch) or not _args_in_range(args):
        raise VitDeployError(f"{spec.name}: its description names no timm architecture, or arguments out of range; "
                             "the checkpoint is damaged")
    try:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, **args)
    except Exception as exc:  # noqa: BLE001 - timm's factories raise many types for bad arguments
        raise VitDeployError(f"timm could not build {arch} ({type(exc).__name__}: {str(exc)[:160]})") from None


def cached_weights(spec: ModelSpec) -> Path:
    """The weights file `spec` was found with, or the error that says where it is looked for."""
    path = Path(spec.pretrained["local"])
    if not path.is_file():
        repo = path.parents[2].name.removeprefix("models--").replace("--", "/", 1)  # HUB/models--ORG--NAME/snapshots/REV/FILE
        raise VitDeployError(
            f"no local weights for {spec.name}: looked for {path.name} in {path.parent} (the Hugging Face cache, "
            f"{hub_cache.hub_dir()}; nothing is downloaded); copy {repo} there (e.g. `hf download {repo}` on "
            "a machine online, then copy the cache), pass --weights FILE (safetensors or a torch state dict), "
            "or train from random weights with --no-pretrained")
    return path


def model_names(pattern: str = "*") -> list[str]:
    """timm's ViT and DeiT architectures (its vision_transformer and deit modules), by pattern."""
    timm = import_extra("timm")
    return sorted({*timm.list_models(pattern, module="vision_transformer"), *timm.list_models(pattern, module="deit")})
