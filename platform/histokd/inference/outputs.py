"""What whole-slide inference writes per slide: pyramidal OME-TIFFs, PNG overlays, the tile table.

* ``heatmap.ome.tif``: class probabilities, ``C x H x W`` uint8 (probability x 255), one named
  channel per class; ``labels.ome.tif``: ``H x W`` uint8 class indices, 255 where no tile was
  predicted. Both are tiled, deflate-compressed OME-TIFFs with a 2x pyramid in SubIFDs and the
  physical pixel size, which QuPath, napari, Fiji/Bio-Formats and tifffile open.
* ``overlay.png``: the slide thumbnail with the label colours blended on it and a legend;
  ``heatmap.png``: one panel per class, its probability as a colour map over the thumbnail.
* ``predictions.parquet``: one row per tile with its level-0 coordinates and probabilities.
* ``predictions.geojson``: the tiles and each class's region outlines for QuPath
  (`histokd.inference.geojson`).

``summary.json`` records each of these files' size and SHA-256 (`file_record`); a rerun trusts a
slide's outputs only when every recorded file is still whole (`damaged_output`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tifffile
from PIL import Image, ImageDraw

from histokd.inference.stitching import NO_LABEL

__all__ = [
    "class_palette",
    "damaged_output",
    "file_record",
    "heatmap_panels",
    "label_overlay",
    "pyramid_levels",
    "tile_table",
    "write_ome_tiff",
    "write_table",
]

_TILE = 256  # TIFF tile side
# Tableau's ten colours, then a few more; class k gets colour k.
_PALETTE = np.array(
    [
        (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
        (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
        (0, 0, 128), (128, 128, 0), (0, 128, 128), (128, 0, 0),
    ],
    np.uint8,
)  # fmt: skip


def class_palette(num_classes: int) -> np.ndarray:
    """``num_classes x 3`` uint8 colours, class k the k-th Tableau colour (repeating)."""
    return _PALETTE[np.arange(num_classes) % len(_PALETTE)]


# -- TIFF --------------------------------------------------------------------------------------
def pyramid_levels(image: np.ndarray, kind: str, min_side: int = _TILE) -> list[np.ndarray]:
    """The image and its 2x reductions until it fits one TIFF tile.

    Args:
        image: ``H x W`` or ``C x H x W``.
        kind: ``mean`` (2 x 2 block mean, for probabilities) or ``nearest`` (every second
            pixel, so class indices stay indices).
        min_side: Stop when the larger side is at most this.
    """
    levels = [image]
    while max(levels[-1].shape[-2:]) > min_side:
        current = levels[-1]
        if kind == "nearest":
            levels.append(np.ascontiguousarray(current[..., ::2, ::2]))
            continue
        h, w = current.shape[-2:]
        pad = [(0, 0)] * (current.ndim - 2) + [(0, h % 2), (0, w % 2)]
        padded = np.pad(current.astype(np.float32), pad, mode="edge")
        blocks = padded.reshape(
            *padded.shape[:-2], padded.shape[-2] // 2, 2, padded.shape[-1] // 2, 2
        )
        levels.append(blocks.mean(axis=(-3, -1)).round().astype(current.dtype))
    return levels


def write_ome_tiff(
    path: str | os.PathLike,
    image: np.ndarray,
    *,
    channel_names: Sequence[str] | None = None,
    pixel_size_um: float | None = None,
    kind: str = "mean",
    description: str | None = None,
) -> Path:
    """Write a tiled, deflate-compressed, pyramidal OME-TIFF.

    Args:
        path: Output file (``.ome.tif``).
        image: ``H x W`` (one channel) or ``C x H x W`` uint8.
        channel_names: Name of each channel.
        pixel_size_um: Microns per pixel, written to the OME metadata and resolution tags.
        kind: How the pyramid reduces (see `pyramid_levels`).
        description: Free text stored as the OME ``Description`` of the image.
    """
    path = Path(path)
    axes = "YX" if image.ndim == 2 else "CYX"
    metadata: dict = {"axes": axes}
    if channel_names is not None:
        metadata["Channel"] = {"Name": list(channel_names)}
    if description:
        metadata["Description"] = description
    options: dict = {"tile": (_TILE, _TILE), "compression": "zlib", "photometric": "minisblack"}
    if pixel_size_um:
        metadata.update(
            PhysicalSizeX=pixel_size_um,
            PhysicalSizeXUnit="µm",
            PhysicalSizeY=pixel_size_um,
            PhysicalSizeYUnit="µm",
        )
        options.update(
            resolution=(1e4 / pixel_size_um, 1e4 / pixel_size_um), resolutionunit="CENTIMETER"
        )
    levels = pyramid_levels(image, kind)
    with tifffile.TiffWriter(path, bigtiff=image.nbytes > 2**31, ome=True) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, metadata=metadata, **options)
        options.pop("resolution", None)
        options.pop("resolutionunit", None)
        for level in levels[1:]:
            tif.write(level, subfiletype=1, metadata=None, **options)
    return path


# -- PNG -----------------------------------------------------------------------------------------
def _fit(image: np.ndarray, max_side: int, resample: Image.Resampling) -> np.ndarray:
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, resample))


def _transparent_classes(class_names: Sequence[str]) -> list[int]:
    """Classes not painted on overlays: those named background (glass is not worth a colour)."""
    return [
        k for k, name in enumerate(class_names) if name.lower() in ("background", "bg", "glass")
    ]


def label_overlay(
    thumbnail: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    opacity: float = 0.45,
    max_side: int = 2048,
    legend: bool = True,
) -> np.ndarray:
    """The thumbnail with each predicted pixel blended towards its class colour, and a legend.

    Pixels without a prediction (`NO_LABEL`) and classes named ``background`` stay as they are.

    Args:
        thumbnail: RGB uint8 ``H x W x 3`` at the labels' resolution.
        labels: ``H x W`` class indices.
        class_names: Name of each class.
        opacity: Weight of the class colour.
        max_side: Longest side of the picture (larger thumbnails are shrunk).
        legend: Add a strip with each class's colour and name below.
    """
    if thumbnail.shape[:2] != labels.shape:
        raise ValueError(
            f"thumbnail {thumbnail.shape[:2]} and labels {labels.shape} differ in size"
        )
    palette = class_palette(len(class_names))
    thumbnail = _fit(thumbnail, max_side, Image.Resampling.BOX)
    labels = _fit(labels, max_side, Image.Resampling.NEAREST)
    out = thumbnail.astype(np.float32)
    paint = (labels != NO_LABEL) & ~np.isin(labels, _transparent_classes(class_names))
    colours = palette[np.minimum(labels, len(palette) - 1)].astype(np.float32)
    out[paint] = (1 - opacity) * out[paint] + opacity * colours[paint]
    picture = out.round().astype(np.uint8)
    return (
        _with_legend(picture, class_names, palette, _transparent_classes(class_names))
        if legend
        else picture
    )


def _with_legend(
    picture: np.ndarray, class_names: Sequence[str], palette: np.ndarray, clear: Sequence[int]
) -> np.ndarray:
    h, w = picture.shape[:2]
    row_h, swatch = 16, 12
    per_row = max(1, max(w, 160) // 160)
    rows = -(-len(class_names) // per_row)
    canvas = Image.new("RGB", (max(w, 160), h + rows * row_h + 4), (255, 255, 255))
    canvas.paste(Image.fromarray(picture), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, name in enumerate(class_names):
        row, col = divmod(k, per_row)
        x, y = 4 + col * 160, h + 4 + row * row_h
        fill = (255, 255, 255) if k in clear else tuple(int(c) for c in palette[k])
        draw.rectangle([x, y, x + swatch, y + swatch], fill=fill, outline=(0, 0, 0))
        draw.text(
            (x + swatch + 4, y),
            (f"{k} {name}" + (" (clear)" if k in clear else ""))[:26],
            fill=(0, 0, 0),
        )
    return np.asarray(canvas)


def heatmap_panels(
    thumbnail: np.ndarray,
    probabilities: np.ndarray,
    covered: np.ndarray,
    class_names: Sequence[str],
    max_side: int = 1024,
    opacity: float = 0.6,
) -> np.ndarray:
    """One panel per class side by side: its probability (viridis) over the thumbnail.

    Args:
        thumbnail: RGB uint8 ``H x W x 3``.
        probabilities: ``C x H x W`` in [0, 1].
        covered: ``H x W`` pixels with a prediction (others show the bare thumbnail).
        class_names: Panel titles.
        max_side: Longest side of each panel.
        opacity: Weight of the colour map.
    """
    from matplotlib import colormaps

    lut = (colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.float32)
    thumb = _fit(thumbnail, max_side, Image.Resampling.BOX)
    size = (thumb.shape[1], thumb.shape[0])
    mask = (
        np.asarray(
            Image.fromarray(covered.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
        )
        > 127
    )
    title_h, gap = 16, 6
    width = len(class_names) * (size[0] + gap) + gap
    canvas = Image.new("RGB", (width, size[1] + title_h + 2 * gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, name in enumerate(class_names):
        prob = np.asarray(
            Image.fromarray(probabilities[k].astype(np.float32)).resize(
                size, Image.Resampling.BILINEAR
            )
        )
        colour = lut[np.clip((prob * 255).round(), 0, 255).astype(np.int64)]
        panel = thumb.astype(np.float32)
        panel[mask] = (1 - opacity) * panel[mask] + opacity * colour[mask]
        x = gap + k * (size[0] + gap)
        canvas.paste(Image.fromarray(panel.round().astype(np.uint8)), (x, gap + title_h))
        draw.text((x, gap), f"P({name})"[:40], fill=(0, 0, 0))
    return np.asarray(canvas)


# -- the tile table ----------------------------------------------------------------------------------
def tile_table(
    slide_id: str,
    xs: np.ndarray,
    ys: np.ndarray,
    extent: int,
    tissue_fraction: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    magnification: float,
    patch_size: int,
) -> pa.Table:
    """One row per predicted tile: where it is (level-0 pixels) and what the model says.

    Columns: ``slide_id``, ``x``, ``y``, ``extent`` (level-0 side), ``magnification`` and
    ``patch_size`` (what the model saw), ``tissue_fraction``, ``label`` (highest mean
    probability), ``class_name`` and ``prob_<class>`` per class (for a segmentation model the
    tile's mean pixel probability inside the slide). The class names are in the schema's
    metadata (``class_names``).
    """
    probabilities = np.asarray(probabilities, np.float32).reshape(len(xs), len(class_names))
    labels = probabilities.argmax(1) if len(xs) else np.zeros(0, np.int64)
    names = np.asarray(class_names, dtype=object)
    columns = {
        "slide_id": pa.array([slide_id] * len(xs), pa.string()),
        "x": pa.array(np.asarray(xs, np.int64)),
        "y": pa.array(np.asarray(ys, np.int64)),
        "extent": pa.array(np.full(len(xs), extent, np.int64)),
        "magnification": pa.array(np.full(len(xs), magnification, np.float32)),
        "patch_size": pa.array(np.full(len(xs), patch_size, np.int32)),
        "tissue_fraction": pa.array(np.asarray(tissue_fraction, np.float32)),
        "label": pa.array(labels.astype(np.int16)),
        "class_name": pa.array(names[labels].tolist() if len(xs) else [], pa.string()),
    }
    for k, name in enumerate(class_names):
        columns[f"prob_{name}"] = pa.array(probabilities[:, k])
    table = pa.table(columns)
    return table.replace_schema_metadata({"class_names": "\n".join(class_names)})


def write_table(path: str | os.PathLike, table: pa.Table) -> Path:
    """Write a Parquet table."""
    pq.write_table(table, path)
    return Path(path)


# -- records of what was written ------------------------------------------------------------------
def file_record(path: str | os.PathLike) -> dict[str, int | str]:
    """A file's size and SHA-256: ``{"bytes": ..., "sha256": ...}``."""
    from histokd.resume import file_sha256

    return {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}


def damaged_output(
    folder: str | os.PathLike, records: object, required: Sequence[str] = ()
) -> str | None:
    """Why a slide folder's outputs cannot be trusted, or None when every recorded file is whole.

    Args:
        folder: The slide's output folder.
        records: ``summary.json``'s ``outputs``: file name -> `file_record`.
        required: Names that must be among the records.
    """
    if not isinstance(records, dict) or not records:
        return "summary.json records no output sizes and checksums"
    unrecorded = sorted(set(required) - set(records))
    if unrecorded:
        return f"summary.json records no size and checksum for {', '.join(unrecorded)}"
    for name, recorded in sorted(records.items()):
        path = Path(folder) / name
        if not isinstance(recorded, dict) or Path(name).name != name:
            return f"summary.json's record of {name!r} is not a size and checksum"
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != recorded.get("bytes"):
            return f"{name} has {size} bytes, summary.json records {recorded.get('bytes')}"
        if file_record(path)["sha256"] != recorded.get("sha256"):
            return f"{name}'s SHA-256 differs from the one summary.json records"
    return None
