"""Do the attention maps mean something? A masking check on real test images.

For each image, the 25% of patches the map ranks highest are masked in the model's input
(patch-aligned, set to the normalized value 0, i.e. the dataset mean colour) and the drop
of the predicted class's probability is compared with masking 25% of the patches at
random (mean of 5 seeded draws). A map that points at what the model uses makes the
first drop larger. Prints and writes JSON with both mean drops and the fraction of images
where the map's mask wins.

    python3 scripts/explain_check.py RUN_OR_ARTIFACTS --data-dir data --images 500 --out-json FILE
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitdeploy.data import load_test  # noqa: E402
from vitdeploy.explain import explain_batch, load_explained_model  # noqa: E402
from vitdeploy.preprocess import Preprocess  # noqa: E402

FRACTION = 0.25
RANDOM_DRAWS = 5


def patch_mask(order: torch.Tensor, count: int, grid: int, patch: int) -> torch.Tensor:
    """B x 1 x H x W, true on the first `count` patches of each row of `order` (patch indices)."""
    chosen = torch.zeros(order.shape[0], grid * grid, dtype=torch.bool)
    chosen.scatter_(1, order[:, :count], True)
    cells = chosen.view(-1, 1, grid, grid)
    return cells.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)


@torch.no_grad()
def class_probability(model: torch.nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    return torch.softmax(model(x).float(), dim=1).gather(1, classes[:, None])[:, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--method", default="rollout")
    parser.add_argument("--head-fusion", default="mean")
    parser.add_argument("--discard-ratio", type=float, default=0.0)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--out-json", type=Path)
    args = parser.parse_args()
    start = time.perf_counter()
    model, preprocessing, _classes, path = load_explained_model(args.source)
    test = load_test(args.data_dir)
    n = min(args.images, len(test))
    preprocess = Preprocess(preprocessing)
    map_drops, random_drops = [], []
    for first in range(0, n, args.batch):
        x = preprocess(test.images[first:first + args.batch])
        result = explain_batch(model, x, args.method, args.head_fusion, args.discard_ratio)
        grid = result.maps.shape[-1]
        patch = preprocessing.input_size // grid
        count = round(FRACTION * grid * grid)
        classes = result.classes
        base = torch.softmax(result.logits, dim=1).gather(1, classes[:, None])[:, 0]
        ranked = result.maps.flatten(1).argsort(dim=1, descending=True)
        masked = x.masked_fill(patch_mask(ranked, count, grid, patch), 0.0)
        map_drops.append(base - class_probability(model, masked, classes))
        draws = []
        for seed in range(RANDOM_DRAWS):
            generator = torch.Generator().manual_seed(1000 * seed + first)
            order = torch.stack([torch.randperm(grid * grid, generator=generator) for _ in range(len(x))])
            draws.append(base - class_probability(model, x.masked_fill(patch_mask(order, count, grid, patch), 0.0), classes))
        random_drops.append(torch.stack(draws).mean(dim=0))
    by_map, at_random = torch.cat(map_drops), torch.cat(random_drops)
    record = {
        "checkpoint": str(path), "images": n, "method": args.method,
        **({"head_fusion": args.head_fusion, "discard_ratio": args.discard_ratio} if args.method == "rollout" else {}),
        "masked_fraction_of_patches": FRACTION, "random_draws": RANDOM_DRAWS,
        "mean_drop_top_patches_by_map": float(by_map.mean()),
        "mean_drop_random_patches": float(at_random.mean()),
        "fraction_of_images_where_map_mask_drops_more": float((by_map > at_random).float().mean()),
        "drop_definition": "predicted class probability on the image minus on the masked image (masked patches set to 0 "
                           "in the normalized model input)",
        "seconds": round(time.perf_counter() - start, 1), "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(record, indent=2))
    if args.out_json:
        args.out_json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
