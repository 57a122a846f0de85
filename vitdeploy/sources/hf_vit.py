"""`hf:FOLDER_OR_REPO`: Hugging Face `transformers` ViT and DeiT image classifiers
(`ViTForImageClassification`, `DeiTForImageClassification`,
`DeiTForImageClassificationWithTeacher`).

FOLDER is what `save_pretrained` writes (config.json, model.safetensors and, where the
model has one, preprocessor_config.json); a REPO id is looked up in the Hugging Face cache.
transformers reads them with `local_files_only=True`: nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitdeploy.errors import VitDeployError
from vitdeploy.models import MAX_LAYERS, MAX_WIDTH, LoadReport, ModelSpec
from vitdeploy.sources import channel_values, hub_cache, import_extra, read_json

PREFIX = "hf:"
ARCHITECTURES = {  # architecture -> (model_type, leading tokens read by the head)
    "ViTForImageClassification": ("vit", 1),
    "DeiTForImageClassification": ("deit", 1),
    "DeiTForImageClassificationWithTeacher": ("deit", 2),
}
DEFAULT_ARCHITECTURE = {"vit": "ViTForImageClassification", "deit": "DeiTForImageClassification"}
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's codes in preprocessor_config.json


class HFClassifier(nn.Module):
    """A transformers classifier as a module from normalized images to logits. While
    `attentions` is a list, each forward appends the model's own attention probabilities
    (eager attention, `output_attentions=True`), which explain reads."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.hf = model
        self.attentions: list[torch.Tensor] | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.attentions is None:
            return self.hf(pixel_values=images).logits
        output = self.hf(pixel_values=images, output_attentions=True)
        self.attentions.extend(output.attentions)
        return output.logits

    @contextmanager
    def recording(self) -> Iterator[list[torch.Tensor]]:
        """Collect each layer's attention probabilities (B x heads x T x T) of the forwards inside."""
        before = self.hf.config._attn_implementation
        self.hf.set_attn_implementation("eager")  # the fused kernels never form the probabilities
        self.attentions = []
        try:
            yield self.attentions
        finally:
            self.attentions = None
            self.hf.set_attn_implementation(before)


def is_classifier(repo: str) -> bool:
    """Whether the cached `repo` is a ViT/DeiT image classifier vitdeploy takes (for listings)."""
    folder = hub_cache.snapshot(repo)
    if repo.startswith("timm/") or folder is None or not (folder / "config.json").is_file():
        return False
    try:
        _architecture(read_json(folder / "config.json", "config"), folder)
    except VitDeployError:
        return False
    return True


def _folder(name: str) -> Path:
    ref = name[len(PREFIX):]
    path = Path(ref).expanduser()
    if path.is_dir():
        folder = path.resolve()
    elif hub_cache.valid_repo(ref) and not path.is_absolute():
        folder = hub_cache.snapshot(ref)
        if folder is None:
            raise VitDeployError(f"{name}: no folder {ref} and no cached copy of it in {hub_cache.repo_folder(ref)} "
                                 "(nothing is downloaded); pass the folder save_pretrained wrote, or copy the repository "
                                 "into the Hugging Face cache")
    else:
        raise VitDeployError(f"{name}: there is no folder {ref}, and it is no repository id (ORG/NAME) either; "
                             "pass the folder save_pretrained wrote")
    if not (folder / "config.json").is_file():
        raise VitDeployError(f"{folder} has no config.json; an hf: model is the folder save_pretrained writes "
                             "(config.json, model.safetensors)")
    return folder


def _architecture(config: dict[str, Any], folder: Path) -> str:
    model_type = config.get("model_type")
    names = config.get("architectures") or [DEFAULT_ARCHITECTURE.get(str(model_type), "")]
    arch = names[0] if isinstance(names, list) and names else ""
    if arch not in ARCHITECTURES or ARCHITECTURES[arch][0] != model_type:
        raise VitDeployError(f"{folder} holds a {model_type} model ({arch or 'no architecture'}); vitdeploy takes "
                             f"{', '.join(ARCHITECTURES)}")
    return arch


def _preprocessor(folder: Path) -> dict[str, Any]:
    """mean, std, interpolation and crop fraction from preprocessor_config.json (ViTImageProcessor's defaults without it)."""
    path = folder / "preprocessor_config.json"
    config = read_json(path, "preprocessor config") if path.is_file() else {}
    resize = config.get("size", {})
    side = resize.get("shortest_edge", resize.get("height")) if isinstance(resize, dict) else resize
    crop = config.get("crop_size", {})
    crop_side = crop.get("height") if isinstance(crop, dict) else crop
    fraction = None
    if config.get("do_center_crop") and isinstance(side, int) and isinstance(crop_side, int) and side > 0:
        fraction = crop_side / side if 0.25 <= crop_side / side <= 1 else None
    resample = config.get("resample", 2)
    return {"mean": channel_values(config.get("image_mean"), (0.5, 0.5, 0.5), f"{path} (image_mean)"),
            "std": channel_values(config.get("image_std"), (0.5, 0.5, 0.5), f"{path} (image_std)"),
            "interpolation": RESAMPLE.get(resample, "bicubic") if isinstance(resample, int) else "bicubic",
            "crop_fraction": fraction}


def spec(name: str) -> ModelSpec:
    """What `hf:FOLDER_OR_REPO` is, from its config.json and preprocessor_config.json."""
    import_extra("hf")
    folder = _folder(name)
    config = read_json(folder / "config.json", "config")
    arch = _architecture(config, folder)
    try:
        size, patch = int(config.get("image_size", 224)), int(config.get("patch_size", 16))
        layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
        hidden, mlp = int(config["hidden_size"]), int(config["intermediate_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise VitDeployError(f"{folder}/config.json lacks {exc} or holds a malformed number; use an intact model folder") from None
    if not (1 <= layers <= MAX_LAYERS and 1 <= hidden <= MAX_WIDTH and 1 <= mlp <= 4 * MAX_WIDTH and 1 <= heads <= hidden
            and 2 <= patch <= size <= 1024):
        raise VitDeployError(f"{folder}/config.json asks for sizes out of range ({layers} layers, width {hidden}, "
                             f"{size} px, patch {patch}); use an intact model folder")
    labels = config.get("id2label") or {}
    try:
        names = tuple(str(labels[k])[:200] for k in sorted(labels, key=int)) if isinstance(labels, dict) else ()
    except (TypeError, ValueError):
        names = ()
    weights = hub_cache.weights_in(folder)
    model_type, readout = ARCHITECTURES[arch]
    return ModelSpec(
        name=name, description=f"transformers {arch}, {size} px, patch {patch}", input_size=size, patch_size=patch,
        num_layers=layers, num_heads=heads, hidden_dim=hidden, mlp_dim=mlp, family="finetune", default_recipe="short",
        pretrained={"local": str(weights or folder / hub_cache.WEIGHT_FILES[0])}, source="hf",
        build={"architecture": arch, "config": config, "folder": str(folder)}, labels=names,
        prefix_tokens=2 if model_type == "deit" else 1, readout_tokens=readout,
        head_prefixes=("hf.classifier.", "hf.cls_classifier.", "hf.distillation_classifier."),
        block_pattern=r"hf\.(?:vit|deit)\.(?:layers|encoder\.layer)\.(\d+)\.", embed_pattern=r"hf\.(?:vit|deit)\.embeddings\.",
        no_decay=("cls_token", "position_embeddings", "distillation_token", "mask_token"),
        **_preprocessor(folder),
    )


def _transformers() -> Any:
    """transformers, quiet: vitdeploy says itself what a load did."""
    transformers = import_extra("hf")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _config(spec: ModelSpec, num_classes: int) -> Any:
    arch, config = spec.build.get("architecture"), spec.build.get("config")
    sizes = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")
    if arch not in ARCHITECTURES or not isinstance(config, dict) or \
            [config.get(k) for k in sizes] != [spec.num_layers, spec.hidden_dim, spec.mlp_dim, spec.num_heads]:
        raise VitDeployError(f"{spec.name}: its description's config does not match its sizes; the checkpoint is damaged")
    config_class = getattr(_transformers(), arch).config_class
    labels = dict(enumerate(spec.labels)) if num_classes == len(spec.labels) else {i: f"LABEL_{i}" for i in range(num_classes)}
    return config_class.from_dict({**config, "id2label": labels, "label2id": {v: k for k, v in labels.items()}})


def build(spec: ModelSpec, num_classes: int) -> HFClassifier:
    transformers = _transformers()
    return HFClassifier(getattr(transformers, spec.build["architecture"])(_config(spec, num_classes)))


def load_pretrained(model: HFClassifier, spec: ModelSpec) -> LoadReport:
    """The folder's weights through transformers' own loader (which knows every layout its versions
    wrote), into `model`; only the classifier may be new."""
    transformers = _transformers()
    folder = Path(spec.build["folder"])
    if hub_cache.weights_in(folder) is None:
        raise VitDeployError(f"no weights for {spec.name}: looked for {' or '.join(hub_cache.WEIGHT_FILES)} in {folder} "
                             "(nothing is downloaded); save the model there with save_pretrained, or train from random "
                             "weights with --no-pretrained")
    num_classes = model.hf.config.num_labels
    try:
        loaded, info = getattr(transformers, spec.build["architecture"]).from_pretrained(
            str(folder), config=_config(spec, num_classes), local_files_only=True, ignore_mismatched_sizes=True,
            output_loading_info=True, use_safetensors=None)
    except (OSError, ValueError, RuntimeError) as exc:
        raise VitDeployError(f"transformers could not load {folder} ({type(exc).__name__}: {str(exc)[:200]}); "
                             "use an intact model folder") from None
    mismatched = [k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", [])]  # 4.x: names; 5.x: tuples
    fresh = [f"hf.{k}" for k in [*info.get("missing_keys", []), *mismatched]]
    body = [k for k in fresh + [f"hf.{k}" for k in info.get("unexpected_keys", [])] if not spec.is_head(k)]
    if body:
        raise VitDeployError(f"the weights in {folder} do not fit its config.json ({len(body)} tensors missing, unexpected "
                             f"or mis-shaped, e.g. {body[0]}); use an intact model folder")
    model.hf.load_state_dict(loaded.state_dict())
    return LoadReport(source=str(folder), initialized=tuple(sorted(fresh)))
