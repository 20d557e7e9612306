"""Pictures for people: frame mosaics as PNG (GIFs join with the dream stage)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def mosaic(frames: np.ndarray | list[np.ndarray], columns: int | None = None, pad: int = 2) -> Image.Image:
    """Tile uint8 HWC frames into one image, row-major, with a dark gutter."""
    frames = [np.asarray(f, dtype=np.uint8) for f in frames]
    n = len(frames)
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    h, w = frames[0].shape[:2]
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 24, np.uint8)
    for i, frame in enumerate(frames):
        r, c = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y : y + h, x : x + w] = frame
    return Image.fromarray(canvas)


def save_gif(frames: list[np.ndarray], path, fps: int, scale: int = 3) -> None:
    """uint8 HWC frames → an animated GIF (Pillow), enlarged `scale`× with nearest-neighbour pixels."""
    images = [Image.fromarray(f) for f in frames]
    if scale != 1:
        images = [im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST) for im in images]
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)), loop=0)
