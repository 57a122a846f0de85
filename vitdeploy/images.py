"""Image files -> uint8 RGB CHW arrays at the dataset resolution, the way every
consumer (predict, serve) turns an arbitrary picture into model input.

Decoding is bounded against decompression bombs; pictures are taken as displayed (EXIF
orientation, high bit depths scaled, transparency over white; see `to_rgb`); any size is
accepted and resized to the dataset's resolution with PIL's antialiased bicubic filter (a
32x32 RGB image is used as it is), after which the model's own preprocessing (in the ONNX
graph or the PyTorch backend) does the rest.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vitdeploy.errors import VitDeployError

if TYPE_CHECKING:
    from PIL import Image

MAX_PIXELS = 40_000_000  # a 20,000 x 2,000 image; anything larger is refused before decoding
MIN_SIDE = 2
BACKGROUND = (255, 255, 255)  # transparent pixels are shown over white, as on a plain page


def decode_image(data: bytes, size: int, name: str = "image") -> np.ndarray:
    """uint8 array of shape (3, size, size) from PNG/JPEG/WebP/... bytes, as the picture is displayed.

    The one decoder of every consumer (predict, serve): EXIF orientation applied, every
    pixel mode brought to 8-bit RGB by `to_rgb`, then resized.
    """
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
            rgb = to_rgb(image)
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
            array = np.asarray(rgb, dtype=np.uint8)
    except Image.DecompressionBombError as exc:  # PIL's own limit, hit before ours for the largest images
        raise VitDeployError(f"{name} has more than the {MAX_PIXELS:,} pixels allowed ({exc})") from None
    except UnidentifiedImageError:
        raise VitDeployError(f"{name} is not a readable image: not a format vitdeploy reads (PNG, JPEG, WebP, GIF, BMP, TIFF)") from None
    except (OSError, ValueError, SyntaxError, TypeError, struct.error) as exc:
        raise VitDeployError(f"{name} is not a readable image: damaged or truncated ({str(exc)[:120]})") from None
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of a decoded picture, upright as displayed.

    - EXIF orientation (phone photos) is applied first.
    - 16-bit and 32-bit integer grayscale (modes I;16*, I) are scaled from 0..65535 to
      0..255 (value / 257, rounded), never clipped; 32-bit float (F) is taken as 0..1 when
      its largest value is at most 1, else as 0..255, then clipped; NaN becomes 0.
    - 16-bit RGB PNGs are reduced to 8 bits by Pillow itself (high byte).
    - Transparency (RGBA, LA, PA, P with a transparent colour) is composited over white.
    - Everything else (L, 1, P, CMYK, YCbCr, LAB, ...) goes through Pillow's own conversion.
    """
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode.startswith("I"):
        values = np.asarray(image).astype(np.float64)
        gray = np.clip(values, 0, 65535) / 257.0
        return Image.fromarray(np.rint(gray).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.rint(np.clip(values, 0, 255)).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image_file(path: Path, size: int) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise VitDeployError(f"image {path} does not exist")
    return decode_image(path.read_bytes(), size, str(path))
