"""Tissue regions of a slide, and their images at several magnifications made from the original.

DiPalma Sec. 4.1-4.4: tissueloc's bounding boxes on a low-resolution view (here with histokd's
colour tissue mask: mask, closing, hole filling, small-object removal, boxes), each magnification
Lanczos-downsampled *directly from the original scan* (no composition of downsamplings).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.morphology import disk

from histokd.slides import SlideReader
from histokd.tissue import TissueFilter, tissue_mask

__all__ = ["RegionFinder", "TissueRegion", "find_tissue_regions", "lanczos_resize",
           "magnification_tag", "read_region_magnifications", "scaled_size"]  # fmt: skip

log = logging.getLogger(__name__)

#: Level-0 pixels read at once for one region (3 bytes each: 1.2 GB); larger regions are read
#: at the highest magnification asked for instead (still Lanczos, from the nearest level).
DEFAULT_MAX_SOURCE_PIXELS = 400_000_000


def magnification_tag(magnification: float) -> str:
    """``10x``, ``0.625x``: the folder name of a magnification."""
    return f"{float(magnification):g}x"


def scaled_size(width: int, height: int, downsample: float) -> tuple[int, int]:
    """(width, height) divided by ``downsample``, rounded half up, at least 1 pixel."""
    if not downsample > 0:
        raise ValueError(f"downsample={downsample!r}: must be positive")
    return tuple(max(1, math.floor(side / downsample + 0.5)) for side in (width, height))


def lanczos_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """RGB uint8 ``image`` at ``size`` (width, height) with PIL's Lanczos filter (a = 3)."""
    if (image.shape[1], image.shape[0]) == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize(tuple(size), Image.Resampling.LANCZOS))


@dataclass(frozen=True)
class TissueRegion:
    """A box of tissue on a slide in level-0 pixels; ``index`` numbers it on its slide."""

    slide: str
    index: int
    x: int
    y: int
    width: int
    height: int
    base_magnification: float
    tissue_fraction: float = 1.0  # share of the box the tissue mask covers (thumbnail estimate)

    @property
    def region_id(self) -> str:
        """``{slide stem}-r{index:03d}``: unique within a dataset of distinct slide names."""
        return f"{Path(self.slide).stem}-r{self.index:03d}"

    def size_at(self, magnification: float) -> tuple[int, int]:
        """The region's (width, height) in pixels at ``magnification``."""
        return scaled_size(self.width, self.height, self.base_magnification / magnification)


@dataclass(frozen=True)
class RegionFinder:
    """Settings of the tissue-region search in physical units: the mask's magnification, the
    smallest tissue area, the radius of the closing joining nearby bits, each box's margin."""

    thumbnail_magnification: float = 1.25
    min_area_um2: float = 10_000.0
    closing_um: float = 16.0
    padding_um: float = 8.0
    tissue_filter: TissueFilter | None = None

    def __post_init__(self) -> None:
        for name in ("thumbnail_magnification", "min_area_um2", "closing_um", "padding_um"):
            value, positive = getattr(self, name), name == "thumbnail_magnification"
            if not (value > 0 if positive else value >= 0):
                raise ValueError(f"RegionFinder.{name}={value!r}: must be {'positive' if positive else '>= 0'}")  # fmt: skip


def find_tissue_regions(slide: str | os.PathLike | SlideReader, finder: RegionFinder | None = None,
                        base_magnification: float | None = None) -> list[TissueRegion]:  # fmt: skip
    """The bounding boxes of a slide's tissue pieces (a file, with ``base_magnification`` for
    one that records none, or an open reader), in row-major order of their corners."""
    finder = finder or RegionFinder()
    opened = contextlib.nullcontext(slide) if isinstance(slide, SlideReader) else SlideReader(slide, base_magnification)  # fmt: skip
    with opened as reader:
        base = reader.info.base_magnification
        thumb_mag = min(finder.thumbnail_magnification, base)
        um_per_px = 10.0 / thumb_mag  # 10x is 1 um/px (DiPalma Sec. 3.2)
        mask = tissue_mask(reader.thumbnail(thumb_mag), finder.tissue_filter)
        radius = int(round(finder.closing_um / um_per_px))
        if radius > 0:  # padded, so that closing does not erode tissue touching the border
            closed = ndimage.binary_closing(np.pad(mask, radius), structure=disk(radius))
            mask = closed[radius:-radius, radius:-radius]
        mask = ndimage.binary_fill_holes(mask)
        labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
        areas = ndimage.sum(mask, labels, index=np.arange(1, count + 1)) * um_per_px**2
        scale = base / thumb_mag  # level-0 pixels per thumbnail pixel
        pad = finder.padding_um * base / 10.0  # um -> level-0 pixels
        width0, height0 = reader.info.dimensions
        boxes = []
        for k, (rows, cols) in enumerate(ndimage.find_objects(labels)):
            if areas[k] < finder.min_area_um2:
                continue
            x0 = max(0, math.floor(cols.start * scale - pad))
            y0 = max(0, math.floor(rows.start * scale - pad))
            x1 = min(width0, math.ceil(cols.stop * scale + pad))
            y1 = min(height0, math.ceil(rows.stop * scale + pad))
            fraction = float((labels[rows, cols] == k + 1).mean())
            boxes.append((y0, x0, x1 - x0, y1 - y0, fraction))
        return [
            TissueRegion(reader.path, i, x, y, w, h, base, tissue_fraction=fraction)
            for i, (y, x, w, h, fraction) in enumerate(sorted(boxes))
        ]


def read_region_magnifications(reader: SlideReader, region: TissueRegion, magnifications: Sequence[float],
                               max_source_pixels: int = DEFAULT_MAX_SOURCE_PIXELS) -> dict[float, np.ndarray]:  # fmt: skip
    """``{magnification: RGB uint8 image}`` of a region, each Lanczos-downsampled from level 0
    to :meth:`TissueRegion.size_at`; a region of more than ``max_source_pixels`` level-0 pixels
    is read at the highest magnification asked for instead (with a warning). A SlideError for a
    magnification above the scan's or unreadable tiles."""
    for mag in magnifications:
        reader.downsample_for(mag)  # raises SlideError naming the file for one above the scan's
    box, base = (region.x, region.y), reader.info.base_magnification
    if region.width * region.height <= max_source_pixels:
        source = reader.read_region(*box, (region.width, region.height), base)
    else:
        top = max(magnifications)
        log.warning(
            "%s: region %s has %d level-0 pixels (> max_source_pixels=%d); reading it at %gx and "
            "downsampling from there", reader.path, region.region_id, region.width * region.height,
            max_source_pixels, top,
        )  # fmt: skip
        source = reader.read_region(
            *box, region.size_at(top), top, resample=Image.Resampling.LANCZOS
        )
    return {float(m): lanczos_resize(source, region.size_at(m)) for m in magnifications}
