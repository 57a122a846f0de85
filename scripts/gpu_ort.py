#!/usr/bin/env python3
"""ONNX Runtime with CUDA on the lent GPU machine, which cannot download it (docs/gpu-plan.md).

The onnxruntime-gpu wheel (about 256 MB) is four times what one run carries, so it travels
in parts in back-to-back runs and is put together there:

  here:  python3 scripts/gpu_ort.py split WHEEL --out .gpu/ort            # parts + wheel.json (sha256s)
         python3 scripts/gpu_ort.py slim RUN_OR_CHECKPOINT .gpu/ort/model.pt  # weights only, to carry
  there: python3 scripts/gpu_ort.py join .gpu/ort --target .gpu/ort-site  # checks every sha256, pip --target
         python3 scripts/gpu_ort.py probe --target .gpu/ort-site --json $OUT/ort_probe.json
         python3 scripts/gpu_ort.py random-checkpoint vit_b_16 .gpu/runs/b16-random.pt

`split` makes as few parts as fit one run each: a run carries the checkout (what git
tracks and does not ignore, measured on disk), wheel.json and one part, within the device
tool's 64 MiB with a margin; the last part is the remainder.

`probe` exits 0 only when the CUDA provider is listed and a CUDA session really runs on
it (torch is imported first, so the CUDA 13 libraries of its wheels are found); gpu_check
skips its ONNX Runtime sections with the probe's reason otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY_LIMIT = 64 * 2**20  # the device tool's limit for one run: checkout + carried files
MARGIN = 2**20  # room for files added to the checkout between the split and the runs (gpu_plan.py checks)
WHEEL_JSON_MAX = 4096  # wheel.json travels with every part
PROBE_TIMEOUT_S = 30.0  # importing torch, starting CUDA and loading the 284 MB provider library (here: ~4 s on a CPU)


def checkout_bytes(repo: Path = REPO) -> int:
    """What every run carries besides its `carry` list: the files git tracks or would track, as on disk."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum(p.stat().st_size for n in names if n and (p := repo / os.fsdecode(n)).is_file())


def part_size(checkout: int) -> int:
    """The largest part one run carries beside the checkout, wheel.json and the margin. Every part but the
    last has this size: the last run has the most room left (for the test images, docs/gpu-plan.md)."""
    room = CARRY_LIMIT - checkout - WHEEL_JSON_MAX - MARGIN
    if room < 2**20:
        raise SystemExit(f"error: the checkout takes {checkout / 2**20:.1f} MiB of the 64 MiB a run carries: "
                         "no room for a part")
    return room


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def split(wheel: Path, out: Path, size: int) -> dict:
    """Cut `wheel` into parts of at most `size` bytes; wheel.json records every sha256."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("part-*"):  # parts of an earlier split would travel with the plan's carries
        stale.unlink()
    parts = []
    with open(wheel, "rb") as f:
        while block := f.read(size):
            part = out / f"part-{len(parts):02d}"
            part.write_bytes(block)
            parts.append({"name": part.name, "size": len(block), "sha256": hashlib.sha256(block).hexdigest()})
    record = {"wheel": wheel.name, "size": wheel.stat().st_size, "sha256": sha256(wheel), "parts": parts}
    (out / "wheel.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def join(folder: Path, target: Path) -> Path:
    """Check each part, put the wheel together, check it, install it with pip --target."""
    record = json.loads((folder / "wheel.json").read_text())
    wheel = folder / record["wheel"]
    with open(wheel, "wb") as f:
        for part in record["parts"]:
            path = folder / part["name"]
            if not path.is_file():
                raise SystemExit(f"error: {path} is missing: send every part (runs back to back, the machine keeps "
                                 "ignored files only while warm)")
            data = path.read_bytes()
            if len(data) != part["size"] or hashlib.sha256(data).hexdigest() != part["sha256"]:
                raise SystemExit(f"error: {path} is damaged (sha256 differs); send it again")
            f.write(data)
    if sha256(wheel) != record["sha256"]:
        raise SystemExit(f"error: the joined {wheel.name} does not match its sha256; send the parts again")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile",
                    "--target", str(target), str(wheel)], check=True)
    return wheel


PROBE = """
import json, sys, time
start = time.perf_counter()
import torch  # first: its CUDA 13 libraries are what onnxruntime-gpu loads
import onnxruntime as ort
from onnx import TensorProto, helper
record = {"onnxruntime": ort.__version__, "file": ort.__file__, "providers": ort.get_available_providers(),
          "cuda_available_to_torch": torch.cuda.is_available()}
if "CUDAExecutionProvider" not in record["providers"]:
    record["reason"] = "onnxruntime has no CUDAExecutionProvider (the CPU build was imported?)"
else:
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
        record["session_providers"] = session.get_providers()
        import numpy as np
        y = session.run(None, {"x": np.ones(4, np.float32)})[0]
        if session.get_providers()[0] != "CUDAExecutionProvider":
            record["reason"] = f"the session fell back to {session.get_providers()}: the CUDA libraries did not load"
        elif not (y == 2).all():
            record["reason"] = f"the CUDA session computed {y.tolist()} for 1 + 1"
    except Exception as exc:
        record["reason"] = f"creating a CUDA session failed: {str(exc).splitlines()[0]}"
record["ok"] = "reason" not in record
record["seconds"] = round(time.perf_counter() - start, 2)
print(json.dumps(record))
"""


def probe(target: Path | None, timeout: float = PROBE_TIMEOUT_S) -> dict:
    """Whether onnxruntime (from `target` first) runs a session on the CUDA provider; a dict with ok/reason."""
    env = dict(os.environ)
    if target is not None:
        env["PYTHONPATH"] = f"{target}{os.pathsep}{env.get('PYTHONPATH', '')}"
    try:
        result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "reason": f"the probe took longer than {timeout:g} s"}
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "reason": f"the probe failed: {tail}"}


def slim(source: Path, out: Path) -> None:
    """A vitdeploy checkpoint with the model weights alone (what export needs), to carry."""
    import torch

    from vitdeploy.checkpoint import atomic_save, load_checkpoint, resolve_checkpoint

    checkpoint = load_checkpoint(resolve_checkpoint(source))
    keep = ("format", "format_version", "vitdeploy_version", "model_name", "model", "config", "preprocessing",
            "class_names", "precision", "epoch", "step", "progress")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({k: checkpoint[k] for k in keep if k in checkpoint}, out)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, torch {torch.__version__})")


def random_checkpoint(model_name: str, out: Path, data_dir: str) -> None:
    """A checkpoint of `model_name` with seeded random weights: latency and backend parity do not depend on
    training. torchvision initializes the head to zeros, which makes every logit 0 and parity vacuous
    (max |dlogit| 0 even in fp16), so the head is drawn at random too; accuracy is chance."""
    import torch

    from vitdeploy import __version__
    from vitdeploy.checkpoint import FORMAT, FORMAT_VERSION, atomic_save
    from vitdeploy.data import CLASS_NAMES
    from vitdeploy.models import build_model, get_spec
    from vitdeploy.train import TrainConfig

    torch.manual_seed(0)
    spec = get_spec(model_name)
    model = build_model(spec, len(CLASS_NAMES))
    head = model.heads.head
    torch.nn.init.normal_(head.weight, std=head.in_features ** -0.5)  # logits of about unit spread
    torch.nn.init.normal_(head.bias, std=0.1)
    config = TrainConfig.from_options(model_name, data_dir=data_dir, out=str(out.parent), pretrained=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"format": FORMAT, "format_version": FORMAT_VERSION, "vitdeploy_version": __version__,
                 "model_name": spec.name, "model": model.state_dict(), "config": config.to_dict(),
                 "preprocessing": spec.preprocessing().to_dict(), "class_names": list(CLASS_NAMES),
                 "precision": "fp32", "epoch": 0, "step": 0}, out)
    print(f"wrote {out}: {model_name} with seeded random weights, head included (parity and latency are meaningful; "
          "accuracy is chance)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("split")
    p.add_argument("wheel", type=Path)
    p.add_argument("--out", type=Path, default=Path(".gpu/ort"))
    p.add_argument("--part-mb", type=float, help="part size (default: as large as one run carries beside the checkout)")
    p = verbs.add_parser("join")
    p.add_argument("folder", type=Path)
    p.add_argument("--target", type=Path, required=True, help="install folder (gpu_check: inside its work folder)")
    p = verbs.add_parser("probe")
    p.add_argument("--target", type=Path)
    p.add_argument("--timeout", type=float, default=PROBE_TIMEOUT_S)
    p.add_argument("--json", type=Path)
    p = verbs.add_parser("slim")
    p.add_argument("source", type=Path)
    p.add_argument("out", type=Path)
    p = verbs.add_parser("random-checkpoint")
    p.add_argument("model")
    p.add_argument("out", type=Path)
    p.add_argument("--data-dir", default=".gpu/data")
    args = parser.parse_args()
    if args.verb == "split":
        checkout = checkout_bytes()
        size = int(args.part_mb * 2**20) if args.part_mb else part_size(checkout)
        record = split(args.wheel, args.out, size)
        print(f"{len(record['parts'])} parts of at most {size / 2**20:.2f} MiB in {args.out} (checkout "
              f"{checkout / 2**20:.2f} MiB); sha256 {record['sha256']}")
    elif args.verb == "join":
        start = time.perf_counter()
        wheel = join(args.folder, args.target)
        print(f"installed {wheel.name} into {args.target} in {time.perf_counter() - start:.1f} s")
    elif args.verb == "probe":
        record = probe(args.target, args.timeout)
        if args.json:
            args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(("ONNX Runtime CUDA works: " if record["ok"] else "ONNX Runtime CUDA does not work here: ")
              + json.dumps(record))
        sys.exit(0 if record["ok"] else 1)
    elif args.verb == "slim":
        slim(args.source, args.out)
    else:
        random_checkpoint(args.model, args.out, args.data_dir)


if __name__ == "__main__":
    main()
