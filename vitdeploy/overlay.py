"""Pictures of an explanation: the image, its heat map and the two overlaid, side by side
under a title, as PNG bytes (for `vitdeploy explain` and the server's `/v1/explain`)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

PANEL = 224  # px per panel
PAD = 8
TITLE = 24
LABEL = 14  # a panel label's line
BAR = 10  # the colour bar's height
ALPHA = 0.5  # weight of the map in the overlay
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


def _panels(image: np.ndarray, grid_map: np.ndarray) -> tuple[Image.Image, Image.Image, Image.Image]:
    """The image (uint8 3 x H x W) enlarged to PANEL px, the coloured map, and the two blended."""
    picture = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).resize((PANEL, PANEL), Image.Resampling.BICUBIC)
    heat = colorize(upsample(grid_map, PANEL))
    blended = (1 - ALPHA) * np.asarray(picture, dtype=np.float64) + ALPHA * heat
    return picture, Image.fromarray(heat), Image.fromarray(np.round(blended).astype(np.uint8))


def _png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_png(image: np.ndarray, grid_map: np.ndarray) -> bytes:
    """The overlay alone, as PNG (the page shows it beside the image)."""
    return _png(_panels(image, grid_map)[2])


def explanation_png(image: np.ndarray, grid_map: np.ndarray, title: str) -> bytes:
    """Image | map | overlay, each PANEL px and labelled, under `title`, with a colour bar for the map,
    as PNG bytes."""
    width = 3 * PANEL + 4 * PAD
    top = TITLE + LABEL + PAD
    sheet = Image.new("RGB", (width, top + PANEL + PAD + BAR + LABEL + PAD), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD, PAD // 2 + 2), title, fill="black")
    for i, (panel, label) in enumerate(zip(_panels(image, grid_map), ("image", "where the model looks", "overlay"), strict=True)):
        left = PAD + i * (PANEL + PAD)
        draw.text((left, TITLE + 2), label, fill="black")
        sheet.paste(panel, (left, top))
    bar_top = top + PANEL + PAD  # the map's colours, lowest to highest relevance in this image
    ramp = colorize(np.tile(np.linspace(0, 1, PANEL), (BAR, 1)))
    sheet.paste(Image.fromarray(ramp), (PAD + PANEL + PAD, bar_top))
    draw.text((PAD + PANEL + PAD, bar_top + BAR + 1), "lowest", fill="black")
    draw.text((PAD + 2 * PANEL + PAD - 42, bar_top + BAR + 1), "highest", fill="black")
    return _png(sheet)
