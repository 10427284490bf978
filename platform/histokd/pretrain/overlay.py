"""Teacher-versus-student pictures: image, pseudo label and prediction side by side."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["overlay_mask", "save_overlay"]

TEACHER_COLOUR = (30, 90, 255)  # blue, as RCKD Fig. 3 draws pseudo labels
STUDENT_COLOUR = (255, 150, 0)


def overlay_mask(
    image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], opacity: float = 0.55
) -> np.ndarray:
    """Blend ``colour`` over the pixels where ``mask`` is set."""
    out = image.astype(np.float32).copy()
    sel = mask.astype(bool)
    out[sel] = (1 - opacity) * out[sel] + opacity * np.asarray(colour, np.float32)
    return out.clip(0, 255).astype(np.uint8)


def save_overlay(
    images: np.ndarray,
    pseudo_labels: np.ndarray,
    predictions: np.ndarray | None,
    path: str,
    title: str = "",
    max_side: int = 192,
) -> str:
    """A grid with one row per patch: image | teacher (blue) | student (orange), as PNG.

    Args:
        images: (N, H, W, 3) uint8.
        pseudo_labels: (N, H, W) {0, 1}.
        predictions: (N, H, W) {0, 1}, or None for image | teacher only.
        path: PNG file to write.
        title: Text drawn above the grid.
        max_side: Each panel is shrunk to at most this many pixels.

    Returns:
        ``path``.
    """
    rows = []
    for i in range(len(images)):
        panels = [images[i], overlay_mask(images[i], pseudo_labels[i], TEACHER_COLOUR)]
        if predictions is not None:
            panels.append(overlay_mask(images[i], predictions[i], STUDENT_COLOUR))
        row = np.concatenate(
            [np.pad(p, ((2, 2), (2, 2), (0, 0)), constant_values=255) for p in panels], axis=1
        )
        rows.append(row)
    grid = np.concatenate(rows, axis=0)
    scale = max_side / max(images.shape[1], 1)
    canvas = Image.fromarray(grid)
    if scale < 1:
        canvas = canvas.resize(
            (int(grid.shape[1] * scale), int(grid.shape[0] * scale)), Image.Resampling.BILINEAR
        )
    if title:
        framed = Image.new("RGB", (canvas.width, canvas.height + 18), "white")
        framed.paste(canvas, (0, 18))
        ImageDraw.Draw(framed).text((4, 3), title, fill=(0, 0, 0))
        canvas = framed
    canvas.save(path)
    return path
