"""Which arithmetic training uses on a device: bf16 where the GPU has it natively,
fp16 with a gradient scaler on older GPUs, fp32 on the CPU."""

from __future__ import annotations

import torch

from vitdeploy.choices import TRAIN_PRECISIONS
from vitdeploy.errors import VitDeployError


def native_bf16(capability: tuple[int, int]) -> bool:
    """Compute capability 8.0 (Ampere) or newer computes bf16 in hardware.

    `torch.cuda.is_bf16_supported()` also says yes on V100/T4, where bf16 is emulated and slow.
    """
    return capability >= (8, 0)


def choose_precision(device: torch.device, requested: str = "auto", capability: tuple[int, int] | None = None) -> str:
    """Resolve `requested` ('auto', 'fp32', 'bf16', 'fp16') for `device`.

    `capability` defaults to the CUDA device's; tests pass fake ones.
    """
    if requested not in TRAIN_PRECISIONS:
        raise VitDeployError(f"unknown precision {requested!r}; use one of {', '.join(TRAIN_PRECISIONS)}")
    if device.type != "cuda":
        if requested in ("auto", "fp32"):
            return "fp32"
        raise VitDeployError(f"--precision {requested} needs a CUDA GPU; on {device.type} use --precision fp32 (or auto)")
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    if requested == "auto":
        return "bf16" if native_bf16(capability) else "fp16"
    if requested == "bf16" and not native_bf16(capability):
        raise VitDeployError(
            f"this GPU (compute capability {capability[0]}.{capability[1]}) has no native bf16; use --precision fp16 or auto"
        )
    return requested
