"""Image files -> uint8 RGB CHW arrays at the dataset resolution, the way every
consumer (predict, explain, serve) turns an arbitrary picture into model input.

Decoding is bounded against decompression bombs; pictures are taken as displayed (EXIF
orientation, high bit depths scaled, transparency over white; see `to_rgb`); any size is
accepted and brought to the model's source size by `Fit`: squeezed whole with PIL's
antialiased bicubic filter (a 32x32 RGB image is used as it is), or, for a model published
with a crop, resized on the shorter side and centre-cropped; after which the model's own
preprocessing (in the ONNX graph or the PyTorch backend) does the rest.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vitdeploy.errors import VitDeployError

if TYPE_CHECKING:
    from PIL import Image

    from vitdeploy.preprocess import Preprocessing

MAX_PIXELS = 40_000_000  # a 20,000 x 2,000 image; anything larger is refused before decoding
MIN_SIDE = 2
BACKGROUND = (255, 255, 255)  # transparent pixels are shown over white, as on a plain page
CHUNK_ROWS = 256  # high-bit-depth pictures are brought to 8 bits this many rows at a time
# Bytes per pixel of the decoded picture, by mode (the rest: 4, the widest Pillow has).
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2,
                    "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3}


@dataclass(frozen=True)
class Fit:
    """How a picture becomes the size x size square: squeezed whole (`crop_fraction` None, bicubic),
    or its shorter side resized to floor(size / crop_fraction) with `resample`, centre-cropped."""

    size: int
    crop_fraction: float | None = None
    resample: str = "bicubic"

    @classmethod
    def of(cls, preprocessing: Preprocessing) -> Fit:
        """The fit a model's preprocessing asks for (see `Preprocessing.crop_fraction`)."""
        if preprocessing.crop_fraction is None:
            return cls(preprocessing.source_size)
        return cls(preprocessing.source_size, preprocessing.crop_fraction, preprocessing.resize_mode)

    @property
    def scale_size(self) -> int:
        """The shorter side before the centre crop."""
        return self.size if self.crop_fraction is None else math.floor(self.size / self.crop_fraction)


def fit_array(images: np.ndarray, fit: Fit) -> np.ndarray:
    """uint8 N x 3 x H x W images brought to `fit` as decoded pictures are (test images for parity and
    calibration at a model's own size); returned as they are when already of that size and squeezed."""
    from PIL import Image

    if fit.crop_fraction is None and images.shape[-2:] == (fit.size, fit.size):
        return images
    out = np.empty((len(images), 3, fit.size, fit.size), np.uint8)
    for i, chw in enumerate(images):
        out[i] = np.asarray(_resized(Image.fromarray(np.ascontiguousarray(chw.transpose(1, 2, 0))), fit)).transpose(2, 0, 1)
    return out


def decoded_bytes(width: int, height: int, mode: str) -> int:
    """Memory of the decoded picture before any conversion: what one decode costs at least."""
    return width * height * _BYTES_PER_PIXEL.get(mode, 4)


def decode_image(data: bytes, fit: Fit, name: str = "image") -> np.ndarray:
    """uint8 array of shape (3, fit.size, fit.size) from PNG/JPEG/WebP/... bytes, as the picture is displayed.

    The one decoder of every consumer (predict, explain, serve): EXIF orientation applied,
    every pixel mode brought to 8-bit RGB by `to_rgb`, then resized. Whatever a decoder
    raises on hostile bytes is a refusal naming the image, never a traceback.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise VitDeployError(f"{name} is empty")
    try:
        with Image.open(io.BytesIO(data)) as image:
            check_size(image.size, name)
            rgb = to_rgb(image, fit)
            array = np.asarray(rgb, dtype=np.uint8)
    except VitDeployError:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own limit, hit before ours for the largest images
        raise VitDeployError(f"{name} has more than the {MAX_PIXELS:,} pixels allowed ({exc})") from None
    except UnidentifiedImageError:
        raise VitDeployError(f"{name} is not a readable image: not a format vitdeploy reads (PNG, JPEG, WebP, GIF, BMP, TIFF)") from None
    except MemoryError:
        raise VitDeployError(f"{name} needs more memory to decode than this machine has free") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's decoders raise many types (OSError, ValueError, NotImplementedError...)
        raise VitDeployError(f"{name} is not a readable image: damaged, truncated or unsupported "
                             f"({type(exc).__name__}: {str(exc)[:120]})") from None
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def check_size(size: tuple[int, int], name: str) -> None:
    """Refuse a picture by its header: too many pixels to decode, or too small to be an image."""
    width, height = size
    if width * height > MAX_PIXELS:
        raise VitDeployError(f"{name} is {width}x{height} pixels, more than the {MAX_PIXELS:,} pixels allowed")
    if min(width, height) < MIN_SIDE:
        raise VitDeployError(f"{name} is {width}x{height} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed")


def header(data: bytes) -> tuple[int, int, str] | None:
    """(width, height, mode) from the header alone, or None when Pillow cannot tell: cheap enough for the
    event loop's caller to choose where to decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return (*image.size, image.mode)
    except Exception:  # noqa: BLE001 - decode_image gives the refusal with its reason
        return None


def to_rgb(image: Image.Image, fit: Fit) -> Image.Image:
    """8-bit RGB of a decoded picture at fit.size x fit.size, upright as displayed.

    - EXIF orientation (phone photos) is applied first.
    - 16-bit and 32-bit integer grayscale (modes I;16*, I) are scaled from 0..65535 to
      0..255 (value / 257, rounded), never clipped; 32-bit float (F) is taken as 0..1 when
      its largest value is at most 1, else as 0..255, then clipped; NaN becomes 0. Both in
      row chunks, so a large picture costs little beyond its decoded size.
    - 16-bit RGB PNGs are reduced to 8 bits by Pillow itself (high byte).
    - Transparency (RGBA, LA, PA, P with a transparent colour, and the colour key of an RGB
      or L picture) is composited over white; RGBA and LA are resized first (Pillow
      resizes them with premultiplied alpha), so compositing happens at the small size.
    - Everything else (L, 1, P, CMYK, YCbCr, LAB, ...) goes through Pillow's own conversion.
    The result is resized as `fit` says (Pillow's filters antialias when they shrink).
    """
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        image = _eight_bit_gray(image)
    elif "transparency" in image.info and mode not in ("RGBA", "LA"):
        image = image.convert("RGBA")  # palette or colour key: the keyed pixels become transparent
    elif mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        small = _resized(image, fit).convert("RGBA")
        background = Image.new("RGBA", small.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, small).convert("RGB")
    if image.mode in ("1", "P"):
        image = image.convert("RGB")  # palette indices and bits do not average: resize the colours
    return _resized(image, fit).convert("RGB")


_RESAMPLE = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST"}


def _resized(image: Image.Image, fit: Fit) -> Image.Image:
    from PIL import Image

    resample = getattr(Image.Resampling, _RESAMPLE[fit.resample])
    if fit.crop_fraction is None:
        return image if image.size == (fit.size, fit.size) else image.resize((fit.size, fit.size), resample)
    # The centre square the crop keeps, in the picture's own pixels: resizing just that box (Pillow's
    # `box`) is the resize-then-crop of timm and Hugging Face without ever making the large resized picture.
    width, height = image.size
    side = min(width, height) * fit.size / fit.scale_size
    left, top = (width - side) / 2, (height - side) / 2
    return image.resize((fit.size, fit.size), resample, box=(left, top, left + side, top + side))


def _eight_bit_gray(image: Image.Image) -> Image.Image:
    """Mode L of a 16/32-bit integer or float grayscale picture (see to_rgb), a chunk of rows at a time."""
    from PIL import Image

    width, height = image.size
    out = np.empty((height, width), np.uint8)
    scale_float = image.mode == "F" and (image.getextrema()[1] or 0.0) <= 1.0
    for top in range(0, height, CHUNK_ROWS):
        rows = np.asarray(image.crop((0, top, width, min(top + CHUNK_ROWS, height))))
        if image.mode == "F":
            values = np.nan_to_num(rows.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
            if scale_float:
                values *= 255.0
            out[top:top + len(rows)] = np.rint(np.clip(values, 0, 255))
        else:  # round(v / 257) for integers 0..65535 (no ties: 257 is odd)
            values = np.clip(rows.astype(np.int64), 0, 65535)
            out[top:top + len(rows)] = (values + 128) // 257
    return Image.fromarray(out, "L")


def load_image_file(path: Path, fit: Fit) -> np.ndarray:
    """An image file as decode_image makes it; a folder or a missing file is named as such."""
    path = Path(path)
    if path.is_dir():
        raise VitDeployError(f"{path} is a folder, not an image file; name the images in it (e.g. {path}/*.png)")
    if not path.is_file():
        raise VitDeployError(f"image {path} does not exist")
    return decode_image(path.read_bytes(), fit, str(path))
