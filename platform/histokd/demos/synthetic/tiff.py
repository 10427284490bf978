"""Write pyramidal tiled TIFFs that OpenSlide opens, and read crops of tiled TIFFs.

Two slide flavours:

* :func:`write_svs` writes an Aperio-style SVS: JPEG tiles, one IFD per pyramid level and an
  ImageDescription that starts with ``Aperio Image Library`` and carries
  ``|AppMag = 20|MPP = 0.5``. OpenSlide 4 reports it as vendor ``aperio`` with
  ``openslide.objective-power`` and ``openslide.mpp-x``/``mpp-y``; this is how the demo
  slides get their magnification.
* :func:`write_tiled_tiff` writes a plain tiled TIFF (OpenSlide's ``generic-tiff``). Its
  resolution tags give ``openslide.mpp-x``/``mpp-y``, but a generic TIFF has no objective
  power, which is exactly the edge case the slide layer must handle.

Label masks (:func:`write_label_tiff`) are tiled, deflate-compressed single-page TIFFs;
:func:`read_tiff_region` decodes only the tiles that a crop touches. Every writer writes
to a temporary file in the target folder and renames it, so a file that exists is whole.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

__all__ = [
    "pyramid",
    "read_tiff_region",
    "write_label_tiff",
    "write_svs",
    "write_tiled_tiff",
]

_COMPRESSIONS = {"jpeg": "jpeg", "deflate": "zlib", "none": None}


def pyramid(
    image: np.ndarray, tile_size: int, level_downsample: int, levels: int | None = None
) -> list[np.ndarray]:
    """Level 0 and its box-filtered reductions, each ``level_downsample`` times smaller.

    Args:
        image: Level 0, (height, width) or (height, width, samples), uint8.
        tile_size: Tile side; with ``levels=None`` reduction stops at the first level
            that fits in one tile.
        level_downsample: Size ratio between consecutive levels (2 or 4 are usual).
        levels: Exact number of levels, or None for automatic.

    Returns:
        The levels, largest first.
    """
    if level_downsample < 2:
        raise ValueError(
            f"level_downsample={level_downsample!r} is invalid: must be an integer >= 2"
        )
    if levels is not None and levels < 1:
        raise ValueError(f"levels={levels!r} is invalid: must be >= 1 or None (automatic)")
    out = [image]
    while True:
        h, w = out[-1].shape[:2]
        if levels is not None and len(out) == levels:
            break
        if levels is None and max(h, w) <= tile_size:
            break
        if min(h, w) < level_downsample:
            if levels is not None:
                raise ValueError(
                    f"levels={levels} is too many for a {image.shape[1]}x{image.shape[0]} image "
                    f"with level_downsample={level_downsample}: level {len(out)} would be empty"
                )
            break
        out.append(np.asarray(Image.fromarray(out[-1]).reduce(level_downsample)))
    return out


def write_svs(
    path: str | os.PathLike,
    image: np.ndarray,
    *,
    mpp: float,
    magnification: float,
    tile_size: int = 256,
    level_downsample: int = 4,
    jpeg_quality: int = 90,
) -> list[tuple[int, int]]:
    """Write an RGB image as an Aperio-style SVS with JPEG tiles and a pyramid.

    Args:
        path: Output file (``.svs`` by convention; OpenSlide detects the format by content).
        image: RGB uint8 level 0, (height, width, 3).
        mpp: Micrometres per level-0 pixel, written as ``MPP``.
        magnification: Objective power, written as ``AppMag``.
        tile_size: Tile side in pixels, a multiple of 16 (JPEG with 2x2 chroma subsampling).
        level_downsample: Size ratio between pyramid levels.
        jpeg_quality: JPEG quality, 1-100.

    Returns:
        (width, height) of every level, as OpenSlide will report them.
    """
    _check_rgb(image, "image")
    _check_tile(tile_size, 16)
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality={jpeg_quality!r} is invalid: must be in [1, 100]")
    if not mpp > 0 or not magnification > 0:
        raise ValueError(f"mpp={mpp!r} and magnification={magnification!r} must both be > 0")
    levels = pyramid(image, tile_size, level_downsample)
    h, w = image.shape[:2]
    # OpenSlide reads the key = value pairs after the first "|" of the first description.
    header = (
        f"Aperio Image Library v12.0.16 \r\n{w}x{h} [0,0 {w}x{h}] "
        f"({tile_size}x{tile_size}) JPEG/RGB Q={jpeg_quality}"
    )
    fields = (
        f"|AppMag = {magnification:g}|MPP = {mpp:.6g}"
        f"|Filename = {Path(path).stem}|Software = histokd"
    )
    with _atomic(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=_needs_bigtiff(levels)) as tif:
        for i, level in enumerate(levels):
            lh, lw = level.shape[:2]
            description = header + fields if i == 0 else f"{header} -> {lw}x{lh}{fields}"
            _write_tiles(
                tif,
                level,
                tile_size,
                compression="jpeg",
                compressionargs={"level": jpeg_quality},
                description=description,
                software=False,
            )
    return [(lv.shape[1], lv.shape[0]) for lv in levels]


def write_tiled_tiff(
    path: str | os.PathLike,
    image: np.ndarray,
    *,
    tile_size: int = 256,
    levels: int | None = None,
    level_downsample: int = 2,
    mpp: float | None = None,
    compression: str = "jpeg",
    jpeg_quality: int = 90,
) -> list[tuple[int, int]]:
    """Write a plain (generic) tiled TIFF pyramid from an array, for slide-layer edge cases.

    Args:
        path: Output file.
        image: uint8 array: (height, width) grey, (height, width, 3) RGB, or
            (height, width, 4) RGBA with unassociated alpha (OpenSlide premultiplies it;
            RGBA needs ``compression="deflate"`` or ``"none"``).
        tile_size: Tile side in pixels, a multiple of 16.
        levels: Number of pyramid levels, or None to reduce until a level fits one tile.
        level_downsample: Size ratio between pyramid levels.
        mpp: Micrometres per level-0 pixel, written as resolution tags (OpenSlide then
            reports ``openslide.mpp-x``/``mpp-y``); None writes none. There is no way to
            record a magnification in a generic TIFF.
        compression: ``"jpeg"``, ``"deflate"`` (lossless) or ``"none"``.
        jpeg_quality: JPEG quality, 1-100.

    Returns:
        (width, height) of every level.
    """
    if compression not in _COMPRESSIONS:
        raise ValueError(
            f"compression={compression!r} is invalid: must be one of {sorted(_COMPRESSIONS)}"
        )
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image dtype {image.dtype} is invalid: must be uint8")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) < 1:
        raise ValueError(
            f"image shape {image.shape} is invalid: must be (H, W), (H, W, 3) or (H, W, 4)"
        )
    if image.shape[2] == 4 and compression == "jpeg":
        raise ValueError(
            "an RGBA image cannot be JPEG-compressed: use compression='deflate' or 'none'"
        )
    if mpp is not None and not mpp > 0:
        raise ValueError(f"mpp={mpp!r} is invalid: must be > 0 or None")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality={jpeg_quality!r} is invalid: must be in [1, 100]")
    _check_tile(tile_size, 16)
    pages = pyramid(image, tile_size, level_downsample, levels)
    w0 = image.shape[1]
    with _atomic(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=_needs_bigtiff(pages)) as tif:
        for i, page in enumerate(pages):
            kwargs: dict = {}
            if mpp is not None:
                scale = w0 / page.shape[1]
                per_cm = 1e4 / (mpp * scale)
                kwargs.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
            if page.shape[2] == 4:
                kwargs["extrasamples"] = ["unassalpha"]
            if compression == "jpeg":
                kwargs["compressionargs"] = {"level": jpeg_quality}
            _write_tiles(
                tif,
                page,
                tile_size,
                compression=_COMPRESSIONS[compression],
                subfiletype=1 if i else 0,
                **kwargs,
            )
    return [(p.shape[1], p.shape[0]) for p in pages]


def write_label_tiff(
    path: str | os.PathLike, labels: np.ndarray, *, tile_size: int = 256, mpp: float | None = None
) -> None:
    """Write an integer mask as one tiled, deflate-compressed TIFF page (lossless).

    Args:
        path: Output file.
        labels: 2-D unsigned integer array (uint8, uint16 or uint32).
        tile_size: Tile side in pixels, a multiple of 16.
        mpp: Micrometres per pixel, written as resolution tags when given.
    """
    if labels.ndim != 2 or labels.dtype not in (np.uint8, np.uint16, np.uint32):
        raise ValueError(
            f"labels of shape {labels.shape} and dtype {labels.dtype} are invalid: "
            "must be 2-D uint8, uint16 or uint32"
        )
    _check_tile(tile_size, 16)
    kwargs: dict = {}
    if mpp is not None:
        kwargs.update(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    with _atomic(path) as tmp:
        tifffile.imwrite(
            tmp,
            labels,
            tile=(tile_size, tile_size),
            photometric="minisblack",
            compression="zlib",
            metadata=None,
            bigtiff=labels.nbytes > 2**31,
            **kwargs,
        )


def read_tiff_region(
    path: str | os.PathLike, x: int, y: int, width: int, height: int
) -> np.ndarray:
    """Read a crop of the first page of a tiled TIFF, decoding only the tiles it touches.

    The crop may reach past the image; pixels outside it are 0 (OpenSlide's convention
    for ``read_region``, there with alpha 0).

    Args:
        path: A tiled TIFF (for instance a mask from :func:`write_label_tiff`).
        x: Left edge, in pixels of the page.
        y: Top edge.
        width: Crop width, > 0.
        height: Crop height, > 0.

    Returns:
        (height, width) for one sample per pixel, else (height, width, samples).
    """
    if width <= 0 or height <= 0:
        raise ValueError(
            f"region {width}x{height} at ({x}, {y}) of {path} is invalid: size must be > 0"
        )
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such mask file")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        if not page.is_tiled:
            raise ValueError(
                f"{path}: page 0 is not tiled; read_tiff_region reads tiled TIFFs only"
            )
        ih, iw = page.imagelength, page.imagewidth
        th, tw = page.tilelength, page.tilewidth
        samples = page.samplesperpixel
        out = np.zeros((height, width, samples), page.dtype)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, iw), min(y + height, ih)
        if x0 < x1 and y0 < y1:
            across = -(-iw // tw)
            fh = tif.filehandle
            for ty in range(y0 // th, (y1 - 1) // th + 1):
                for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                    index = ty * across + tx
                    fh.seek(page.dataoffsets[index])
                    data = fh.read(page.databytecounts[index])
                    tile = page.decode(data, index, jpegtables=page.jpegtables)[0]
                    if tile is None:
                        raise ValueError(f"{path}: tile {index} is missing or empty")
                    tile = tile.reshape(th, tw, samples)
                    # Intersection of this tile with the crop, in image coordinates.
                    ax0, ay0 = max(tx * tw, x0), max(ty * th, y0)
                    ax1, ay1 = min((tx + 1) * tw, x1), min((ty + 1) * th, y1)
                    out[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = tile[
                        ay0 - ty * th : ay1 - ty * th, ax0 - tx * tw : ax1 - tx * tw
                    ]
    return out[..., 0] if samples == 1 else out


def _write_tiles(tif: tifffile.TiffWriter, page: np.ndarray, tile_size: int, **kwargs: Any) -> None:
    """Write ``page`` (RGB or RGBA) as one tiled page, edge-padded, without tifffile's metadata."""
    tif.write(
        _edge_padded_tiles(page, tile_size),
        shape=page.shape,
        dtype=page.dtype,
        tile=(tile_size, tile_size),
        photometric="rgb",
        metadata=None,
        **kwargs,
    )


def _edge_padded_tiles(image: np.ndarray, tile_size: int) -> Iterator[np.ndarray]:
    """Tiles in row-major order, the last row and column padded by repeating edge pixels.

    tifffile pads partial tiles with zeros; under JPEG the black padding bleeds into the
    image's last pixels (8x8 blocks, 2x2 chroma subsampling). Repeating the edge does not.
    """
    h, w = image.shape[:2]
    pad = ((0, -h % tile_size), (0, -w % tile_size)) + ((0, 0),) * (image.ndim - 2)
    padded = np.pad(image, pad, mode="edge")
    for y in range(0, padded.shape[0], tile_size):
        for x in range(0, padded.shape[1], tile_size):
            yield padded[y : y + tile_size, x : x + tile_size]


@contextlib.contextmanager
def _atomic(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path`` and move it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name (concurrent writers do not collide), created by the writer itself so
    # that the file gets the usual permissions (mkstemp would make it private).
    tmp = str(path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp"))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _needs_bigtiff(levels: list[np.ndarray]) -> bool:
    # Classic TIFF offsets are 32-bit; compressed data is smaller, but be safe near 4 GB.
    return sum(lv.nbytes for lv in levels) > 2**31


def _check_rgb(image: np.ndarray, name: str) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"{name} of shape {image.shape} and dtype {image.dtype} is invalid: "
            "must be (H, W, 3) uint8"
        )


def _check_tile(tile_size: int, multiple: int) -> None:
    if tile_size < multiple or tile_size % multiple:
        raise ValueError(
            f"tile_size={tile_size!r} is invalid: must be a positive multiple of {multiple}"
        )
