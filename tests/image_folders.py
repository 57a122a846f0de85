"""Image-folder datasets for tests, made from real CIFAR-10 test images when the shared copy is
there (else the learnable synthetic images of conftest): PNG, JPEG and WebP files upsampled to
48-300 px, some grayscale, some non-square, some JPEGs carrying an EXIF orientation, and, on
request, the bad files a real folder has (a truncated JPEG, text named .png, a README)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from vitdeploy.data import CLASS_NAMES, read_batch

SIDES = (48, 64, 96, 160, 300)
FORMATS = ("png", "jpg", "webp")


def source_images(shared: Path | None, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` uint8 N x 3 x 32 x 32 images with CIFAR-10 labels: the real test set's first, else synthetic ones."""
    if shared is not None and (shared / "test_batch").is_file():
        test = read_batch(shared / "test_batch")
        return test.images[:count].numpy(), test.labels[:count].numpy()
    from conftest import make_images

    labels = np.arange(count) % 10
    return make_images(labels, seed=5), labels


def picture(chw: np.ndarray, index: int) -> tuple[bytes, str]:
    """One image file's bytes and suffix: upsampled, maybe grayscale, non-square or EXIF-rotated."""
    image = Image.fromarray(np.ascontiguousarray(chw.transpose(1, 2, 0)))
    side = SIDES[index % len(SIDES)]
    size = (side, side * 3 // 4) if index % 4 == 1 else (side, side)
    image = image.resize(size, Image.Resampling.BICUBIC)
    if index % 5 == 2:
        image = image.convert("L")
    fmt = FORMATS[index % len(FORMATS)]
    out = io.BytesIO()
    if fmt == "jpg" and index % 7 == 1:  # stored on its side, displayed upright (EXIF orientation 6)
        exif = Image.Exif()
        exif[0x0112] = 6
        image.transpose(Image.Transpose.ROTATE_90).save(out, "JPEG", quality=92, exif=exif)
    else:
        image.save(out, {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[fmt], **({"quality": 92} if fmt != "png" else {}))
    return out.getvalue(), fmt


def write_image_folder(root: Path, shared: Path | None, classes: int = 4, train_per_class: int = 24,
                       test_per_class: int = 6, val_per_class: int = 0, bad: bool = False) -> Path:
    """ROOT/{train,test[,val]}/CLASS/*.{png,jpg,webp} from the first `classes` CIFAR-10 classes; returns ROOT."""
    needed = {"train": train_per_class, "test": test_per_class, "val": val_per_class}
    images, labels = source_images(shared, 10_000 if shared is not None else 2_000)
    taken = 0
    for c in range(classes):
        mine = np.flatnonzero(labels == c)
        cursor = 0
        for split, count in needed.items():
            if count == 0:
                continue
            folder = root / split / CLASS_NAMES[c]
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                data, fmt = picture(images[mine[cursor % len(mine)]], taken)
                (folder / f"{split}_{c}_{i:04d}.{fmt}").write_bytes(data)
                cursor += 1
                taken += 1
    if bad:
        good = next((root / "train" / CLASS_NAMES[0]).glob("*.jpg")).read_bytes()
        (root / "train" / CLASS_NAMES[0] / "truncated.jpg").write_bytes(good[: len(good) // 3])
        (root / "train" / CLASS_NAMES[1] / "notes.png").write_text("not a picture")
        (root / "train" / CLASS_NAMES[1] / "README.txt").write_text("labelled by hand")
    return root
