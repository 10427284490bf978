"""A picture of pseudo labels: patches above the same patches with the teacher's nuclei in blue.

Like RCKD Fig. 3, (a) pathological images and (b) the binary nuclei maps StarDist estimates
for them, blue marking nuclei. Saved as PNG so jobs can log it to MLflow.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "NUCLEI_BLUE",
    "overlay_pseudo_label",
    "pseudo_label_grid",
    "save_pseudo_label_grid",
    "save_records_grid",
]

NUCLEI_BLUE = (0, 70, 255)  # RCKD Fig. 3: "the blue color indicates the estimated nuclei regions"


def overlay_pseudo_label(
    image: np.ndarray,
    label: np.ndarray,
    color: tuple[int, int, int] = NUCLEI_BLUE,
    opacity: float = 0.6,
) -> np.ndarray:
    """The patch with nuclei pixels blended towards ``color``; uint8 (H, W, 3)."""
    if image.shape[:2] != label.shape:
        raise ValueError(f"image {image.shape[:2]} and label {label.shape} differ in size")
    out = image.astype(np.float32)
    mask = label.astype(bool)
    out[mask] = (1 - opacity) * out[mask] + opacity * np.asarray(color, np.float32)
    return out.round().astype(np.uint8)


def pseudo_label_grid(
    images: np.ndarray,
    labels: np.ndarray,
    captions: Sequence[str] | None = None,
    columns: int = 6,
    tile: int = 192,
    gap: int = 6,
) -> np.ndarray:
    """Pairs of rows: patches, then the same patches with their pseudo labels overlaid.

    Args:
        images: uint8 (N, H, W, 3).
        labels: {0, 1} (N, H, W).
        captions: One short line per patch (slide, position, nuclei fraction, ...).
        columns: Patches per row.
        tile: Side each patch is drawn at.
        gap: Pixels between tiles.

    Returns:
        The grid as RGB uint8.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(
            f"{len(images)} images and {len(labels)} labels: need the same positive number"
        )
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    n = len(images)
    columns = min(columns, n)
    groups = -(-n // columns)
    caption_h = 14 if captions is not None else 0
    cell_h = tile + caption_h
    width = columns * tile + (columns + 1) * gap
    height = groups * (2 * cell_h + 3 * gap) + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        group, col = divmod(i, columns)
        x = gap + col * (tile + gap)
        y = gap + group * (2 * cell_h + 3 * gap)
        raw = Image.fromarray(images[i]).resize((tile, tile), Image.Resampling.BILINEAR)
        mask = (
            np.asarray(
                Image.fromarray(labels[i].astype(np.uint8) * 255).resize(
                    (tile, tile), Image.Resampling.NEAREST
                )
            )
            > 127
        )
        over = Image.fromarray(overlay_pseudo_label(np.asarray(raw), mask))
        canvas.paste(raw, (x, y))
        canvas.paste(over, (x, y + cell_h + gap))
        if captions is not None:
            draw.text((x + 2, y + tile + 1), captions[i][:34], fill=(0, 0, 0))
            draw.text(
                (x + 2, y + cell_h + gap + tile + 1),
                f"nuclei {labels[i].mean():.1%}",
                fill=(0, 0, 0),
            )
    return np.asarray(canvas)


def save_pseudo_label_grid(
    path: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray,
    captions: Sequence[str] | None = None,
    **kwargs,
) -> Path:
    """Write :func:`pseudo_label_grid` as PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pseudo_label_grid(images, labels, captions, **kwargs)).save(path)
    return path


def save_records_grid(
    path: str | os.PathLike, records: dict[str, np.ndarray], count: int = 12, **kwargs
) -> Path:
    """The first ``count`` records of the teacher stream as a :func:`pseudo_label_grid` PNG.

    Args:
        path: Output PNG.
        records: Columns ``image``, ``pseudo_label`` and optionally ``slide``, ``x``, ``y``
            (a batch of :func:`histokd.teachers.stream.pseudo_label_dataset`).
        count: Patches drawn.
        **kwargs: Layout arguments of :func:`pseudo_label_grid`.
    """
    n = min(count, len(records["image"]))
    captions = None
    if all(k in records for k in ("slide", "x", "y")):
        captions = [
            f"{Path(str(records['slide'][i])).stem} {records['x'][i]},{records['y'][i]}"
            for i in range(n)
        ]
    return save_pseudo_label_grid(
        path, records["image"][:n], records["pseudo_label"][:n], captions, **kwargs
    )
