"""histokd.annotations: QuPath GeoJSON, Aperio XML and ASAP XML read into one region list."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histokd.annotations import (
    AnnotationError,
    Region,
    normalise_class_name,
    rasterise_regions,
    read_annotations,
)


def _square(x0, y0, x1, y1, close=True):
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
    return ring + [ring[0]] if close else ring


QUPATH = {
    "type": "FeatureCollection",
    "features": [
        {"type": "Feature", "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}},
         "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [100, 0], [120, 50], [100, 100], [0, 100], [0, 0]],
                                                          _square(20, 20, 40, 40)]}},
        {"type": "Feature", "properties": {"objectType": "annotation", "classification": {"name": " Stroma  Region"}},
         "geometry": {"type": "MultiPolygon", "coordinates": [[_square(200, 0, 300, 100)], [_square(400, 0, 410, 10)]]}},
        {"type": "Feature", "properties": {"objectType": "detection", "classification": {"name": "Nucleus"}},
         "geometry": {"type": "Polygon", "coordinates": [_square(1, 1, 5, 5)]}},
        {"type": "Feature", "properties": {"objectType": "annotation"},
         "geometry": {"type": "Polygon", "coordinates": [_square(500, 500, 600, 600)]}},
        {"type": "Feature", "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
         "geometry": {"type": "Point", "coordinates": [7, 7]}},
    ],
}  # fmt: skip

APERIO = """<?xml version="1.0" encoding="UTF-8"?>
<Annotations MicronsPerPixel="0.252000">
 <Annotation Id="1" Name="Tumor" LineColor="65280">
  <Regions>
   <RegionAttributeHeaders/>
   <Region Id="1" Type="0" NegativeROA="0" Text="">
    <Vertices><Vertex X="0" Y="0" Z="0"/><Vertex X="100" Y="0" Z="0"/><Vertex X="100" Y="100" Z="0"/><Vertex X="0" Y="100" Z="0"/></Vertices>
   </Region>
   <Region Id="2" Type="0" NegativeROA="1" Text="">
    <Vertices><Vertex X="20" Y="20"/><Vertex X="40" Y="20"/><Vertex X="40" Y="40"/><Vertex X="20" Y="40"/></Vertices>
   </Region>
   <Region Id="3" Type="1" NegativeROA="0" Text="">
    <Vertices><Vertex X="300" Y="300"/><Vertex X="350" Y="300"/><Vertex X="350" Y="350"/><Vertex X="300" Y="350"/></Vertices>
   </Region>
   <Region Id="4" Type="4" NegativeROA="0" Text="ruler">
    <Vertices><Vertex X="0" Y="0"/><Vertex X="500" Y="0"/></Vertices>
   </Region>
  </Regions>
 </Annotation>
 <Annotation Id="2" Name="">
  <Regions>
   <Region Id="1" Type="0" Text="Necrosis"><Vertices><Vertex X="600" Y="0"/><Vertex X="700" Y="0"/><Vertex X="650" Y="80"/></Vertices></Region>
   <Region Id="2" Type="0" Text=""><Vertices><Vertex X="800" Y="0"/><Vertex X="900" Y="0"/><Vertex X="850" Y="80"/></Vertices></Region>
  </Regions>
 </Annotation>
 <Annotation Id="3" Name="Fat">
  <Regions>
   <Region Id="1" Type="2" Text=""><Vertices><Vertex X="1000" Y="0"/><Vertex X="1100" Y="50"/></Vertices></Region>
  </Regions>
 </Annotation>
</Annotations>
"""

ASAP = """<?xml version="1.0"?>
<ASAP_Annotations>
 <Annotations>
  <Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="Tumor" Color="#F4FA58">
   <Coordinates>
    <Coordinate Order="2" X="100" Y="100"/><Coordinate Order="0" X="0" Y="0"/>
    <Coordinate Order="3" X="0" Y="100"/><Coordinate Order="1" X="100.5" Y="0"/>
   </Coordinates>
  </Annotation>
  <Annotation Name="Annotation 1" Type="Polygon" PartOfGroup="None" Color="#F4FA58">
   <Coordinates><Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="9" Y="0"/><Coordinate Order="2" X="9" Y="9"/></Coordinates>
  </Annotation>
  <Annotation Name="Annotation 2" Type="Dot" PartOfGroup="Tumor" Color="#F4FA58">
   <Coordinates><Coordinate Order="0" X="5" Y="5"/></Coordinates>
  </Annotation>
 </Annotations>
 <AnnotationGroups>
  <Group Name="Tumor" PartOfGroup="None" Color="#ff0000"><Attributes/></Group>
 </AnnotationGroups>
</ASAP_Annotations>
"""


def test_qupath_geojson_polygons_holes_multipolygons_and_object_types(tmp_path):
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps(QUPATH))
    read = read_annotations(path)
    assert read.format == "qupath-geojson"
    assert [(r.label, len(r.exterior), len(r.holes)) for r in read.regions] == [
        ("tumor", 5, 1), ("stroma_region", 4, 0), ("stroma_region", 4, 0)
    ]  # fmt: skip
    assert read.regions[0].colour == (200, 0, 0) and read.regions[1].colour is None
    assert read.regions[0].holes[0].tolist() == [[20, 20], [40, 20], [40, 40], [20, 40]]
    assert (read.unclassified, read.skipped) == (1, 2)  # no class; a detection and a point
    # a bare list of features, and QuPath 0.2's object type in the feature id
    features = QUPATH["features"][:1] + [{**QUPATH["features"][2], "properties": {"classification": {"name": "N"}},
                                          "id": "PathDetectionObject"}]  # fmt: skip
    path.write_text(json.dumps(features))
    assert [r.label for r in read_annotations(path).regions] == ["tumor"]
    from histokd.annotations import read_qupath_geojson

    assert [r.label for r in read_qupath_geojson(path, object_types=("detection",)).regions] == [
        "n"
    ]


def test_aperio_xml_names_texts_negative_regions_and_ellipses(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(APERIO)
    read = read_annotations(path)
    assert read.format == "aperio-xml"
    assert [(r.label, len(r.exterior), len(r.holes)) for r in read.regions] == [
        ("tumor", 4, 1), ("tumor", 4, 0), ("necrosis", 3, 0), ("fat", 64, 0)
    ]  # fmt: skip
    assert read.regions[0].holes[0].min(0).tolist() == [20, 20]  # the negative region: a hole
    assert read.regions[3].bounds == pytest.approx((1000, 0, 1100, 50))
    assert (read.unclassified, read.skipped) == (1, 1)  # no name nor text; the ruler


def test_asap_xml_groups_order_and_dots(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(ASAP)
    read = read_annotations(path)
    assert read.format == "asap-xml"
    assert [(r.label, len(r.exterior)) for r in read.regions] == [("tumor", 4)]
    assert read.regions[0].exterior.tolist() == [
        [0, 0],
        [100.5, 0],
        [100, 100],
        [0, 100],
    ]  # by Order
    assert read.regions[0].colour == (255, 0, 0)
    assert (read.unclassified, read.skipped) == (1, 1)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [("a.xml", "<Slide><Annotation/></Slide>", r"a\.xml: XML with root element <Slide> is in no known format; allowed: QuPath GeoJSON"),
     ("a.txt", "x", r"a\.txt: extension '\.txt' is in no known format"),
     ("a.xml", "<Annotations><Annotation", r"a\.xml: cannot read it as XML"),
     ("a.json", '{"type": "Polygon"}', r"a\.json: not GeoJSON features"),
     ("a.geojson", json.dumps([{"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [[[0, "x"], [1, 1], [2, 0]]]}}]),
      r"a\.geojson: feature 0: coordinates are not \[x, y\] numbers")],
)  # fmt: skip
def test_a_file_in_no_known_format_is_one_clear_error(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(AnnotationError, match=message):
        read_annotations(tmp_path / name)


def test_class_names_are_normalised():
    assert [normalise_class_name(n) for n in (" Tumor ", "tumor", "Tumour/Grade 2", "", None, "..")] == [
        "tumor", "tumor", "tumour_grade_2", None, None, None
    ]  # fmt: skip


def test_rasterise_takes_pixel_centres_at_the_patch_scale_less_holes():
    square = Region(
        "a",
        np.array(_square(0, 0, 10, 10, close=False), float),
        (np.array(_square(4, 4, 6, 6, close=False), float),),
    )
    later = Region("b", np.array(_square(8, 8, 20, 20, close=False), float))
    # downsample 2: pixel centres at level-0 1, 3, 5, ...; the hole [4, 6] holds centre 5
    labels = rasterise_regions([square, later], {"a": 1, "b": 2}, (0, 0), (2.0, 2.0), (8, 8))
    assert np.bincount(labels.ravel(), minlength=3).tolist() == [
        64 - 23 - 16,
        25 - 1 - 1,
        16,
    ]  # a: 25 less the hole and b
    assert labels[2, 2] == 0 and labels[4, 4] == 2 and labels[0, 4] == 1  # hole, drawn over, inside
    shifted = rasterise_regions([square], {"a": 1}, (6, 0), (2.0, 2.0), (8, 8))
    assert shifted[:5, :2].all() and not shifted[:, 2:].any()  # level-0 centres 7 and 9
