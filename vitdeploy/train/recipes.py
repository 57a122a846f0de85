"""Training recipes: the values a run takes for the options the user does not set, per kind
of model and run length. A recipe names only what it changes from `TrainConfig`'s defaults,
so the options and their defaults are written once, in `TrainConfig`.

`short` recipes are for runs too short to profit from regularization (a few epochs, or
fine-tuning): flips only. `long` ones add random crops, TrivialAugmentWide, random erasing,
mixup/cutmix (for training from scratch) and an EMA of the weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vitdeploy.choices import RECIPES
from vitdeploy.errors import VitDeployError

if TYPE_CHECKING:
    from vitdeploy.models import ModelSpec

LONG_MIN_EPOCHS = 10  # --recipe auto: long from this many epochs on
# The options a recipe decides (the rest of TrainConfig is the user's or the default).
RECIPE_FIELDS = ("epochs", "batch_size", "lr", "weight_decay", "layer_decay", "label_smoothing", "warmup_frac",
                 "crop_padding", "augment", "erase_prob", "mixup", "cutmix", "mixup_alpha", "cutmix_alpha", "ema")

BY_FAMILY: dict[str, dict[str, dict[str, Any]]] = {
    # Fine-tuning from ImageNet weights: few epochs, layer-wise LR decay; the long recipe adds
    # crops, TrivialAugmentWide, erasing and EMA (no mixup: pretrained features fit fast).
    "finetune": {
        "short": {"lr": 1e-4, "batch_size": 128, "epochs": 5, "layer_decay": 0.75},
        "long": {"lr": 1e-4, "batch_size": 128, "epochs": 20, "layer_decay": 0.75, "crop_padding": 4,
                 "augment": "trivial", "erase_prob": 0.25, "ema": True},
    },
    # From scratch on CIFAR-10. short: the 2-epoch CPU run (52.0% test for vit_cifar_tiny; crops cost
    # such runs accuracy, README "Training"). long: the regularization published small-ViT results
    # use (Hassani et al. 2021: ViT-Lite, CCT) with a larger batch that keeps a GPU busy.
    "scratch": {
        "short": {"lr": 5e-4, "batch_size": 128, "epochs": 2},
        "long": {"lr": 1e-3, "batch_size": 512, "epochs": 100, "crop_padding": 4, "augment": "trivial",
                 "erase_prob": 0.25, "mixup": True, "cutmix": True, "ema": True},
    },
}


def choose(spec: ModelSpec, name: str, epochs: int | None) -> tuple[str, dict[str, Any]]:
    """(recipe name, what it sets) for `spec`: 'auto' is long for runs of LONG_MIN_EPOCHS or more
    epochs, short below, and the model's default recipe when the epochs are not given."""
    if name == "auto":
        name = spec.default_recipe if epochs is None else ("long" if epochs >= LONG_MIN_EPOCHS else "short")
    if name not in RECIPES:
        raise VitDeployError(f"unknown recipe {name!r}; use auto, {' or '.join(RECIPES)} (see `vitdeploy models`)")
    return name, BY_FAMILY[spec.family][name]
