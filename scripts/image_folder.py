"""Write an image-folder dataset (ROOT/train/CLASS/*.jpg, ROOT/test/CLASS/*.jpg) from the CIFAR-10
test set, upsampled to --side px: real pictures at a deployment size, for measuring the image-folder
path (decode cache, held vs streamed training) where no folder of one's own is at hand.

    python3 scripts/image_folder.py OUT --data DATA [--train-per-class 200] [--test-per-class 20] [--side 256]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from vitdeploy.data import CLASS_NAMES, load_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="folder holding cifar-10-batches-py")
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--side", type=int, default=256)
    args = parser.parse_args()
    test = load_test(args.data)
    labels = test.labels.numpy()
    for c, name in enumerate(CLASS_NAMES):
        mine = np.flatnonzero(labels == c)
        for split, first, count in (("train", 0, args.train_per_class), ("test", args.train_per_class, args.test_per_class)):
            folder = args.out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                chw = test.images[mine[(first + i) % len(mine)]].numpy()
                image = Image.fromarray(np.ascontiguousarray(chw.transpose(1, 2, 0)))
                image.resize((args.side, args.side), Image.Resampling.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
    print(f"wrote {args.out}: {10 * args.train_per_class} train and {10 * args.test_per_class} test images at {args.side} px")


if __name__ == "__main__":
    main()
