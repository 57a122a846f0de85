"""Inference backends: one small interface (activate / infer / deactivate, used as a
context manager) over PyTorch and ONNX Runtime. Optional packages are imported inside
their backend modules only."""

from vitdeploy.backends.base import Backend, run_batches

__all__ = ["Backend", "run_batches"]
