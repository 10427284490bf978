"""The tiles of one slide that a model sees: a regular lattice over the whole slide, tissue only.

A model trained on images of ``patch_size`` pixels at ``magnification`` sees the same field on
a slide as a tile of ``extent = patch_size * base / magnification`` level-0 pixels. Tiles
start every ``stride = extent * (1 - overlap)`` level-0 pixels from the top-left corner, and
the last row and column reach past the slide's edge where the lattice does not end on it
(OpenSlide returns the outside as transparent, read as white glass), so every level-0 pixel is
covered and a slide smaller than one tile still gets one.

Tissue is found as the manifest finds it (`histokd.tissue.tissue_mask` on a thumbnail): a tile
is kept when the tissue fraction of its footprint reaches ``min_tissue_fraction``. With a
threshold of 0 every tile is kept and no thumbnail is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from histokd.slides import SlideReader
from histokd.tissue import TissueFilter, tissue_mask

__all__ = ["SlideTiles", "lattice", "plan_tiles", "tile_tissue_fractions"]

# Thumbnail pixels along a tile's side for the tissue fractions, and the least thumbnail side.
_THUMB_PIXELS_PER_TILE = 16
_MIN_THUMB_SIDE = 64


@dataclass
class SlideTiles:
    """The kept tiles of one slide and the slide's geometry.

    Attributes:
        path: Slide file.
        width: Level-0 width.
        height: Level-0 height.
        base_magnification: Magnification of level 0.
        mpp: Level-0 microns per pixel, None where the file records none.
        extent: Level-0 side of a tile.
        stride: Level-0 step between tiles.
        grid_shape: Lattice columns and rows before the tissue selection.
        xs: Level-0 left edges of the kept tiles.
        ys: Level-0 top edges of the kept tiles.
        tissue_fraction: Tissue fraction of each kept tile (NaN when no mask was computed).
    """

    path: str
    width: int
    height: int
    base_magnification: float
    mpp: float | None
    extent: int
    stride: int
    grid_shape: tuple[int, int]
    xs: np.ndarray
    ys: np.ndarray
    tissue_fraction: np.ndarray

    def __len__(self) -> int:
        return len(self.xs)


def lattice(width: int, height: int, extent: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners (x, y) of tiles of ``extent`` every ``stride`` that cover the slide.

    Row-major order. The last column starts at the first lattice position whose tile reaches
    the right edge, so no tile starts past the slide and every pixel is covered.
    """
    if extent < 1 or stride < 1 or stride > extent:
        raise ValueError(f"extent={extent}, stride={stride}: need 1 <= stride <= extent")
    cols = max(1, math.ceil(max(width - extent, 0) / stride) + 1)
    rows = max(1, math.ceil(max(height - extent, 0) / stride) + 1)
    ys, xs = np.meshgrid(np.arange(rows) * stride, np.arange(cols) * stride, indexing="ij")
    return xs.ravel().astype(np.int64), ys.ravel().astype(np.int64)


def tile_tissue_fractions(
    mask: np.ndarray, scale: float, xs: np.ndarray, ys: np.ndarray, extent: int
) -> np.ndarray:
    """Mean of a thumbnail mask over each tile's whole footprint (outside the slide: no tissue).

    Args:
        mask: Boolean tissue mask of the thumbnail.
        scale: Thumbnail pixels per level-0 pixel.
        xs: Level-0 left edges.
        ys: Level-0 top edges.
        extent: Level-0 tile side.
    """
    h, w = mask.shape
    integral = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    x0 = np.floor(xs * scale).astype(np.int64)
    y0 = np.floor(ys * scale).astype(np.int64)
    side = max(1, round(extent * scale))
    x1, y1 = x0 + side, y0 + side
    cx0, cy0 = np.clip(x0, 0, w), np.clip(y0, 0, h)
    cx1, cy1 = np.clip(x1, 0, w), np.clip(y1, 0, h)
    inside = integral[cy1, cx1] - integral[cy0, cx1] - integral[cy1, cx0] + integral[cy0, cx0]
    return (inside / float(side * side)).astype(np.float32)


def plan_tiles(
    path: str,
    magnification: float,
    patch_size: int,
    overlap: float = 0.0,
    tissue: TissueFilter | None = None,
    base_magnification: float | None = None,
) -> SlideTiles:
    """The tiles of a slide that a model trained on ``patch_size`` px at ``magnification`` sees.

    Args:
        path: Slide file.
        magnification: Magnification of the model's training images.
        patch_size: Side of a training image at ``magnification``.
        overlap: Fraction of a tile's side shared with its neighbour, in [0, 1).
        tissue: Tissue thresholds; ``min_tissue_fraction`` 0 keeps every tile unread.
        base_magnification: Level-0 magnification of slides that record none.

    Returns:
        The kept tiles, possibly none (a slide without tissue).

    Raises:
        SlideError: The slide cannot be opened, its magnification is below the model's, or
            its thumbnail cannot be read.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap={overlap!r}: must be in [0, 1)")
    tissue = tissue or TissueFilter()
    with SlideReader(path, base_magnification) as reader:
        # the level-0 px a tile read covers (a level within 1 % of the target is read as is)
        extent = reader.footprint(patch_size, magnification).extent[0]
        stride = max(1, round(extent * (1 - overlap)))
        width, height = reader.info.dimensions
        xs, ys = lattice(width, height, extent, stride)
        cols = len(np.unique(xs))
        grid_shape = (cols, len(xs) // cols)
        if tissue.min_tissue_fraction > 0:
            base = reader.info.base_magnification
            thumb_mag = magnification * _THUMB_PIXELS_PER_TILE / patch_size
            thumb_mag = max(thumb_mag, base * _MIN_THUMB_SIDE / max(1, min(width, height)))
            thumb = reader.thumbnail(min(base, thumb_mag))
            fractions = tile_tissue_fractions(
                tissue_mask(thumb, tissue), thumb.shape[1] / width, xs, ys, extent
            )
            keep = fractions >= tissue.min_tissue_fraction
            xs, ys, fractions = xs[keep], ys[keep], fractions[keep]
        else:
            fractions = np.full(len(xs), np.nan, np.float32)
        return SlideTiles(
            path=reader.path,
            width=int(width),
            height=int(height),
            base_magnification=reader.info.base_magnification,
            mpp=reader.info.mpp,
            extent=int(extent),
            stride=int(stride),
            grid_shape=grid_shape,
            xs=xs,
            ys=ys,
            tissue_fraction=fractions,
        )
