"""The vocabularies of vitdeploy's options: each list of names a library function accepts and
a CLI option offers, owned here once and read by both (the library validates against it, the
CLI builds its choices and help from it). Kept free of imports so that the CLI can read it
without loading torch. The backends themselves are the backend registry's
(`vitdeploy.backends.registry`).
"""

from __future__ import annotations

PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # inference: what a backend runs (which backend runs which: the registry)
EXPORTED_PRECISIONS = ("fp32", "fp16", "int8")  # of exported files (bf16 runs from the checkpoint)
DEFAULT_MODEL = "vit_b_16"  # --model when none is given (the registry: vitdeploy.models)
DEVICES = ("auto", "cpu", "cuda")  # training; "cuda:N" also names one GPU
TRAIN_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUGMENTS = ("none", "trivial")  # per-sample augmentation policy
DATA_PLACEMENTS = ("auto", "memory", "stream")  # where a run's images live (vitdeploy.train.datasource)
RECIPES = ("short", "long")  # training recipes; "auto" chooses by epochs
THROUGHPUT_SOURCES = ("real", "synthetic")  # vitdeploy throughput's inputs; "both" compares them
FP16_POLICIES = {  # how the fp16 ONNX graph is made from the fp32 one
    "matmul": "MatMul/Gemm/Conv in fp16; LayerNorm, Softmax, GELU, residuals and logits in fp32",
    "activations": "all activations in fp16; LayerNorm statistics in fp32 (stash_type 1); input and logits keep their types",
}
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")  # ONNX Runtime's INT8 calibrators
BENCH_MODES = ("end-to-end", "device")
EXPLAIN_METHODS = ("rollout", "grad-rollout")
MODEL_SOURCES = ("registry", "timm", "hf")  # vitdeploy models --source: where model names come from (vitdeploy.sources)
RESIZE_MODES = ("bilinear", "bicubic", "nearest")  # how preprocessing resizes (vitdeploy.preprocess)
HEAD_FUSIONS = ("mean", "max")  # attention rollout: how a layer's heads combine
