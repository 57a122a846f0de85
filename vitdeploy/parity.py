"""Accuracy parity of an exported artifact against the PyTorch fp32 reference, with
explicit tolerances per precision.

fp32 must reproduce the reference: logits within `max_abs`, and top-1 may differ only
where the reference's top-2 margin is below `margin` (a numerical tie). fp16 (and bf16,
with wider bounds for its coarser rounding) is judged
by what it should preserve: no NaN/Inf, test accuracy within `max_accuracy_drop`
points, and top-1 changes only on images whose fp32 top-2 margin is below `margin`
(where a rounding error can flip the decision); its logit difference is reported. INT8
must keep test accuracy within `max_accuracy_drop` points (default 1.0) and be free of
NaN/Inf; its top-1 agreement and logit difference are reported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """What counts as passing. `max_abs` or `margin` None means reported, not enforced."""

    max_abs: float | None
    margin: float | None
    max_accuracy_drop: float  # percentage points

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


TOLERANCES = {
    "fp32": Tolerance(max_abs=1e-3, margin=2e-3, max_accuracy_drop=0.0),
    "fp16": Tolerance(max_abs=None, margin=0.5, max_accuracy_drop=0.1),
    "bf16": Tolerance(max_abs=None, margin=1.0, max_accuracy_drop=0.3),  # 8 mantissa bits to fp16's 11
    # INT8 changes decisions well away from ties; it is judged by accuracy alone, agreement reported
    "int8": Tolerance(max_abs=None, margin=None, max_accuracy_drop=1.0),
}


TOME_MAX_ACCURACY_DROP = 1.0  # percentage points a token-merged artifact may lose (--tome-max-accuracy-drop)


def merged_tolerance(precision: Tolerance, max_accuracy_drop: float = TOME_MAX_ACCURACY_DROP) -> Tolerance:
    """The gate of a token-merged artifact against the unmerged fp32 reference: accuracy alone (merging
    changes logits well away from ties), `max_accuracy_drop` points plus what its precision's own
    tolerance (`precision`) lets it lose."""
    return Tolerance(None, None, max_accuracy_drop + precision.max_accuracy_drop)


def top2_margin(logits: np.ndarray) -> np.ndarray:
    top2 = np.sort(logits, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def compare(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None, tolerance: Tolerance) -> dict[str, Any]:
    """Parity metrics of `candidate` against `reference` logits, and whether they pass `tolerance`.
    Without `labels` (a model whose classes are not the test set's), accuracy is None and the
    accuracy gate becomes one on agreement: at most `max_accuracy_drop` percent of the images may
    change their top-1 (stricter: a changed answer can only be counted, not judged right or wrong)."""
    finite = np.isfinite(candidate).all(axis=1)
    diff = np.abs(candidate.astype(np.float64) - reference.astype(np.float64))
    diff_finite = diff[finite] if finite.any() else np.zeros((1, 1))
    ref_top1, cand_top1 = reference.argmax(1), candidate.argmax(1)
    disagree = ref_top1 != cand_top1
    margins = top2_margin(reference)
    ref_acc = None if labels is None else float((ref_top1 == labels).mean() * 100)
    cand_acc = None if labels is None else float((cand_top1 == labels).mean() * 100)
    worst_margin = float(margins[disagree].max()) if disagree.any() else None
    failures = []
    if not finite.all():
        failures.append(f"{int((~finite).sum())} images with NaN/Inf logits")
    if tolerance.max_abs is not None and diff_finite.max() > tolerance.max_abs:
        failures.append(f"max abs logit difference {diff_finite.max():.3g} > {tolerance.max_abs:g}")
    if worst_margin is not None and tolerance.margin is not None and worst_margin >= tolerance.margin:
        failures.append(f"top-1 changed on an image whose reference top-2 margin is {worst_margin:.3g} >= {tolerance.margin:g}")
    if ref_acc is not None and cand_acc is not None and ref_acc - cand_acc > tolerance.max_accuracy_drop + 1e-9:
        failures.append(f"accuracy {cand_acc:.2f}% is {ref_acc - cand_acc:.2f} points below the reference {ref_acc:.2f}%")
    changed = float(disagree.mean() * 100)
    if labels is None and changed > tolerance.max_accuracy_drop + 1e-9:
        failures.append(f"top-1 changed on {changed:.2f}% of the images (no labels to measure accuracy; at most "
                        f"{tolerance.max_accuracy_drop:g}% allowed)")
    return {
        "images": int(len(reference)),
        "top1_agreement": float((~disagree).mean()),
        "disagreements": int(disagree.sum()),
        "max_margin_of_disagreement": worst_margin,
        "max_abs_logit_diff": float(diff_finite.max()),
        "mean_abs_logit_diff": float(diff_finite.mean()),
        "nan_inf_images": int((~finite).sum()),
        "reference_accuracy_pct": ref_acc,
        "accuracy_pct": cand_acc,
        "tolerance": tolerance.to_dict(),
        "passed": not failures,
        "failures": failures,
    }


def describe(metrics: dict[str, Any]) -> str:
    """One line for the terminal."""
    verdict = "PASS" if metrics["passed"] else "FAIL: " + "; ".join(metrics["failures"])
    return (
        f"{metrics['images']} images: top-1 agreement {100 * metrics['top1_agreement']:.2f}%, "
        f"max |dlogit| {metrics['max_abs_logit_diff']:.2e}, mean {metrics['mean_abs_logit_diff']:.2e}, "
        + (f"accuracy {metrics['accuracy_pct']:.2f}% (reference {metrics['reference_accuracy_pct']:.2f}%), "
           if metrics["accuracy_pct"] is not None else "accuracy not measured (the model's classes are not CIFAR-10's), ")
        + f"NaN/Inf {metrics['nan_inf_images']} -> {verdict}"
    )
