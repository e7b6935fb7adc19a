"""Images drawn in code (no downloads): simple, recognisable, with structure that differs left/right and up/down."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def sample_image(width: int = 96, height: int = 96, seed: int = 0) -> Image.Image:
    """A deterministic RGB test image: a gradient sky, a sun, and a ground band."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    sky = np.stack([40 + 100 * y / height, 90 + 80 * y / height, 200 - 60 * y / height], -1)
    image = Image.fromarray(sky.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    r = min(width, height) // 6
    cx, cy = int(width * (0.25 + 0.5 * rng.random())), int(height * 0.3)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(250, 210, 60))
    draw.rectangle([0, int(height * 0.7), width, height], fill=(60, 140, 70))
    return image


def half_and_half_image(width: int = 96, height: int = 96) -> Image.Image:
    """Left half black, right half white: a check that column order survives preprocessing."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, width // 2 :] = 255
    return Image.fromarray(array)
