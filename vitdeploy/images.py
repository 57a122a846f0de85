"""Image files -> uint8 RGB CHW arrays at the dataset resolution, the way every
consumer (predict, serve) turns an arbitrary picture into model input.

Decoding is bounded against decompression bombs; any size is accepted and resized to
the dataset's resolution with PIL's antialiased bicubic filter (a 32x32 RGB image is
used as it is), after which the model's own preprocessing (in the ONNX graph or the
PyTorch backend) does the rest.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from vitdeploy.errors import VitDeployError

MAX_PIXELS = 40_000_000  # a 20,000 x 2,000 image; anything larger is refused before decoding
MIN_SIDE = 2


def decode_image(data: bytes, size: int, name: str = "image") -> np.ndarray:
    """uint8 array of shape (3, size, size) from PNG/JPEG/WebP/... bytes."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise VitDeployError(f"{name} is empty")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise VitDeployError(f"{name} is {width}x{height} pixels, more than the {MAX_PIXELS:,} pixels allowed")
            if min(width, height) < MIN_SIDE:
                raise VitDeployError(f"{name} is {width}x{height} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed")
            rgb = image.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
            array = np.asarray(rgb, dtype=np.uint8)
    except Image.DecompressionBombError as exc:  # PIL's own limit, hit before ours for the largest images
        raise VitDeployError(f"{name} has more than the {MAX_PIXELS:,} pixels allowed ({exc})") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise VitDeployError(f"{name} is not a readable image ({exc})") from exc
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def load_image_file(path: Path, size: int) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise VitDeployError(f"image {path} does not exist")
    return decode_image(path.read_bytes(), size, str(path))
