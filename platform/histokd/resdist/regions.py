"""Tissue regions of a slide and their images at several magnifications, made from the original.

DiPalma et al. 2021 work on whole tissue regions of variable size, not on patches (Sec. 4.1):
the slides' white background is cut away with tissueloc (Chen and Yang 2019), which finds
bounding boxes around the tissue on a low-resolution view with morphological operations
(Sec. 4.2, 4.4), and each region is kept at its native size. The images for the teacher (10x)
and the students (5x down to 0.625x) are each downsampled *directly from the original scan*
with a Lanczos filter (Sec. 4.1: "to avoid any potential artifacts caused by a composition of
downsamplings"), rather than read from the slide's pyramid levels.

:func:`find_tissue_regions` does tissueloc's job with histokd's colour tissue mask (which, unlike
tissueloc's grey threshold, also keeps pen marks out): mask on a thumbnail, closing, hole
filling, small-object removal, connected components, bounding boxes.
:func:`read_region_magnifications` reads one box at level 0 and Lanczos-resizes it to each
magnification.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from histokd.slides import SlideReader
from histokd.tissue import TissueFilter, tissue_mask

__all__ = [
    "DEFAULT_MAX_SOURCE_PIXELS",
    "RegionFinder",
    "TissueRegion",
    "find_tissue_regions",
    "lanczos_resize",
    "magnification_tag",
    "read_region_magnifications",
    "scaled_size",
]

log = logging.getLogger(__name__)

#: Level-0 pixels read at once for one region (3 bytes each: 1.2 GB). Larger regions are read
#: at the highest magnification asked for instead (still Lanczos, from the nearest level).
DEFAULT_MAX_SOURCE_PIXELS = 400_000_000


def magnification_tag(magnification: float) -> str:
    """``10x``, ``0.625x``: the folder name of a magnification."""
    return f"{float(magnification):g}x"


def scaled_size(width: int, height: int, downsample: float) -> tuple[int, int]:
    """(width, height) divided by ``downsample``, rounded half up, at least 1 pixel."""
    if not downsample > 0:
        raise ValueError(f"downsample={downsample!r}: must be positive")
    return max(1, math.floor(width / downsample + 0.5)), max(
        1, math.floor(height / downsample + 0.5)
    )


def lanczos_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """RGB uint8 ``image`` resized to ``size`` (width, height) with PIL's Lanczos filter (a = 3)."""
    if (image.shape[1], image.shape[0]) == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize(tuple(size), Image.Resampling.LANCZOS))


@dataclass(frozen=True)
class TissueRegion:
    """A bounding box of tissue on one slide, in level-0 pixels.

    Attributes:
        slide: Slide file.
        index: Number of the region on its slide (row-major order of the boxes' corners).
        x: Left edge.
        y: Top edge.
        width: Width.
        height: Height.
        base_magnification: Magnification of level 0.
        tissue_fraction: Share of the box that the tissue mask covers (thumbnail estimate).
    """

    slide: str
    index: int
    x: int
    y: int
    width: int
    height: int
    base_magnification: float
    tissue_fraction: float = 1.0

    @property
    def region_id(self) -> str:
        """``{slide stem}-r{index:03d}``: unique within a dataset of distinct slide names."""
        return f"{Path(self.slide).stem}-r{self.index:03d}"

    def size_at(self, magnification: float) -> tuple[int, int]:
        """The region's (width, height) in pixels at ``magnification``."""
        return scaled_size(self.width, self.height, self.base_magnification / magnification)


@dataclass(frozen=True)
class RegionFinder:
    """Settings of the tissue-region search (tissueloc's steps, in physical units).

    Attributes:
        thumbnail_magnification: Magnification of the view the mask is computed on.
        min_area_um2: Smallest tissue area of a region (tissueloc: ``min_tissue_size``).
        closing_um: Radius of the closing that joins nearby tissue bits into one region.
        padding_um: Margin added around each box (clipped to the slide).
        tissue_filter: Colour thresholds of the tissue mask (``histokd.tissue``).
    """

    thumbnail_magnification: float = 1.25
    min_area_um2: float = 10_000.0
    closing_um: float = 16.0
    padding_um: float = 8.0
    tissue_filter: TissueFilter | None = None

    def __post_init__(self) -> None:
        checks = {
            "thumbnail_magnification": self.thumbnail_magnification > 0,
            "min_area_um2": self.min_area_um2 >= 0,
            "closing_um": self.closing_um >= 0,
            "padding_um": self.padding_um >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"RegionFinder.{name}={getattr(self, name)!r}: must be "
                    + ("positive" if name == "thumbnail_magnification" else ">= 0")
                )


def find_tissue_regions(
    slide: str | os.PathLike | SlideReader,
    finder: RegionFinder | None = None,
    base_magnification: float | None = None,
) -> list[TissueRegion]:
    """Bounding boxes of the tissue pieces of a slide (DiPalma Sec. 4.2 with tissueloc).

    Args:
        slide: Slide file or an open reader.
        finder: Settings (default ``RegionFinder()``).
        base_magnification: Level-0 magnification for files that record none.

    Returns:
        The regions, ordered by their top-left corner (row-major), possibly empty.
    """
    finder = finder or RegionFinder()
    reader = slide if isinstance(slide, SlideReader) else SlideReader(slide, base_magnification)
    try:
        base = reader.info.base_magnification
        thumb_mag = min(finder.thumbnail_magnification, base)
        thumb = reader.thumbnail(thumb_mag)
        um_per_px = 10.0 / thumb_mag  # 10x is 1 um/px (DiPalma Sec. 3.2)
        mask = tissue_mask(thumb, finder.tissue_filter)
        radius = int(round(finder.closing_um / um_per_px))
        if radius > 0:
            disk = _disk(radius)
            # pad so that closing does not erode tissue that touches the border
            padded = np.pad(mask, radius)
            mask = ndimage.binary_closing(padded, structure=disk)[radius:-radius, radius:-radius]
        mask = ndimage.binary_fill_holes(mask)
        labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
        if count == 0:
            return []
        areas = ndimage.sum(mask, labels, index=np.arange(1, count + 1)) * um_per_px**2
        scale = base / thumb_mag  # level-0 pixels per thumbnail pixel
        pad = finder.padding_um * base / 10.0  # um -> level-0 pixels
        width0, height0 = reader.info.dimensions
        boxes = []
        for k, box in enumerate(ndimage.find_objects(labels)):
            if box is None or areas[k] < finder.min_area_um2:
                continue
            rows, cols = box
            x0 = max(0, int(math.floor(cols.start * scale - pad)))
            y0 = max(0, int(math.floor(rows.start * scale - pad)))
            x1 = min(width0, int(math.ceil(cols.stop * scale + pad)))
            y1 = min(height0, int(math.ceil(rows.stop * scale + pad)))
            fraction = float((labels[box] == k + 1).mean())
            boxes.append((y0, x0, x1 - x0, y1 - y0, fraction))
        boxes.sort()
        return [
            TissueRegion(reader.path, i, x, y, w, h, base, tissue_fraction=frac)
            for i, (y, x, w, h, frac) in enumerate(boxes)
        ]
    finally:
        if not isinstance(slide, SlideReader):
            reader.close()


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (yy**2 + xx**2) <= radius**2


def read_region_magnifications(
    reader: SlideReader,
    region: TissueRegion,
    magnifications: Sequence[float],
    max_source_pixels: int = DEFAULT_MAX_SOURCE_PIXELS,
) -> dict[float, np.ndarray]:
    """One region at each magnification, each Lanczos-downsampled from the original.

    Args:
        reader: The region's slide.
        region: The box in level-0 pixels.
        magnifications: Target magnifications, each at most the scan's.
        max_source_pixels: Regions with more level-0 pixels are read at the highest
            magnification asked for (Lanczos from the nearest pyramid level) and the others are
            made from that one; a warning says so.

    Returns:
        ``{magnification: RGB uint8 array (height, width, 3)}`` with the sizes of
        :meth:`TissueRegion.size_at`.

    Raises:
        SlideError: A magnification above the scan's, or unreadable tiles.
    """
    if not magnifications:
        raise ValueError("read_region_magnifications: no magnifications given")
    base = reader.info.base_magnification
    for mag in magnifications:
        reader.downsample_for(mag)  # raises SlideError naming the file for one above the scan's
    if region.width * region.height <= max_source_pixels:
        source_mag = base
        source = reader.read_region(region.x, region.y, (region.width, region.height), base)
    else:
        source_mag = max(magnifications)
        log.warning(
            "%s: region %s has %d level-0 pixels (> max_source_pixels=%d); reading it at %gx and "
            "downsampling from there", reader.path, region.region_id, region.width * region.height,
            max_source_pixels, source_mag,
        )  # fmt: skip
        source = reader.read_region(
            region.x,
            region.y,
            region.size_at(source_mag),
            source_mag,
            resample=Image.Resampling.LANCZOS,
        )
    out = {}
    for mag in magnifications:
        size = region.size_at(mag)
        if mag == source_mag:
            out[float(mag)] = (
                source
                if (source.shape[1], source.shape[0]) == size
                else lanczos_resize(source, size)
            )
        else:
            out[float(mag)] = lanczos_resize(source, size)
    return out
