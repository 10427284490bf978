"""Region annotations drawn on slides: QuPath GeoJSON, Aperio ImageScope XML and ASAP XML.

Every format is read into one representation, a list of :class:`Region`: a class name and a
polygon (an exterior ring and its holes) in level-0 pixels of the slide, origin at its top-left
corner, as all three tools store them. Class names are normalised (:func:`normalise_class_name`:
``" Tumor "`` and ``"tumor"`` are one class, and a name is a safe folder name).

* QuPath GeoJSON (``.geojson``, ``.json``; File > Export objects): a ``FeatureCollection``, a
  list of features or one feature; ``Polygon``, ``MultiPolygon`` (holes as interior rings) and
  ``GeometryCollection`` geometries; the class is ``properties.classification.name``. Only
  annotations are regions: features whose ``properties.objectType`` (QuPath 0.3+; the feature
  ``id`` ``PathAnnotationObject`` in 0.2) is ``detection``, ``cell``, ``tile``... are skipped.
* Aperio ImageScope XML (``.xml``, root ``<Annotations>``):
  ``Annotation/Regions/Region/Vertices/Vertex@X,@Y``; the class is the annotation's ``Name``,
  else the region's ``Text``; a region with ``NegativeROA="1"`` is a hole of the positive
  regions of its annotation that contain it; ellipses (``Type="2"``, two corner vertices) become
  polygons; rulers and arrows (``Type`` 3, 4) are skipped.
* ASAP XML (``.xml``, root ``<ASAP_Annotations>``):
  ``Annotations/Annotation[@PartOfGroup]/Coordinates/Coordinate@X,@Y,@Order``; the class is
  ``PartOfGroup``; dots and point sets are skipped.

Regions without a class are skipped and counted (:attr:`AnnotationFile.unclassified`).
"""

from __future__ import annotations

import json
import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "ANNOTATION_EXTENSIONS",
    "AnnotationError",
    "AnnotationFile",
    "Region",
    "normalise_class_name",
    "rasterise_regions",
    "read_annotations",
    "read_aperio_xml",
    "read_asap_xml",
    "read_qupath_geojson",
]

ANNOTATION_EXTENSIONS = (".geojson", ".json", ".xml")
_FORMATS = (
    "QuPath GeoJSON (.geojson/.json), Aperio ImageScope XML (<Annotations>) or ASAP XML "
    "(<ASAP_Annotations>)"
)
# QuPath 0.2 wrote the object type as the feature's id.
_QUPATH_02_TYPES = {
    "PathAnnotationObject": "annotation",
    "PathDetectionObject": "detection",
    "PathCellObject": "cell",
    "PathTileObject": "tile",
}
_ELLIPSE_VERTICES = 64


class AnnotationError(ValueError):
    """An annotation file that cannot be read, with the file and the reason in the message."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class Region:
    """One annotated polygon in level-0 pixels.

    Attributes:
        label: Normalised class name.
        exterior: ``N x 2`` float ``(x, y)`` of the outer ring (not repeating its first point).
        holes: Inner rings, each ``M x 2``.
        colour: The tool's ``(r, g, b)`` colour of the class, when the file gives one.
    """

    label: str
    exterior: np.ndarray
    holes: tuple[np.ndarray, ...] = ()
    colour: tuple[int, int, int] | None = None

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` of the exterior."""
        (x0, y0), (x1, y1) = self.exterior.min(0), self.exterior.max(0)
        return float(x0), float(y0), float(x1), float(y1)


@dataclass
class AnnotationFile:
    """The regions of one annotation file.

    Attributes:
        path: The file.
        format: ``qupath-geojson``, ``aperio-xml`` or ``asap-xml``.
        regions: Its classified regions, in file order (later ones are drawn over earlier ones).
        unclassified: Regions skipped for having no class.
        skipped: Objects skipped for not being areas (detections, points, lines).
    """

    path: str
    format: str
    regions: list[Region] = field(default_factory=list)
    unclassified: int = 0
    skipped: int = 0

    @property
    def class_names(self) -> list[str]:
        """The classes of the regions, sorted."""
        return sorted({r.label for r in self.regions})


def normalise_class_name(name: object) -> str | None:
    """A class name as a folder name: trimmed, lower case, runs of other characters than
    letters, digits, ``.``, ``_`` and ``-`` as one ``_``; None for an empty or absent name."""
    if name is None:
        return None
    text = re.sub(r"[^a-z0-9._-]+", "_", str(name).strip().lower()).strip("_.")
    return text or None


def _ring(points: Sequence, path: str | os.PathLike, where: str) -> np.ndarray | None:
    """``N x 2`` floats without the closing repeat; None when fewer than 3 distinct points."""
    try:
        ring = np.asarray([[float(p[0]), float(p[1])] for p in points], np.float64)
    except (TypeError, ValueError, IndexError) as exc:
        raise AnnotationError(
            path, f"{where}: coordinates are not [x, y] numbers ({exc})"
        ) from None
    if not np.isfinite(ring).all():
        raise AnnotationError(path, f"{where}: coordinates are not finite numbers")
    if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    return ring if len(np.unique(ring, axis=0)) >= 3 else None


def _parse_colour(value: object) -> tuple[int, int, int] | None:
    """``[r, g, b]``, a packed int (QuPath 0.2's ``colorRGB``, Aperio's BGR ``LineColor`` is
    not a class colour and is not read), or ``#rrggbb``."""
    if isinstance(value, (list, tuple)) and len(value) >= 3:
        try:
            return tuple(int(c) & 255 for c in value[:3])  # type: ignore[return-value]
        except (TypeError, ValueError):
            return None
    if isinstance(value, int) and not isinstance(value, bool):
        return ((value >> 16) & 255, (value >> 8) & 255, value & 255)
    if isinstance(value, str) and re.fullmatch(r"#[0-9a-fA-F]{6}", value):
        return tuple(int(value[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
    return None


# -- QuPath GeoJSON ----------------------------------------------------------------------------
def _geometry_polygons(geometry: dict, path, where: str) -> tuple[list[list[Sequence]], int]:
    """The polygons (lists of rings) of a GeoJSON geometry, and how many parts are not areas."""
    kind = geometry.get("type") if isinstance(geometry, dict) else None
    if kind == "Polygon":
        return [geometry.get("coordinates") or []], 0
    if kind == "MultiPolygon":
        return list(geometry.get("coordinates") or []), 0
    if kind == "GeometryCollection":
        polygons, skipped = [], 0
        for part in geometry.get("geometries") or []:
            more, n = _geometry_polygons(part, path, where)
            polygons += more
            skipped += n
        return polygons, skipped
    if kind in ("Point", "MultiPoint", "LineString", "MultiLineString"):
        return [], 1
    raise AnnotationError(
        path, f"{where}: geometry type {kind!r}; allowed: Polygon, MultiPolygon, GeometryCollection"
    )


def read_qupath_geojson(
    path: str | os.PathLike, object_types: Sequence[str] = ("annotation",)
) -> AnnotationFile:
    """The annotations of a QuPath GeoJSON export (see the module docstring).

    Args:
        path: The file.
        object_types: QuPath object types read as regions (a feature without one is read);
            ``("detection",)`` reads nuclei detections (`histokd.inference.geojson.nuclei_features`).

    Raises:
        AnnotationError: Not JSON, not GeoJSON features, or a malformed geometry.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnnotationError(path, f"cannot read it as JSON: {exc}") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    else:
        features = data
    if not isinstance(features, list) or not all(
        isinstance(f, dict) and f.get("type") == "Feature" for f in features
    ):
        raise AnnotationError(
            path, f"not GeoJSON features: expected a FeatureCollection, a Feature or a list of them; allowed formats: {_FORMATS}"
        )  # fmt: skip
    out = AnnotationFile(str(path), "qupath-geojson")
    for i, feature in enumerate(features):
        where = f"feature {i}"
        properties = feature.get("properties") or {}
        object_type = properties.get("objectType") or _QUPATH_02_TYPES.get(str(feature.get("id")))
        if object_type is not None and object_type not in object_types:
            out.skipped += 1
            continue
        classification = properties.get("classification")
        if isinstance(classification, dict):
            name = classification.get("name")
            colour = _parse_colour(classification.get("color", classification.get("colorRGB")))
        else:
            name, colour = classification, None
        polygons, skipped = _geometry_polygons(feature.get("geometry"), path, where)
        out.skipped += skipped
        label = normalise_class_name(name)
        for polygon in polygons:
            rings = [_ring(r, path, where) for r in polygon] if polygon else []
            if not rings or rings[0] is None:
                continue  # an empty or degenerate exterior
            if label is None:
                out.unclassified += 1
                continue
            holes = tuple(r for r in rings[1:] if r is not None)
            out.regions.append(Region(label, rings[0], holes, colour))
    return out


# -- Aperio ImageScope XML ---------------------------------------------------------------------
def _ellipse(ring: np.ndarray) -> np.ndarray:
    (x0, y0), (x1, y1) = ring.min(0), ring.max(0)
    t = np.linspace(0, 2 * math.pi, _ELLIPSE_VERTICES, endpoint=False)
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def _inside(point: np.ndarray, ring: np.ndarray) -> bool:
    from skimage.measure import points_in_poly

    return bool(points_in_poly(point[None], ring)[0])


def _xml_root(path: str | os.PathLike) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise AnnotationError(path, f"cannot read it as XML: {exc}") from None


def read_aperio_xml(path: str | os.PathLike) -> AnnotationFile:
    """The annotations of an Aperio ImageScope XML file (see the module docstring).

    Raises:
        AnnotationError: Not XML, not ImageScope's layout, or a vertex that is not a number.
    """
    root = _xml_root(path)
    if root.tag != "Annotations":
        raise AnnotationError(path, f"root element <{root.tag}>, not Aperio's <Annotations>")
    out = AnnotationFile(str(path), "aperio-xml")
    for a, annotation in enumerate(root.findall("Annotation")):
        positive: list[tuple[str | None, np.ndarray]] = []
        negative: list[np.ndarray] = []
        for r, region in enumerate(annotation.iter("Region")):
            where = f"annotation {a + 1}, region {r + 1}"
            vertices = [(v.get("X"), v.get("Y")) for v in region.iter("Vertex")]
            kind = region.get("Type", "0")
            if kind in ("3", "4"):  # arrow, ruler: lines
                out.skipped += 1
                continue
            if kind == "2" and len(vertices) >= 2:
                box = _ring(vertices[:2] + [(vertices[0][0], vertices[1][1])], path, where)
                ring = _ellipse(box) if box is not None else None
            else:
                ring = _ring(vertices, path, where)
            if ring is None:
                continue
            if region.get("NegativeROA", "0") == "1":
                negative.append(ring)
            else:
                label = normalise_class_name(annotation.get("Name")) or normalise_class_name(
                    region.get("Text")
                )
                positive.append((label, ring))
        for label, ring in positive:
            if label is None:
                out.unclassified += 1
                continue
            holes = tuple(h for h in negative if _inside(h[0], ring))
            out.regions.append(Region(label, ring, holes))
    return out


# -- ASAP XML ----------------------------------------------------------------------------------
def read_asap_xml(path: str | os.PathLike) -> AnnotationFile:
    """The annotations of an ASAP XML file (see the module docstring).

    Raises:
        AnnotationError: Not XML, not ASAP's layout, or a coordinate that is not a number.
    """
    root = _xml_root(path)
    if root.tag != "ASAP_Annotations":
        raise AnnotationError(path, f"root element <{root.tag}>, not ASAP's <ASAP_Annotations>")
    colours = {
        normalise_class_name(g.get("Name")): _parse_colour(g.get("Color"))
        for g in root.iter("Group")
    }
    out = AnnotationFile(str(path), "asap-xml")
    for a, annotation in enumerate(root.iter("Annotation")):
        where = f"annotation {a + 1} ({annotation.get('Name', '')})"
        if annotation.get("Type") in ("Dot", "PointSet"):
            out.skipped += 1
            continue
        points = []
        for c in annotation.iter("Coordinate"):
            try:
                points.append((float(c.get("Order", len(points))), c.get("X"), c.get("Y")))
            except ValueError:
                raise AnnotationError(
                    path, f"{where}: Order={c.get('Order')!r} is not a number"
                ) from None
        points.sort(key=lambda p: p[0])
        ring = _ring([p[1:] for p in points], path, where)
        if ring is None:
            continue
        group = annotation.get("PartOfGroup")
        label = None if group in (None, "None") else normalise_class_name(group)
        if label is None:
            out.unclassified += 1
            continue
        out.regions.append(Region(label, ring, (), colours.get(label)))
    return out


def read_annotations(path: str | os.PathLike) -> AnnotationFile:
    """The regions of an annotation file in any of the three formats, told apart by extension
    and, for XML, by the root element.

    Raises:
        AnnotationError: A file in no known format (naming the formats read), or a malformed one.
    """
    suffix = Path(path).suffix.lower()
    if suffix in (".geojson", ".json"):
        return read_qupath_geojson(path)
    if suffix == ".xml":
        tag = _xml_root(path).tag
        if tag == "Annotations":
            return read_aperio_xml(path)
        if tag == "ASAP_Annotations":
            return read_asap_xml(path)
        raise AnnotationError(
            path, f"XML with root element <{tag}> is in no known format; allowed: {_FORMATS}"
        )
    raise AnnotationError(
        path, f"extension {suffix or '(none)'!r} is in no known format; allowed: {_FORMATS}"
    )


def rasterise_regions(
    regions: Iterable[Region],
    class_index: dict[str, int],
    origin: tuple[float, float],
    downsample: tuple[float, float],
    size: tuple[int, int],
) -> np.ndarray:
    """The class index of every pixel of a patch, 0 where no region lies.

    A patch pixel ``(row, col)`` covers level-0 ``[x0 + col * dx, x0 + (col + 1) * dx)`` (and
    likewise in y) and takes the class of the last region (in file order) containing its centre,
    less the region's holes.

    Args:
        regions: The regions (those outside the patch cost only a bounds test).
        class_index: Value drawn for each class name.
        origin: Level-0 ``(x0, y0)`` of the patch's top-left corner.
        downsample: Level-0 pixels per patch pixel along x and y.
        size: Patch ``(width, height)`` in pixels.

    Returns:
        ``height x width`` uint8 (uint16 past 255 classes).
    """
    from skimage.draw import polygon as fill

    (x0, y0), (dx, dy), (width, height) = origin, downsample, size
    x1, y1 = x0 + width * dx, y0 + height * dy
    dtype = np.uint8 if max(class_index.values(), default=0) < 256 else np.uint16
    labels = np.zeros((height, width), dtype)

    def mask(ring: np.ndarray) -> np.ndarray:
        out = np.zeros((height, width), bool)
        # pixel centres at col + 0.5: shift by half a pixel so fill() tests centres
        rows, cols = fill(
            (ring[:, 1] - y0) / dy - 0.5, (ring[:, 0] - x0) / dx - 0.5, (height, width)
        )
        out[rows, cols] = True
        return out

    for region in regions:
        bx0, by0, bx1, by1 = region.bounds
        if bx1 <= x0 or by1 <= y0 or bx0 >= x1 or by0 >= y1:
            continue
        inside = mask(region.exterior)
        for hole in region.holes:
            inside &= ~mask(hole)
        labels[inside] = class_index[region.label]
    return labels
