"""Whole-slide reading in physical units: a slide's pixel size, regions at a target um/px.

Everything downstream asks for pixels at a pixel size (``mpp``, um per pixel: RCKD Sec. 2.1.1's
20x is 0.5 um/px), never for a pyramid level. A magnification is an alias: ``10 / magnification``
um/px. This module picks the best level at or above the target and resizes the rest of the way,
so a 0.25 um/px scan and a 0.5 um/px scan give the same patch. A level within 1 % of the target
(0.499 um/px for 0.5) is read as is, without a resize; the patch's effective um/px says so.

A slide's base pixel size comes from, in order: OpenSlide's ``openslide.mpp-x``/``mpp-y``
(Aperio MPP, DICOM pixel spacing, generic TIFF resolution), the TIFF resolution tags, the
objective power (``10 / power``; a warning per slide: scanners at one power differ), and last
the user's ``assume_mpp``. A slide with none of them is refused. Pixels may be anisotropic.

Plain images that OpenSlide refuses (PNG, JPEG, strip TIFF tiles) are read whole by an image
backend (:class:`ImageSlide`) behind the same API, as a one-level slide.

Only OpenSlide's own ``OpenSlide()`` opens slides: ``open_slide()`` silently falls back to PIL
for formats OpenSlide rejects, which would hide a broken file behind a wrong reader.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import openslide
from PIL import Image

from histokd import object_store

__all__ = [
    "DEFAULT_MPP",
    "IMAGE_EXTENSIONS",
    "MPP_SOURCES",
    "Footprint",
    "ImageSlide",
    "SlideError",
    "SlideInfo",
    "SlideReader",
    "STANDARD_MAGNIFICATIONS",
    "magnification_from_mpp",
    "resolve_assume_mpp",
    "resolve_target_mpp",
]

log = logging.getLogger(__name__)

DEFAULT_MPP = 0.5  # RCKD Sec. 2.1.1: 20x
# Where a slide's base pixel size came from, most trusted first.
MPP_SOURCES = ("openslide-mpp", "tiff-resolution", "objective-power", "user")
# Plain images read by the image backend when OpenSlide refuses them.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
# A pyramid level this close to the asked pixel size is read as is (no resize).
_LEVEL_TOLERANCE = 0.01
# Largest plain image read whole into memory (about 0.8 GB as RGB).
_MAX_IMAGE_PIXELS = 1 << 28
_warned_objective: set[str] = set()

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


def resolve_target_mpp(
    mpp: float | None, magnification: float | None, default: float | None = DEFAULT_MPP
) -> float | None:
    """The patch pixel size asked for by ``mpp`` or its alias ``magnification`` (20x: 0.5 um/px).

    Raises:
        ValueError: Either is not positive, or both are given and disagree (by over 0.1 %).
    """
    for name, value in (("mpp", mpp), ("magnification", magnification)):
        if value is not None and (isinstance(value, bool) or not value > 0):
            raise ValueError(f"{name}={value!r}: must be positive (mpp in um/px, e.g. 0.5 = 20x)")
    if mpp is not None and magnification is not None:
        if not math.isclose(mpp, 10.0 / magnification, rel_tol=1e-3):
            raise ValueError(
                f"mpp={mpp!r} and magnification={magnification!r} disagree: {magnification:g}x "
                f"is {10.0 / magnification:g} um/px; give one of them"
            )
        return float(mpp)
    if magnification is not None:
        return 10.0 / magnification
    return default if mpp is None else float(mpp)


def resolve_assume_mpp(assume_mpp: float | None, base_magnification: float | None) -> float | None:
    """The pixel size to assume for slides that record none: ``assume_mpp``, or the older way
    to say it, ``base_magnification`` (40 means 0.25 um/px).

    Raises:
        ValueError: Either is not positive, or both are given and disagree.
    """
    if base_magnification is not None and (
        isinstance(base_magnification, bool) or not base_magnification > 0
    ):
        raise ValueError(f"base_magnification={base_magnification!r}: must be a positive number")
    if assume_mpp is not None and (isinstance(assume_mpp, bool) or not assume_mpp > 0):
        raise ValueError(f"assume_mpp={assume_mpp!r}: must be a positive um/px (e.g. 0.25 = 40x)")
    if base_magnification is None:
        return None if assume_mpp is None else float(assume_mpp)
    if assume_mpp is not None and not math.isclose(
        assume_mpp, 10.0 / base_magnification, rel_tol=1e-3
    ):
        raise ValueError(
            f"assume_mpp={assume_mpp!r} and base_magnification={base_magnification!r} disagree: "
            f"{base_magnification:g}x is {10.0 / base_magnification:g} um/px; give one of them"
        )
    return 10.0 / base_magnification


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
        vendor: OpenSlide's format name (``aperio``, ``generic-tiff``, ``dicom``, ...), or
            ``image`` for a plain image.
        dimensions: Level-0 width and height in pixels.
        level_dimensions: Width and height of each pyramid level.
        level_downsamples: Downsample factor of each level against level 0.
        base_magnification: ``10 / mpp_x``, not snapped to a standard power (0.499 um/px is
            20.04x): physical scale is exact.
        mpp_x: Microns per level-0 pixel along x.
        mpp_y: Microns per level-0 pixel along y (differs from ``mpp_x`` for anisotropic pixels).
        mpp_source: Where they came from, one of :data:`MPP_SOURCES`.
    """

    path: str
    vendor: str
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    base_magnification: float
    mpp_x: float
    mpp_y: float
    mpp_source: str

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def mpp(self) -> float:
        """Microns per level-0 pixel along x."""
        return self.mpp_x

    @property
    def magnification_source(self) -> str:
        """The older name of ``mpp_source``."""
        return self.mpp_source


@dataclass(frozen=True)
class Footprint:
    """Where a region of ``size`` output pixels at a pixel size comes from.

    Attributes:
        level: Pyramid level read.
        read_size: Width and height read at ``level`` (equal to the output size: no resize).
        extent: Level-0 width and height covered.
        mpp: Effective um per output pixel along x and y (within 1 % of the asked value where a
            level was read as is; else the asked value up to the rounding of ``read_size``).
    """

    level: int
    read_size: tuple[int, int]
    extent: tuple[int, int]
    mpp: tuple[float, float]


def _tiff_resolution_mpp(properties) -> tuple[float, float] | None:
    """um/px from ``tiff.XResolution``/``YResolution`` in pixels per centimetre or inch."""
    microns = {"centimeter": 1e4, "inch": 25400.0}.get(
        str(properties.get("tiff.ResolutionUnit", "")).lower()
    )
    x = _float_property(properties, "tiff.XResolution")
    if microns is None or x is None:
        return None
    y = _float_property(properties, "tiff.YResolution") or x
    return microns / x, microns / y


def _plausible(mpp: float | None) -> bool:
    return mpp is not None and _PLAUSIBLE_MPP[0] <= mpp <= _PLAUSIBLE_MPP[1]


class ImageSlide:
    """A plain image (PNG, JPEG, or a TIFF OpenSlide refuses) behind OpenSlide's reading API.

    One level, decoded whole on open (at most ``_MAX_IMAGE_PIXELS``). Its resolution (TIFF
    tags; PNG ``pHYs`` and JPEG density, which PIL reports as dpi) appears as OpenSlide-style
    ``tiff.XResolution``/``YResolution``/``ResolutionUnit`` properties.

    Raises:
        SlideError: The file cannot be decoded, is too large, or is not 8-bit grey/RGB(A).
    """

    def __init__(self, path: str):
        self.path = path
        properties: dict[str, str] = {"openslide.vendor": "image"}
        try:
            if path.lower().endswith((".tif", ".tiff")):
                import tifffile

                with tifffile.TiffFile(path) as tif:
                    page = tif.pages[0]
                    if math.prod(page.shape[:2]) > _MAX_IMAGE_PIXELS:
                        raise SlideError(path, self._too_large(page.shape))
                    array = page.asarray()
                    tags = page.tags
                    unit = tags.get("ResolutionUnit")
                    for name in ("XResolution", "YResolution"):
                        tag = tags.get(name)
                        if tag is not None and tag.value[1]:
                            properties[f"tiff.{name}"] = repr(tag.value[0] / tag.value[1])
                    if unit is not None:
                        names = {2: "inch", 3: "centimeter"}
                        properties["tiff.ResolutionUnit"] = names.get(int(unit.value), "none")
            else:
                with Image.open(path) as image:
                    if image.width * image.height > _MAX_IMAGE_PIXELS:
                        raise SlideError(path, self._too_large((image.height, image.width)))
                    dpi = image.info.get("dpi")
                    array = np.asarray(image.convert("RGBA" if "A" in image.mode else "RGB"))
                if dpi:
                    properties["tiff.XResolution"] = repr(float(dpi[0]))
                    properties["tiff.YResolution"] = repr(float(dpi[1]))
                    properties["tiff.ResolutionUnit"] = "inch"
        except SlideError:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder error is this file's problem
            raise SlideError(path, f"cannot read the image: {exc}") from exc
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            raise SlideError(
                path,
                f"image of {array.dtype} with shape {array.shape}; allowed: 8-bit grey, RGB or RGBA",
            )
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        if array.shape[2] not in (3, 4):
            raise SlideError(path, f"image with {array.shape[2]} channels; allowed: 1, 3 or 4")
        if array.shape[2] == 3:
            array = np.concatenate([array, np.full(array.shape[:2] + (1,), 255, np.uint8)], 2)
        self._rgba = array
        self.properties = properties
        self.dimensions = (array.shape[1], array.shape[0])
        self.level_dimensions = (self.dimensions,)
        self.level_downsamples = (1.0,)

    @staticmethod
    def _too_large(shape) -> str:
        return (
            f"plain image of {shape[1]}x{shape[0]} px is larger than {_MAX_IMAGE_PIXELS} px, "
            "which is read whole; write it as a tiled pyramidal TIFF"
        )

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]):
        """RGBA region at level 0; outside the image transparent, as OpenSlide does."""
        (x, y), (w, h) = location, size
        out = np.zeros((h, w, 4), np.uint8)
        width, height = self.dimensions
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._rgba[y0:y1, x0:x1]
        return Image.fromarray(out, "RGBA")

    def close(self) -> None:
        pass


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
    """Reads RGB regions of one slide at any pixel size at or above its scan's.

    Every geometry and reading method takes the target as ``mpp`` (um/px) or, positionally, as
    a ``magnification`` (its alias: ``10 / magnification`` um/px).

    Args:
        path: Slide file, in any format OpenSlide reads (SVS, generic tiled TIFF, DICOM, NDPI,
            MRXS, ...), or a plain PNG, JPEG or TIFF image.
        base_magnification: The older way to give ``assume_mpp``: ``10 / base_magnification``.
        assume_mpp: um per level-0 pixel to assume when the file records no MPP, TIFF
            resolution or objective power. Ignored when it records one.

    Raises:
        SlideError: The file is missing or cannot be opened, or its pixel size is unknown and
            none is assumed.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        base_magnification: float | None = None,
        *,
        assume_mpp: float | None = None,
    ):
        self.path = os.fspath(path)
        if not object_store.is_object_url(self.path):
            self.path = os.path.abspath(self.path)
        self._cached: object_store.CachedSlide | None = None  # a URL's copy, held while open
        try:
            self._assume_mpp = resolve_assume_mpp(assume_mpp, base_magnification)
        except ValueError as exc:
            raise SlideError(self.path, str(exc)) from None
        self._slide = self._open()
        self.info = self._describe()

    # -- opening -------------------------------------------------------------------------
    def _open(self) -> openslide.OpenSlide:
        local = self._local_path()
        if not os.path.exists(local):
            raise SlideError(self.path, "file not found")
        try:
            return openslide.OpenSlide(local)
        except openslide.OpenSlideUnsupportedFormatError as exc:
            if self.path.lower().endswith(IMAGE_EXTENSIONS):
                return ImageSlide(local)
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

    def _local_path(self) -> str:
        """The file to open: the slide itself, or a URL's copy in this node's slide cache."""
        if not object_store.is_object_url(self.path):
            return self.path
        if self._cached is None:
            try:
                self._cached = object_store.default_cache().open(self.path)
            except object_store.ObjectStoreError as exc:
                raise SlideError(self.path, exc.problem) from exc
        return str(self._cached.path)

    def _describe(self) -> SlideInfo:
        props = self._slide.properties
        mpp_x = _float_property(props, openslide.PROPERTY_NAME_MPP_X)
        mpp_y = _float_property(props, openslide.PROPERTY_NAME_MPP_Y)
        resolution = _tiff_resolution_mpp(props)
        objective = _float_property(props, openslide.PROPERTY_NAME_OBJECTIVE_POWER)
        if _plausible(mpp_x):  # implausible ones: e.g. a TIFF writer's default 72 dpi
            mpp = (mpp_x, mpp_y if _plausible(mpp_y) else mpp_x)
            source = "openslide-mpp"
        elif resolution is not None and _plausible(resolution[0]) and _plausible(resolution[1]):
            mpp, source = resolution, "tiff-resolution"
        elif objective is not None:
            mpp, source = (10.0 / objective, 10.0 / objective), "objective-power"
            if self.path not in _warned_objective:
                _warned_objective.add(self.path)
                log.warning(
                    "%s: no MPP or resolution recorded; pixel size %g um/px taken from the "
                    "objective power %gx (scanners at one power differ)",
                    self.path, 10.0 / objective, objective,
                )  # fmt: skip
        elif self._assume_mpp is not None:
            mpp, source = (self._assume_mpp, self._assume_mpp), "user"
        else:
            recorded = props.get(openslide.PROPERTY_NAME_MPP_X) or props.get("tiff.XResolution")
            self._slide.close()
            raise SlideError(
                self.path,
                "pixel size and base magnification unknown: the file records no plausible "
                "openslide.mpp-x, TIFF resolution or openslide.objective-power "
                f"(got {recorded!r}); give assume_mpp in um/px (e.g. 0.5 for 20x) "
                "or base_magnification (e.g. 20)",
            )
        return SlideInfo(
            path=self.path,
            vendor=props.get(openslide.PROPERTY_NAME_VENDOR, "unknown"),
            dimensions=tuple(self._slide.dimensions),
            level_dimensions=tuple(tuple(d) for d in self._slide.level_dimensions),
            level_downsamples=tuple(float(d) for d in self._slide.level_downsamples),
            base_magnification=10.0 / mpp[0],
            mpp_x=float(mpp[0]),
            mpp_y=float(mpp[1]),
            mpp_source=source,
        )

    # -- geometry ------------------------------------------------------------------------
    def _target(self, magnification: float | None, mpp: float | None) -> float:
        if magnification is None and mpp is None:
            raise SlideError(self.path, "no target given: pass mpp (um/px) or a magnification")
        try:
            return resolve_target_mpp(mpp, magnification)
        except ValueError as exc:
            raise SlideError(self.path, str(exc)) from None

    def downsamples_for(
        self, magnification: float | None = None, *, mpp: float | None = None
    ) -> tuple[float, float]:
        """Level-0 pixels per output pixel along x and y at the target pixel size.

        Raises:
            SlideError: The target is not positive, or finer than the scan's (by over 1 %).
        """
        target = self._target(magnification, mpp)
        info = self.info
        finest = min(info.mpp_x, info.mpp_y)
        if target < finest / (1 + _LEVEL_TOLERANCE):
            asked = (
                f"magnification={magnification:g}x" if mpp is None
                else f"mpp={target:g} um/px ({10.0 / target:.3g}x)"
            )  # fmt: skip
            raise SlideError(
                self.path,
                f"{asked} is above the scan's {10.0 / finest:.3g}x ({finest:g} um/px, from "
                f"{info.mpp_source}); allowed: at most {10.0 / finest:.3g}x, at least "
                f"{finest:g} um/px",
            )
        return target / info.mpp_x, target / info.mpp_y

    def downsample_for(
        self, magnification: float | None = None, *, mpp: float | None = None
    ) -> float:
        """Level-0 pixels per output pixel along x (see :meth:`downsamples_for`)."""
        return self.downsamples_for(magnification, mpp=mpp)[0]

    def _level_scales(self, level: int) -> tuple[float, float]:
        (w0, h0), (w, h) = self.info.dimensions, self.info.level_dimensions[level]
        return w0 / w, h0 / h

    def _pick_level(self, dx: float, dy: float) -> tuple[int, bool]:
        """The level to read for downsamples ``dx``, ``dy`` and whether it needs a resize: the
        coarsest level within 1 % of both as is, else the coarsest at least as fine."""
        snapped = [
            i for i in range(self.info.level_count)
            if all(abs(s / d - 1) <= _LEVEL_TOLERANCE
                   for s, d in zip(self._level_scales(i), (dx, dy), strict=True))
        ]  # fmt: skip
        if snapped:
            return snapped[-1], False
        level = 0
        for i in range(self.info.level_count):
            sx, sy = self._level_scales(i)
            if sx <= dx * 1.001 and sy <= dy * 1.001:
                level = i
        return level, True

    def best_level(self, magnification: float | None = None, *, mpp: float | None = None) -> int:
        """The pyramid level read for the target: within 1 % of it, else the coarsest finer one."""
        return self._pick_level(*self.downsamples_for(magnification, mpp=mpp))[0]

    def size_at(
        self, magnification: float | None = None, *, mpp: float | None = None
    ) -> tuple[int, int]:
        """Slide width and height in pixels at the target pixel size."""
        dx, dy = self.downsamples_for(magnification, mpp=mpp)
        width, height = self.info.dimensions
        return int(width / dx), int(height / dy)

    def footprint(
        self,
        size: int | tuple[int, int],
        magnification: float | None = None,
        *,
        mpp: float | None = None,
    ) -> Footprint:
        """The level, read size, level-0 extent and effective um/px of a region of ``size``."""
        width, height = (size, size) if isinstance(size, int) else size
        dx, dy = self.downsamples_for(magnification, mpp=mpp)
        level, resize = self._pick_level(dx, dy)
        sx, sy = self._level_scales(level)
        if resize:
            read = (max(1, round(width * dx / sx)), max(1, round(height * dy / sy)))
        else:
            read = (width, height)
        return Footprint(
            level=level,
            read_size=read,
            extent=(round(read[0] * sx), round(read[1] * sy)),
            mpp=(self.info.mpp_x * sx * read[0] / width, self.info.mpp_y * sy * read[1] / height),
        )

    # -- reading -------------------------------------------------------------------------
    def read_region(
        self,
        x: int,
        y: int,
        size: int | tuple[int, int],
        magnification: float | None = None,
        resample: Image.Resampling = Image.Resampling.BILINEAR,
        *,
        mpp: float | None = None,
    ) -> np.ndarray:
        """Read a region at a target pixel size.

        Args:
            x: Left edge in level-0 pixels.
            y: Top edge in level-0 pixels.
            size: Output width and height (or one number for a square) in output pixels.
            magnification: Target as a magnification (``10 / magnification`` um/px).
            resample: PIL filter for the resize from the pyramid level read.
            mpp: Target in um per output pixel, at least the scan's. The output is square
                pixels at it even where the scan's are not.

        Returns:
            RGB uint8 array of shape (height, width, 3), transparency flattened onto white.

        Raises:
            SlideError: The target is finer than the scan's, or the tiles cannot be read.
        """
        width, height = (size, size) if isinstance(size, int) else size
        where = self.footprint((width, height), magnification, mpp=mpp)
        level, (read_w, read_h) = where.level, where.read_size
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

    def thumbnail(
        self, magnification: float | None = None, *, mpp: float | None = None
    ) -> np.ndarray:
        """The whole slide at a coarse target pixel size as RGB uint8, background white.

        The best pyramid level is read in pieces of at most ``_THUMBNAIL_READ_PIXELS`` pixels
        (full-width strips, or tiles where one strip row is already too wide), each shrunk into
        its part of the output: a single-level slide of 100k x 80k px never decodes whole.
        """
        width, height = self.size_at(magnification, mpp=mpp)
        if width < 1 or height < 1:
            target = self._target(magnification, mpp)
            raise SlideError(
                self.path,
                f"thumbnail at {target:g} um/px would be empty; slide is "
                f"{self.info.dimensions} px at {self.info.mpp_x:g} um/px",
            )
        level = self.best_level(magnification, mpp=mpp)
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
        if self._cached is not None:
            self._cached.release()  # the cache may evict the copy again
            self._cached = None

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        i = self.info
        return (
            f"SlideReader({i.path!r}, {i.vendor}, {i.dimensions[0]}x{i.dimensions[1]} px, "
            f"{i.level_count} levels, {i.mpp_x:g}x{i.mpp_y:g} um/px from {i.mpp_source})"
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
