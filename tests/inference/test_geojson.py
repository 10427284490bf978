"""GeoJSON for QuPath: region outlines that fill back to the mask, tiles on their level-0 boxes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histokd.inference.geojson import (
    label_polygons,
    mask_polygons,
    nuclei_features,
    region_features,
    tile_features,
    write_geojson,
)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _square_and_ring(shape: tuple[int, int] = (60, 80)) -> np.ndarray:
    """Labels: 0 around, 1 a 20 x 20 square, 2 a ring (radii 9-18) around a hole of class 0."""
    labels = np.zeros(shape, np.uint8)
    labels[5:25, 10:30] = 1
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r = np.hypot(yy - 35, xx - 55)
    labels[(r < 18) & (r >= 9)] = 2
    return labels


def test_square_and_ring_outline_and_fill_back(rasterise):
    labels = _square_and_ring()
    polygons = label_polygons(labels, 3)
    # the square: one region, no hole, its exterior on the pixel edges 10..30 x 5..25
    (square,) = polygons[1]
    assert len(square) == 1
    xy = np.asarray(square[0])
    assert square[0][0] == square[0][-1]
    assert (xy[:, 0].min(), xy[:, 0].max(), xy[:, 1].min(), xy[:, 1].max()) == (10, 30, 5, 25)
    assert len(xy) <= 9  # simplified: a square needs no more than its (cut) corners
    # the ring: one region, one hole; the hole is a region of class 0 of its own
    (ring,) = polygons[2]
    assert len(ring) == 2
    assert len(polygons[0]) == 2  # the outside (with two holes) and the ring's inside
    assert sorted(len(p) for p in polygons[0]) == [1, 3]
    for k in range(3):
        assert _iou(rasterise(polygons[k], labels.shape), labels == k) >= 0.9, k
    # squares touching at a corner: two regions, neither a hole of the other
    corner = np.zeros((30, 30), bool)
    corner[2:12, 2:12] = corner[12:20, 12:20] = True
    touching = mask_polygons(corner)
    assert sorted(len(p) for p in touching) == [1, 1]
    assert _iou(rasterise(touching, corner.shape), corner) >= 0.9
    # without simplification the outline is exact up to the half-pixel cut corners
    exact = mask_polygons(labels == 2, tolerance=0)
    assert (rasterise(exact, labels.shape) ^ (labels == 2)).sum() <= 8


def test_regions_in_level0_pixels_skip_background_and_fill_back(rasterise):
    labels = _square_and_ring()
    labels[40:44, 0:4] = 255  # no prediction: in no class
    features = region_features(labels, ["background", "tumor", "stroma"], downsample=4.0)
    assert [f["properties"]["classification"]["name"] for f in features] == ["tumor", "stroma"]
    for k, feature in zip((1, 2), features, strict=True):
        props = feature["properties"]
        assert props["objectType"] == "annotation" and feature["geometry"]["type"] == "MultiPolygon"
        assert len(props["classification"]["color"]) == 3
        back = rasterise(feature["geometry"]["coordinates"], labels.shape, scale=4.0)
        assert _iou(back, labels == k) >= 0.9
    xs = [x for polygon in features[0]["geometry"]["coordinates"] for x, _ in polygon[0]]
    assert (min(xs), max(xs)) == (40, 120)  # pixel edges 10 and 30 at 4 level-0 px each


def test_tiles_are_their_level0_boxes_with_probabilities(tmp_path):
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], np.float32)
    features = tile_features(np.array([0, 96]), np.array([192, 288]), 128, probs, ["a", "b", "c"])
    path = write_geojson(tmp_path / "p.geojson", features)
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 2
    second = collection["features"][1]
    assert second["geometry"] == {
        "type": "Polygon",
        "coordinates": [[[96, 288], [224, 288], [224, 416], [96, 416], [96, 288]]],
    }
    props = second["properties"]
    assert props["objectType"] == "tile"
    assert props["classification"]["name"] == "c"
    assert props["measurements"] == pytest.approx({"prob_a": 0.1, "prob_b": 0.3, "prob_c": 0.6})


def test_teacher_nuclei_become_qupath_detections_at_level0(tmp_path):
    """Instance labels at 2 level-0 px per pixel, 100 px right and 40 px down of the slide's corner:
    written, read back as QuPath detections and rasterised at the labels' scale, each nucleus
    matches its own pixels."""
    from skimage.draw import disk, ellipse

    from histokd.annotations import rasterise_regions, read_qupath_geojson

    labels = np.zeros((64, 96), np.int32)
    labels[disk((15, 20), 6)] = 1
    labels[ellipse(40, 60, 5, 9, rotation=0.6)] = 2
    labels[disk((48, 15), 4)] = 7
    labels[5:8, 80:90] = 9  # an elongated one
    probability = np.where(labels > 0, 0.8, 0.1).astype(np.float32)
    probability[labels == 7] = 0.5
    features = nuclei_features(labels, origin=(100, 40), downsample=2.0, probability=probability)
    path = write_geojson(tmp_path / "nuclei.geojson", features)
    read = read_qupath_geojson(path, object_types=("detection",))
    assert [r.label for r in read.regions] == ["nucleus"] * 4 and read.skipped == 0
    assert json.loads(path.read_text())["features"][0]["properties"]["objectType"] == "detection"
    for k, region, feature in zip((1, 2, 7, 9), read.regions, features, strict=True):
        truth = labels == k
        drawn = rasterise_regions([region], {"nucleus": 1}, (100, 40), (2.0, 2.0), (96, 64)) == 1
        assert _iou(drawn, truth) >= 0.9, (k, _iou(drawn, truth))
        rows, cols = np.nonzero(truth)
        assert region.bounds == pytest.approx((100 + 2 * cols.min(), 40 + 2 * rows.min(),
                                               100 + 2 * (cols.max() + 1), 40 + 2 * (rows.max() + 1)), abs=1.01)  # fmt: skip
        measurements = feature["properties"]["measurements"]
        assert measurements["area_px"] == 4 * truth.sum()  # level-0 pixels
        assert measurements["probability_mean"] == pytest.approx(0.5 if k == 7 else 0.8)
    # anisotropic scale: x doubled, y unchanged
    (one,) = nuclei_features(labels == 9, downsample=(2.0, 1.0))
    assert np.asarray(one["geometry"]["coordinates"][0]).min(0).tolist() == [160.0, 5.0]
