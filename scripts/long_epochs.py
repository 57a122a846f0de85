"""How many epochs of the long recipe fit a training-time budget, from a measured rate.

Reads the JSON `vitdeploy bench-train --json` wrote (images/s with real data, same batch,
precision and compile as the run) and prints the number of epochs that take about
`--seconds` of training-loop time. Used by scripts/gpu_check.sh (section cifar_long).

    python3 scripts/long_epochs.py RATE.json --seconds 300 --data-dir DATA [--subset N] [--val-size N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitdeploy.data import load_train  # noqa: E402

MAX_EPOCHS = 1000


def epochs_for(rate: float, seconds: float, train_images: int) -> int:
    """Whole epochs of `train_images` at `rate` images/s within `seconds` (at least 1)."""
    return max(1, min(MAX_EPOCHS, int(seconds * rate // train_images)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rate_json", type=Path)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--subset", type=int)
    parser.add_argument("--val-size", type=int, default=5000)
    args, _train_options = parser.parse_known_args()
    records = json.loads(args.rate_json.read_text())
    rate = next(r["train_images_per_s"] for r in records if r["source"] == "real")
    train_images = len(load_train(args.data_dir)) - args.val_size
    if args.subset:
        train_images = min(train_images, args.subset)
    print(epochs_for(rate, args.seconds, train_images))


if __name__ == "__main__":
    main()
