"""The RCKD Fig. 3-like picture."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from histokd.teachers.overlay import (
    NUCLEI_BLUE,
    overlay_pseudo_label,
    pseudo_label_grid,
    save_pseudo_label_grid,
)


def test_overlay_blends_only_nuclei():
    image = np.full((4, 4, 3), 200, np.uint8)
    label = np.zeros((4, 4), np.uint8)
    label[1, 2] = 1
    out = overlay_pseudo_label(image, label, opacity=1.0)
    assert tuple(out[1, 2]) == NUCLEI_BLUE
    assert (out[label == 0] == 200).all()


def test_grid_layout_and_png(tmp_path):
    n, columns, tile, gap = 5, 3, 32, 4
    images = np.full((n, 64, 64, 3), 230, np.uint8)
    labels = np.zeros((n, 64, 64), np.uint8)
    labels[:, :, :32] = 1  # left half
    grid = pseudo_label_grid(images, labels, columns=columns, tile=tile, gap=gap)
    groups = 2
    assert grid.shape == (
        groups * (2 * tile + 3 * gap) + gap,
        columns * tile + (columns + 1) * gap,
        3,
    )
    # second row of the first group: left half blue-ish, right half untouched
    overlay_top = gap + tile + gap
    left = grid[overlay_top + 5, gap + 5]
    right = grid[overlay_top + 5, gap + tile - 5]
    assert left[2] > left[0] and tuple(right) == (230, 230, 230)
    path = save_pseudo_label_grid(
        tmp_path / "f" / "grid.png", images, labels, [f"p{i}" for i in range(n)]
    )
    assert Image.open(path).size[0] > 0


def test_grid_refuses_mismatch():
    with pytest.raises(ValueError, match="2 images and 1 labels"):
        pseudo_label_grid(np.zeros((2, 8, 8, 3), np.uint8), np.zeros((1, 8, 8)))
