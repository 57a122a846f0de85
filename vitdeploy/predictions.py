"""Logits -> the top-k answer every consumer gives (`vitdeploy predict`, `vitdeploy serve`)."""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_TOP_K = 5


def default_top_k(num_classes: int) -> int:
    """How many classes an answer lists when the caller does not say: 5, or every class of a smaller model."""
    return min(DEFAULT_TOP_K, num_classes)


def top_k(logits: np.ndarray, classes: list[str], k: int) -> list[dict[str, Any]]:
    """The `k` most probable classes of one image's logits (softmax in float64), most probable first."""
    shifted = np.exp(logits.astype(np.float64) - logits.max())
    probabilities = shifted / shifted.sum()
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [{"label": classes[i], "class_index": int(i), "probability": float(probabilities[i])} for i in order]
