"""Tiny random timm and transformers ViTs saved the way their hubs lay them out, for tests
that run with no network: timm's in a Hugging Face cache (`models--timm--NAME/snapshots/REV`),
transformers' as a save_pretrained folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

REVISION = "0123456789abcdef0123456789abcdef01234567"
TIMM_ARGS = {  # NAME -> (timm architecture, model_args): small, and each a different token layout
    "vit_tiny_patch16_224.test_reg": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 32,
                                                              "depth": 2, "num_heads": 2, "reg_tokens": 2}),
    "deit_tiny_distilled_patch16_224.test": ("deit_tiny_distilled_patch16_224", {"img_size": 32, "patch_size": 16,
                                                                                "embed_dim": 32, "depth": 2, "num_heads": 2}),
    "vit_tiny_patch16_224.test_p32": ("vit_tiny_patch16_224", {"img_size": 224, "patch_size": 32, "embed_dim": 32,
                                                              "depth": 2, "num_heads": 2}),
}
LABELS = ["alpha", "beta", "gamma"]


def timm_cache(hf_home: Path, name: str, num_classes: int = 3, weights: bool = True) -> Path:
    """A random timm model saved as timm/NAME in the cache under `hf_home`; returns its snapshot folder."""
    import timm
    from safetensors.torch import save_file

    arch, args = TIMM_ARGS[name]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **args)
    repo = hf_home / "hub" / f"models--timm--{name}"
    folder = repo / "snapshots" / REVISION
    folder.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    config: dict[str, Any] = {
        "architecture": arch, "num_classes": num_classes, "model_args": args,
        "label_names": LABELS[:num_classes] if num_classes == len(LABELS) else None,
        "pretrained_cfg": {"input_size": [3, args["img_size"], args["img_size"]], "interpolation": "bicubic",
                           "crop_pct": 0.875, "crop_mode": "center", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                           "num_classes": num_classes},
    }
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    if weights:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def hf_folder(path: Path, kind: str = "vit", image_size: int = 32, patch_size: int = 8) -> Path:
    """A random transformers ViT ("vit"), DeiT ("deit") or DeiT with teacher ("deit-teacher") saved to `path`."""
    import transformers

    torch.manual_seed(0)
    config_class = transformers.ViTConfig if kind == "vit" else transformers.DeiTConfig
    config = config_class(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=image_size, patch_size=patch_size, num_labels=len(LABELS),
                          id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    model_class = {"vit": transformers.ViTForImageClassification, "deit": transformers.DeiTForImageClassification,
                   "deit-teacher": transformers.DeiTForImageClassificationWithTeacher}[kind]
    model_class(config).save_pretrained(str(path))
    processor = {"do_resize": True, "size": {"height": image_size, "width": image_size}, "resample": 3,
                 "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    (path / "preprocessor_config.json").write_text(json.dumps(processor))
    return path
