"""A model as it was published or trained elsewhere, deployed without a training run
(`vitdeploy export MODEL_NAME`): its weights with their own head, class names,
input size and evaluation preprocessing, made into the same checkpoint `vitdeploy train`
writes, so export, bench, serve and explain take it like any run's.

The weights are those of a timm model in the Hugging Face cache, of an `hf:` folder, or
`--weights FILE` (a state dict of the model's own layout, e.g. a torchvision ViT trained
elsewhere). Class names come from the model (transformers' id2label, timm's label_names
or ImageNet-1k's for a 1000-class timm head) or `--class-names FILE`, one per line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vitdeploy import __version__
from vitdeploy.checkpoint import FORMAT, FORMAT_VERSION, read_weights
from vitdeploy.errors import VitDeployError
from vitdeploy.models import REGISTRY, LoadedModel, ModelSpec, apply_state_dict, build_model, get_spec, load_pretrained
from vitdeploy.sources import source_of

CHECKPOINT = "model.pt"  # the checkpoint an export of a published model writes beside its graphs
MAX_CLASS_FILE_BYTES = 4 << 20


def read_class_names(path: Path, count: int | None) -> tuple[str, ...]:
    """One class name per line (blank lines ignored), `count` of them where the head's size is known."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size > MAX_CLASS_FILE_BYTES:
        raise VitDeployError(f"--class-names {path} is not a file of at most {MAX_CLASS_FILE_BYTES >> 20} MiB")
    try:
        names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except UnicodeDecodeError:
        raise VitDeployError(f"--class-names {path} is not UTF-8 text; write one class name per line") from None
    if not names or (count is not None and len(names) != count):
        raise VitDeployError(f"--class-names {path} has {len(names)} names, the model's head {count}; write one per line")
    if len(set(names)) != len(names) or max(len(n) for n in names) > 200:
        raise VitDeployError(f"--class-names {path}: names must be unique and at most 200 characters")
    return names


def _head_size(state: dict[str, Any], model: torch.nn.Module, spec: ModelSpec, source: str) -> int:
    """The class count of the head the weights carry (`model`: the architecture, any head size)."""
    expected = [k for k, v in model.state_dict().items() if spec.is_head(k) and v.ndim == 2]
    found = [k for k in expected if k in state and getattr(state[k], "ndim", 0) == 2]
    if not found:
        raise VitDeployError(f"{source} does not hold {spec.name} with its classification head (no {expected[0]}; "
                             f"it has e.g. {next(iter(state), 'nothing')}); pass a state dict saved from {spec.name}, whole")
    return int(state[found[0]].shape[0])


def _weights(spec: ModelSpec, weights: Path | None) -> tuple[torch.nn.Module, str]:
    """The model with its published weights, every tensor loaded (its own head included)."""
    if spec.source == "hf":
        if weights is not None:
            raise VitDeployError(f"{spec.name} takes its weights from its folder; drop --weights")
        model = build_model(spec, len(spec.labels) or 1)
        report = load_pretrained(model, spec)
        if report.initialized:
            raise VitDeployError(f"{spec.name}: the folder's weights lack {', '.join(report.initialized[:3])}; "
                                 "use an intact model folder")
        return model, report.source
    if weights is None:
        if spec.source != "timm":
            raise VitDeployError(f"{spec.name} as published needs its weights: pass --weights FILE (a state dict saved "
                                 "from it), or export a run folder of `vitdeploy train`")
        from vitdeploy.sources import timm_vit

        weights = timm_vit.cached_weights(spec)
    state = read_weights(Path(weights), "weights file")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VitDeployError(f"{weights} is not a state dict of tensors (a vitdeploy checkpoint is exported as SOURCE itself)")
    with torch.device("meta"):
        skeleton = build_model(spec, 1)
    model = build_model(spec, _head_size(state, skeleton, spec, str(weights)))
    report = apply_state_dict(model, state, spec, str(weights))  # refuses weights of another architecture or shape
    if report.initialized:
        raise VitDeployError(f"{weights} lacks {', '.join(report.initialized[:3])} of {spec.name}; pass its whole state dict")
    return model, str(weights)


def load_published(name: str, weights: Path | None, class_names: Path | None, recorded: Path) -> LoadedModel:
    """The model `name` as published, as a LoadedModel whose checkpoint is yet to be written at
    `recorded` (see CHECKPOINT)."""
    if source_of(name) == "torchvision" and name not in REGISTRY:
        raise VitDeployError(f"SOURCE {name} does not exist, and it is no model name either; pass a run folder of "
                             "`vitdeploy train`, a checkpoint, timm:NAME, hf:FOLDER_OR_REPO or a registry name with --weights")
    spec = get_spec(name)
    model, origin = _weights(spec, weights)
    model.eval()
    count = int(next(v for k, v in model.state_dict().items() if spec.is_head(k) and k.endswith("weight")).shape[0])
    names = read_class_names(class_names, count) if class_names is not None else spec.labels
    if len(names) != count:
        raise VitDeployError(f"{name} names {len(names)} classes for its {count}-class head; pass --class-names FILE "
                             "(one name per line)")
    preprocessing = spec.own_preprocessing()
    checkpoint = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "vitdeploy_version": __version__,
        "model_name": spec.name, "model_source": spec.to_record(), "model": model.state_dict(),
        "class_names": list(names), "preprocessing": preprocessing.to_dict(),
        "config": {"published": {"model": name, "weights": origin}},
    }
    return LoadedModel(Path(recorded), checkpoint, spec, model, preprocessing, list(names))
