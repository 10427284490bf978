"""A slide's predictions as a GeoJSON FeatureCollection that QuPath imports (File > Import objects).

Coordinates are level-0 pixels of the slide, origin at the top-left corner, as QuPath's own
GeoJSON export writes them. Each feature follows QuPath's conventions (0.4 and later):
``properties.objectType`` (``"tile"`` or ``"annotation"``), ``properties.classification``
(``{"name", "color": [r, g, b]}``) and ``properties.measurements`` (name -> number).

* Tiles (classification models): one ``Polygon`` per predicted tile, its level-0 box as in
  ``predictions.parquet``, classified by its highest probability, with ``prob_<class>`` for
  every class as measurements.
* Nuclei (`nuclei_features`, for inspecting a teacher): one QuPath ``detection`` per nucleus of
  an instance-label image, classified ``Nucleus``, with its area and the teacher's probability
  over it as measurements.
* Regions (every model): per class, the outline of the label mask's connected regions at the
  output resolution, scaled to level 0, holes as interior rings, simplified to about one
  output pixel (`label_polygons`). Classes named ``background`` are left out, as the overlays
  leave them unpainted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histokd.inference.outputs import _transparent_classes, class_palette

__all__ = [
    "feature_collection",
    "label_polygons",
    "mask_polygons",
    "nuclei_features",
    "region_features",
    "tile_features",
    "write_geojson",
]

Ring = list[list[float]]
Polygon = list[Ring]  # the exterior ring, then the holes


def _classification(name: str, colour: np.ndarray) -> dict[str, Any]:
    return {"name": name, "color": [int(c) for c in colour]}


def tile_features(
    xs: np.ndarray,
    ys: np.ndarray,
    extent: int,
    probabilities: np.ndarray,
    class_names: Sequence[str],
) -> list[dict[str, Any]]:
    """One QuPath tile per row: its level-0 box, its class and its probabilities.

    Args:
        xs: Level-0 left edge of each tile.
        ys: Level-0 top edge of each tile.
        extent: Level-0 side of a tile.
        probabilities: ``N x C`` class probabilities of the tiles.
        class_names: Name of each class.
    """
    palette = class_palette(len(class_names))
    probabilities = np.asarray(probabilities, np.float64).reshape(len(xs), len(class_names))
    features = []
    for x, y, probs in zip(
        np.asarray(xs).tolist(), np.asarray(ys).tolist(), probabilities, strict=True
    ):
        x1, y1 = x + extent, y + extent
        k = int(probs.argmax())
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]]},
            "properties": {
                "objectType": "tile",
                "classification": _classification(class_names[k], palette[k]),
                "measurements": {f"prob_{n}": round(float(p), 6) for n, p in zip(class_names, probs, strict=True)},
            },
        })  # fmt: skip
    return features


def _ring_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def mask_polygons(mask: np.ndarray, tolerance: float = 1.0) -> list[Polygon]:
    """The outlines of a binary mask's 4-connected regions, with their holes, in pixel-edge units.

    A pixel ``(row, col)`` covers ``[col, col + 1] x [row, row + 1]``; the outlines run along
    pixel edges (corners cut by half a pixel, as marching squares does), so filling each polygon
    at pixel centres (``skimage.draw.polygon`` at ``coordinate - 0.5``) gives the mask back.

    Args:
        mask: ``H x W`` booleans.
        tolerance: Largest distance, in pixels, of a dropped vertex from the simplified ring
            (``skimage.measure.approximate_polygon``); 0 keeps every vertex.

    Returns:
        Per region, its exterior ring and then its holes, each ring ``[[x, y], ...]`` closed
        (first point repeated last).
    """
    from skimage.measure import approximate_polygon, find_contours, label, regionprops

    polygons: list[Polygon] = []
    # connectivity 1 matches find_contours' default (fully_connected="low"): regions touching
    # only at a corner are separate outlines
    for region in regionprops(label(np.asarray(mask, bool), connectivity=1)):
        top, left = region.bbox[:2]
        padded = np.pad(region.image, 1).astype(np.float32)
        rings = []
        for contour in find_contours(padded, 0.5):
            if tolerance > 0:
                contour = approximate_polygon(contour, tolerance)
            if len(contour) < 4 or not np.array_equal(contour[0], contour[-1]):
                continue  # collapsed by simplification (or open, which padding rules out)
            # (row, col) of the padded crop's pixel centres -> (x, y) of pixel edges
            xy = contour[:, ::-1] + (left - 0.5, top - 0.5)
            rings.append((_ring_area(xy), xy))
        if not rings:
            continue
        rings.sort(key=lambda r: -r[0])  # a region has one exterior, larger than any hole
        polygons.append([xy.tolist() for _, xy in rings])
    return polygons


def label_polygons(
    labels: np.ndarray, num_classes: int, tolerance: float = 1.0
) -> dict[int, list[Polygon]]:
    """`mask_polygons` of each class of a label mask (values not below ``num_classes`` ignored)."""
    return {k: mask_polygons(labels == k, tolerance) for k in range(num_classes)}


def region_features(
    labels: np.ndarray, class_names: Sequence[str], downsample: float, tolerance: float = 1.0
) -> list[dict[str, Any]]:
    """One QuPath annotation per class with any region: a ``MultiPolygon`` in level-0 pixels.

    Args:
        labels: ``H x W`` class indices at the output resolution.
        class_names: Name of each class.
        downsample: Level-0 pixels per output pixel.
        tolerance: Simplification tolerance in output pixels.
    """
    palette = class_palette(len(class_names))
    skip = set(_transparent_classes(class_names))
    features = []
    for k, name in enumerate(class_names):
        if k in skip:
            continue
        polygons = mask_polygons(labels == k, tolerance)
        if not polygons:
            continue
        scaled = [
            [[[round(x * downsample, 2), round(y * downsample, 2)] for x, y in ring] for ring in polygon]
            for polygon in polygons
        ]  # fmt: skip
        features.append({
            "type": "Feature",
            "geometry": {"type": "MultiPolygon", "coordinates": scaled},
            "properties": {
                "objectType": "annotation",
                "name": name,
                "classification": _classification(name, palette[k]),
            },
        })  # fmt: skip
    return features


NUCLEUS_COLOUR = (30, 90, 255)  # blue, as the pretraining overlays draw pseudo labels


def nuclei_features(
    labels: np.ndarray,
    origin: tuple[float, float] = (0.0, 0.0),
    downsample: float | tuple[float, float] = 1.0,
    probability: np.ndarray | None = None,
    class_name: str = "Nucleus",
    tolerance: float = 0.5,
) -> list[dict[str, Any]]:
    """One QuPath detection per nucleus of an instance-label image, in level-0 pixels.

    The labels are StarDist's nuclei instances, or the connected components of a thresholded
    probability map (``skimage.measure.label(probability >= alpha)``). Image pixel ``(row, col)``
    covers level-0 ``[x0 + col * dx, x0 + (col + 1) * dx)`` and likewise in y.

    Args:
        labels: ``H x W`` integers, 0 background, one value per nucleus.
        origin: Level-0 ``(x0, y0)`` of the image's top-left corner.
        downsample: Level-0 pixels per image pixel (one number, or along x and y).
        probability: ``H x W`` teacher probability; its mean and max over each nucleus become
            measurements.
        class_name: The detections' class.
        tolerance: Outline simplification in image pixels (`mask_polygons`).

    Returns:
        Per nucleus a ``Polygon`` (a ``MultiPolygon`` when its pixels touch only at corners) with
        measurements ``area_px`` (level-0 pixels), and ``probability_mean``/``probability_max``.
    """
    from skimage.measure import regionprops

    dx, dy = (downsample, downsample) if np.isscalar(downsample) else downsample
    x0, y0 = origin
    features = []
    for region in regionprops(np.asarray(labels).astype(np.int64, copy=False)):
        top, left = region.bbox[:2]
        polygons = [
            [[[round(x0 + (x + left) * dx, 2), round(y0 + (y + top) * dy, 2)] for x, y in ring] for ring in polygon]
            for polygon in mask_polygons(region.image, tolerance)
        ]  # fmt: skip
        if not polygons:
            continue
        geometry = (
            {"type": "Polygon", "coordinates": polygons[0]} if len(polygons) == 1
            else {"type": "MultiPolygon", "coordinates": polygons}
        )  # fmt: skip
        measurements = {"area_px": round(float(region.area) * dx * dy, 2)}
        if probability is not None:
            inside = np.asarray(probability)[region.slice][region.image]
            measurements["probability_mean"] = round(float(inside.mean()), 4)
            measurements["probability_max"] = round(float(inside.max()), 4)
        features.append({
            "type": "Feature",
            "geometry": geometry,
            "properties": {
                "objectType": "detection",
                "classification": {"name": class_name, "color": list(NUCLEUS_COLOUR)},
                "measurements": measurements,
            },
        })  # fmt: skip
    return features


def feature_collection(features: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A GeoJSON ``FeatureCollection`` of the features."""
    return {"type": "FeatureCollection", "features": list(features)}


def write_geojson(path: str | os.PathLike, features: Sequence[dict[str, Any]]) -> Path:
    """Write the features as a compact GeoJSON FeatureCollection."""
    path = Path(path)
    path.write_text(json.dumps(feature_collection(features), separators=(",", ":")))
    return path
