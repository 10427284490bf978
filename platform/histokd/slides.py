"""Whole-slide reading in physical units: base magnification, regions at a target magnification.

Everything downstream asks for pixels at a *magnification* (20x, as RCKD Sec. 2.1.1 does), never
for a pyramid level: this module picks the best level at or above the target and resizes the
rest of the way, so a 40x scan and a 20x scan give the same patch.

Only OpenSlide's own ``OpenSlide()`` opens slides: ``open_slide()`` silently falls back to PIL
for formats OpenSlide rejects, which would hide a broken file behind a wrong reader.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import openslide
from PIL import Image

__all__ = [
    "SlideError",
    "SlideInfo",
    "SlideReader",
    "STANDARD_MAGNIFICATIONS",
    "magnification_from_mpp",
]

# A scan's magnification read from MPP is snapped to one of these when within 5 %
# (0.499 um/px is a 20x Aperio scan, not a 20.04x one).
STANDARD_MAGNIFICATIONS = (1.25, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 80.0)

# 10 um/px is 1x: anything coarser is not a microscope scan. TIFF writers that know no
# physical size record 72 dpi (352.8 um/px), which must read as "no MPP", not as 0.03x.
_PLAUSIBLE_MPP = (0.05, 10.0)


# Most pixels one thumbnail read decodes (RGBA: 4 bytes each, plus the flattening's copies).
_THUMBNAIL_READ_PIXELS = 1 << 24


def _thumbnail_piece(
    level_w: int, level_h: int, width: int, height: int, sx: float, sy: float, max_pixels: int
) -> tuple[int, int]:
    """Output width and height of one thumbnail piece whose level read fits ``max_pixels``.

    A piece of ``w`` output px reads less than ``w * sx + 2`` level px (floor and ceil of its
    edges). The whole level in one piece where it fits; else full-width strips; else tiles.
    """
    if level_w * level_h <= max_pixels:
        return width, height
    if level_w * (sy + 2) <= max_pixels:
        rows = int((max_pixels / level_w - 2) / sy)
        return width, max(1, min(height, rows))
    cols = max(1, min(width, int((math.sqrt(max_pixels) - 2) / sx)))
    rows = int((max_pixels / (cols * sx + 2) - 2) / sy)
    return cols, max(1, min(height, rows))


class SlideError(ValueError):
    """A slide that cannot be used, with the file and the reason in the message."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def magnification_from_mpp(mpp: float) -> float:
    """Objective magnification for a pixel size: 0.25 um/px is 40x, 0.5 um/px is 20x."""
    mag = 10.0 / mpp
    for standard in STANDARD_MAGNIFICATIONS:
        if abs(mag - standard) <= 0.05 * standard:
            return standard
    return mag


@dataclass(frozen=True)
class SlideInfo:
    """What a reader knows about one slide.

    Attributes:
        path: Absolute path of the slide file.
        vendor: OpenSlide's format name (``aperio``, ``generic-tiff``, ``dicom``, ...).
        dimensions: Level-0 width and height in pixels.
        level_dimensions: Width and height of each pyramid level.
        level_downsamples: Downsample factor of each level against level 0.
        base_magnification: Magnification of level 0.
        magnification_source: Where it came from: ``objective-power``, ``mpp`` or ``user``.
        mpp: Microns per pixel at level 0, None where the file records none.
    """

    path: str
    vendor: str
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    base_magnification: float
    magnification_source: str
    mpp: float | None

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)


def _float_property(properties, key: str) -> float | None:
    value = properties.get(key)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number > 0 else None


class SlideReader:
    """Reads RGB regions of one slide at any magnification at or below its scan's.

    Args:
        path: Slide file, in any format OpenSlide reads (SVS, generic tiled TIFF, DICOM, NDPI,
            MRXS, ...).
        base_magnification: Magnification of level 0 to assume when the file records neither
            ``openslide.objective-power`` nor a plausible MPP. Ignored when the file has either.

    Raises:
        SlideError: The file is missing, OpenSlide cannot open it, or its magnification is
            unknown and no ``base_magnification`` was given.
    """

    def __init__(self, path: str | os.PathLike, base_magnification: float | None = None):
        self.path = os.path.abspath(path)
        if base_magnification is not None and not base_magnification > 0:
            raise SlideError(
                self.path, f"base_magnification={base_magnification!r}: must be a positive number"
            )
        self._user_magnification = base_magnification
        self._slide = self._open()
        self.info = self._describe()

    # -- opening -------------------------------------------------------------------------
    def _open(self) -> openslide.OpenSlide:
        if not os.path.exists(self.path):
            raise SlideError(self.path, "file not found")
        try:
            return openslide.OpenSlide(self.path)
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise SlideError(
                self.path,
                f"not a slide format OpenSlide reads ({exc}); supported: Aperio SVS, "
                "generic tiled TIFF, DICOM, Hamamatsu NDPI/VMS, MIRAX, Leica SCN, Philips, "
                "Sakura, Trestle, Ventana, Zeiss CZI",
            ) from exc
        except openslide.OpenSlideError as exc:
            raise SlideError(self.path, f"OpenSlide cannot open the file: {exc}") from exc
        except OSError as exc:  # permissions, I/O errors, truncated headers
            raise SlideError(self.path, f"cannot read the file: {exc}") from exc

    def _describe(self) -> SlideInfo:
        props = self._slide.properties
        mpp = _float_property(props, openslide.PROPERTY_NAME_MPP_X)
        if mpp is not None and not (_PLAUSIBLE_MPP[0] <= mpp <= _PLAUSIBLE_MPP[1]):
            mpp = None  # e.g. a TIFF's default 72 dpi
        objective = _float_property(props, openslide.PROPERTY_NAME_OBJECTIVE_POWER)
        if objective is not None:
            base, source = objective, "objective-power"
        elif mpp is not None:
            base, source = magnification_from_mpp(mpp), "mpp"
        elif self._user_magnification is not None:
            base, source = float(self._user_magnification), "user"
        else:
            recorded = props.get(openslide.PROPERTY_NAME_MPP_X)
            self._slide.close()
            raise SlideError(
                self.path,
                "base magnification unknown: the file records neither "
                "openslide.objective-power nor a plausible openslide.mpp-x "
                f"(got {recorded!r}); give it as "
                "base_magnification (e.g. 20 or 40)",
            )
        return SlideInfo(
            path=self.path,
            vendor=props.get(openslide.PROPERTY_NAME_VENDOR, "unknown"),
            dimensions=tuple(self._slide.dimensions),
            level_dimensions=tuple(tuple(d) for d in self._slide.level_dimensions),
            level_downsamples=tuple(float(d) for d in self._slide.level_downsamples),
            base_magnification=float(base),
            magnification_source=source,
            mpp=mpp,
        )

    # -- geometry ------------------------------------------------------------------------
    def downsample_for(self, magnification: float) -> float:
        """Level-0 pixels per output pixel at ``magnification``.

        Raises:
            SlideError: The magnification is not positive or above the scan's.
        """
        base = self.info.base_magnification
        if not magnification > 0:
            raise SlideError(self.path, f"magnification={magnification!r}: must be positive")
        if magnification > base * 1.001:
            raise SlideError(
                self.path,
                f"magnification={magnification:g}x is above the scan's {base:g}x "
                f"(from {self.info.magnification_source}); allowed: at most {base:g}x",
            )
        return base / magnification

    def best_level(self, magnification: float) -> int:
        """The coarsest pyramid level that still has at least the resolution asked for."""
        downsample = self.downsample_for(magnification)
        level = 0
        for i, level_downsample in enumerate(self.info.level_downsamples):
            if level_downsample <= downsample * 1.001:
                level = i
        return level

    def size_at(self, magnification: float) -> tuple[int, int]:
        """Slide width and height in pixels at ``magnification``."""
        downsample = self.downsample_for(magnification)
        width, height = self.info.dimensions
        return int(width / downsample), int(height / downsample)

    # -- reading -------------------------------------------------------------------------
    def read_region(
        self,
        x: int,
        y: int,
        size: int | tuple[int, int],
        magnification: float,
        resample: Image.Resampling = Image.Resampling.BILINEAR,
    ) -> np.ndarray:
        """Read a region at ``magnification``.

        Args:
            x: Left edge in level-0 pixels.
            y: Top edge in level-0 pixels.
            size: Output width and height (or one number for a square) in pixels at
                ``magnification``.
            magnification: Target magnification, at most the scan's.
            resample: PIL filter for the resize from the pyramid level read.

        Returns:
            RGB uint8 array of shape (height, width, 3), transparency flattened onto white.

        Raises:
            SlideError: The magnification is above the scan's, or the tiles cannot be read.
        """
        width, height = (size, size) if isinstance(size, int) else size
        downsample = self.downsample_for(magnification)
        level = self.best_level(magnification)
        level_downsample = self.info.level_downsamples[level]
        read_w = max(1, round(width * downsample / level_downsample))
        read_h = max(1, round(height * downsample / level_downsample))
        try:
            image = self._slide.read_region((int(x), int(y)), level, (read_w, read_h))
        except openslide.OpenSlideError as exc:
            # After a failed read the OpenSlide handle is dead: reopen it so the reader stays
            # usable for other regions, then report this one.
            self._reopen()
            raise SlideError(
                self.path,
                f"tiles cannot be read at x={x}, y={y}, level={level} "
                f"({read_w}x{read_h} px): {exc}",
            ) from exc
        rgb = flatten_rgba(image)
        if (read_w, read_h) != (width, height):
            rgb = np.asarray(Image.fromarray(rgb).resize((width, height), resample))
        return rgb

    def thumbnail(self, magnification: float) -> np.ndarray:
        """The whole slide at a low ``magnification`` as RGB uint8, background white.

        The best pyramid level is read in pieces of at most ``_THUMBNAIL_READ_PIXELS`` pixels
        (full-width strips, or tiles where one strip row is already too wide), each shrunk into
        its part of the output: a single-level slide of 100k x 80k px never decodes whole.
        """
        width, height = self.size_at(magnification)
        if width < 1 or height < 1:
            raise SlideError(
                self.path,
                f"thumbnail at {magnification:g}x would be empty; slide is "
                f"{self.info.dimensions} px at {self.info.base_magnification:g}x",
            )
        level = self.best_level(magnification)
        level_w, level_h = self.info.level_dimensions[level]
        level_downsample = self.info.level_downsamples[level]
        sx, sy = level_w / width, level_h / height  # level px per output px
        tile_w, tile_h = _thumbnail_piece(
            level_w, level_h, width, height, sx, sy, _THUMBNAIL_READ_PIXELS
        )
        out = np.empty((height, width, 3), np.uint8)
        try:
            for r0 in range(0, height, tile_h):
                r1 = min(height, r0 + tile_h)
                fy0, fy1 = r0 * sy, min(level_h, r1 * sy)
                iy0 = math.floor(fy0)
                read_h = min(level_h, math.ceil(fy1)) - iy0
                for c0 in range(0, width, tile_w):
                    c1 = min(width, c0 + tile_w)
                    fx0, fx1 = c0 * sx, min(level_w, c1 * sx)
                    ix0 = math.floor(fx0)
                    read_w = min(level_w, math.ceil(fx1)) - ix0
                    # Level-0 origin: where the level's downsample is not a whole number (4.0003),
                    # OpenSlide interpolates from the nearest start, a fraction of a level pixel.
                    origin = (round(ix0 * level_downsample), round(iy0 * level_downsample))
                    image = self._slide.read_region(origin, level, (read_w, read_h))
                    piece = Image.fromarray(flatten_rgba(image))
                    box = (fx0 - ix0, fy0 - iy0, min(fx1 - ix0, read_w), min(fy1 - iy0, read_h))
                    out[r0:r1, c0:c1] = np.asarray(
                        piece.resize((c1 - c0, r1 - r0), Image.Resampling.BOX, box=box)
                    )
        except openslide.OpenSlideError as exc:
            self._reopen()
            raise SlideError(self.path, f"tiles cannot be read for the thumbnail: {exc}") from exc
        return out

    def _reopen(self) -> None:
        try:
            self._slide.close()
        except Exception:  # noqa: BLE001 - the handle is already broken
            pass
        self._slide = self._open()

    def close(self) -> None:
        self._slide.close()

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        i = self.info
        return (
            f"SlideReader({i.path!r}, {i.vendor}, {i.dimensions[0]}x{i.dimensions[1]} px, "
            f"{i.level_count} levels, {i.base_magnification:g}x from {i.magnification_source})"
        )


def flatten_rgba(image: Image.Image) -> np.ndarray:
    """RGBA (OpenSlide's output, not premultiplied) onto a white background, as RGB uint8."""
    rgba = np.asarray(image)
    if rgba.ndim == 3 and rgba.shape[2] == 3:
        return rgba
    alpha = rgba[..., 3:4].astype(np.uint16)
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    rgb = rgba[..., :3].astype(np.uint16)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
