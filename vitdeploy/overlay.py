"""Pictures of an explanation: the image, its heat map and the two overlaid, side by side
under a title, as PNG bytes (for `vitdeploy explain` and the server's `/v1/explain`)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

PANEL = 224  # px per panel
PAD = 8
TITLE = 24
# A perceptually ordered colour map (dark blue -> teal -> yellow), by linear steps between anchors.
_ANCHORS = np.array([[48, 18, 59], [40, 110, 200], [30, 180, 160], [150, 220, 60], [250, 230, 40]], dtype=np.float64)


def colorize(heat: np.ndarray) -> np.ndarray:
    """H x W values in [0, 1] -> H x W x 3 uint8."""
    position = np.clip(heat, 0, 1) * (len(_ANCHORS) - 1)
    low = np.minimum(position.astype(np.int64), len(_ANCHORS) - 2)
    frac = (position - low)[..., None]
    return np.round(_ANCHORS[low] * (1 - frac) + _ANCHORS[low + 1] * frac).astype(np.uint8)


def upsample(grid_map: np.ndarray, size: int) -> np.ndarray:
    """A patch-grid map smoothly enlarged to size x size, stretched to span [0, 1] (the
    picture shows where relevance is highest and lowest; the JSON keeps the values)."""
    low, high = float(grid_map.min()), float(grid_map.max())
    stretched = (grid_map - low) / (high - low) if high > low else np.zeros_like(grid_map)
    image = Image.fromarray(np.round(stretched * 255).astype(np.uint8), mode="L")
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64) / 255


def overlay_image(image: np.ndarray, grid_map: np.ndarray, size: int = PANEL, alpha: float = 0.5) -> Image.Image:
    """The image (uint8 3 x H x W) enlarged to `size`, blended with the coloured map."""
    picture = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).resize((size, size), Image.Resampling.BICUBIC)
    heat = colorize(upsample(grid_map, size))
    blended = (1 - alpha) * np.asarray(picture, dtype=np.float64) + alpha * heat
    return Image.fromarray(np.round(blended).astype(np.uint8))


def overlay_png(image: np.ndarray, grid_map: np.ndarray) -> bytes:
    """The overlay alone, as PNG (the page shows it beside the image)."""
    buffer = io.BytesIO()
    overlay_image(image, grid_map).save(buffer, format="PNG")
    return buffer.getvalue()


def explanation_png(image: np.ndarray, grid_map: np.ndarray, title: str) -> bytes:
    """Image | map | overlay, each PANEL px, under `title`, as PNG bytes."""
    picture = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).resize((PANEL, PANEL), Image.Resampling.BICUBIC)
    heat = Image.fromarray(colorize(upsample(grid_map, PANEL)))
    sheet = Image.new("RGB", (3 * PANEL + 4 * PAD, PANEL + TITLE + 2 * PAD), "white")
    for i, panel in enumerate((picture, heat, overlay_image(image, grid_map))):
        sheet.paste(panel, (PAD + i * (PANEL + PAD), TITLE + PAD))
    ImageDraw.Draw(sheet).text((PAD, PAD // 2 + 2), title, fill="black")
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()
