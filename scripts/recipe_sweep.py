"""Short-run recipe sweep for vit_cifar_tiny: the README's 2-epoch CPU command, in fp32,
with candidate settings, run in parallel on a GPU (where each run takes seconds rather
than the CPU's 18 minutes). It chooses the recipe to confirm on the CPU; it proves nothing
about the CPU by itself. Used by scripts/gpu_check.sh.

    python3 scripts/recipe_sweep.py --data-dir DATA --out-json sweep.json [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BASE = {"model": "vit_cifar_tiny", "epochs": 2, "precision": "fp32", "seed": 0}
CANDIDATES = {
    "recipe": {},
    "recipe_seed1": {"seed": 1},
    "recipe_seed2": {"seed": 2},
    "lr1e-3": {"lr": 1e-3},
    "lr2e-3_wu0.2": {"lr": 2e-3, "warmup_frac": 0.2},
    "b64_lr5e-4": {"batch_size": 64, "lr": 5e-4},
    "b64_lr3e-4": {"batch_size": 64, "lr": 3e-4},
    "b32_lr3e-4": {"batch_size": 32, "lr": 3e-4},
    "ls0": {"label_smoothing": 0.0},
    "crop4": {"crop_padding": 4},  # the default of runs under 10 epochs is no crops
    "lr1e-3_wd0_clip0": {"lr": 1e-3, "weight_decay": 0.0, "grad_clip": 0.0},
    "lr1e-3_wu0.15": {"lr": 1e-3, "warmup_frac": 0.15},
}


def run_one(name: str, options: dict, data_dir: str, device: str, runs: Path, subset: int | None) -> None:
    """One training run in this process (the worker side)."""
    from vitdeploy.train import TrainConfig, run_training

    extra = {"subset": subset, "val_size": 40} if subset else {}
    values = {**BASE, **options, **extra}
    config = TrainConfig.from_options(values.pop("model"), data_dir=data_dir, device=device,
                                      out=str(runs / name), **values)
    run_training(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out-json", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--runs", default=".gpu/runs/sweep")
    parser.add_argument("--subset", type=int, default=None, help="Tiny runs for a plumbing test.")
    parser.add_argument("--only", nargs="*", default=None, help="Candidate names to run.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    runs = Path(args.runs)
    if args.worker:
        run_one(args.worker, CANDIDATES[args.worker], args.data_dir, args.device, runs, args.subset)
        return
    names = args.only or list(CANDIDATES)
    start = time.time()
    procs = {}
    for name in names:
        command = [sys.executable, __file__, "--data-dir", args.data_dir, "--out-json", args.out_json,
                   "--device", args.device, "--runs", str(runs), "--worker", name]
        if args.subset:
            command += ["--subset", str(args.subset)]
        procs[name] = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    results = []
    for name, proc in procs.items():
        _, err = proc.communicate()
        record = {"name": name, "options": {**BASE, **CANDIDATES[name]}, "rc": proc.returncode}
        summary = runs / name / "summary.json"
        if proc.returncode == 0 and summary.is_file():
            s = json.loads(summary.read_text())
            record.update({k: s[k] for k in ("best_val_acc", "final_test_acc", "steps", "train_images_per_s")})
        else:
            record["error"] = err[-2000:]
        results.append(record)
        print(json.dumps(record), flush=True)
    Path(args.out_json).write_text(json.dumps({"device": args.device, "seconds": round(time.time() - start, 1),
                                               "runs": results}, indent=2))


if __name__ == "__main__":
    main()
