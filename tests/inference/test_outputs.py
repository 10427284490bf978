"""Per-slide output files: OME-TIFF pyramids that tifffile reads back, overlays, the tile table."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import tifffile

from histokd.inference import NO_LABEL
from histokd.inference.outputs import (
    class_palette,
    damaged_output,
    file_record,
    label_overlay,
    pyramid_levels,
    tile_table,
    write_ome_tiff,
)


def test_probability_tiff_is_a_tiled_pyramid_with_named_channels(tmp_path):
    rng = np.random.default_rng(0)
    heat = rng.integers(0, 256, (3, 700, 600), dtype=np.uint8)
    path = write_ome_tiff(
        tmp_path / "heatmap.ome.tif",
        heat,
        channel_names=["stroma", "tumor", "lymphocyte"],
        pixel_size_um=4.0,
    )
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        series = tif.series[0]
        assert series.axes == "CYX" and series.shape == (3, 700, 600)
        assert [level.shape for level in series.levels] == [
            (3, 700, 600),
            (3, 350, 300),
            (3, 175, 150),
        ]
        assert (
            tif.pages[0].is_tiled and tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        )
        np.testing.assert_array_equal(series.asarray(), heat)
        block = heat[:, :2, :2].astype(float).mean((1, 2))
        np.testing.assert_allclose(series.levels[1].asarray()[:, 0, 0], block, atol=0.5)
        xml = tif.ome_metadata
    for text in ('Name="stroma"', 'Name="lymphocyte"', 'PhysicalSizeX="4.0"'):
        assert text in xml


def test_label_tiff_pyramid_keeps_class_indices(tmp_path):
    labels = np.full((300, 520), NO_LABEL, np.uint8)
    labels[:, :260] = 2
    labels[100:, 300:] = 1
    path = write_ome_tiff(tmp_path / "labels.ome.tif", labels, kind="nearest")
    series = tifffile.TiffFile(path).series[0]
    assert series.axes == "YX" and [lv.shape for lv in series.levels] == [
        (300, 520),
        (150, 260),
        (75, 130),
    ]
    assert set(np.unique(series.levels[1].asarray())) == {1, 2, NO_LABEL}
    np.testing.assert_array_equal(series.asarray(), labels)


def test_pyramid_reduces_odd_sides_and_stops_at_one_tile():
    levels = pyramid_levels(np.zeros((1000, 257), np.uint8), "mean")
    assert [lv.shape for lv in levels] == [(1000, 257), (500, 129), (250, 65)]


def test_overlay_paints_predicted_classes_only():
    thumb = np.full((40, 60, 3), 200, np.uint8)
    labels = np.full((40, 60), NO_LABEL, np.uint8)
    labels[:20, :30] = 0  # background: not painted
    labels[20:, 30:] = 2
    picture = label_overlay(
        thumb, labels, ["background", "stroma", "tumor"], opacity=0.5, legend=False
    )
    assert (picture[:20, :30] == 200).all() and (picture[20:, :30] == 200).all()
    expected = np.round(0.5 * 200 + 0.5 * class_palette(3)[2].astype(float))
    np.testing.assert_array_equal(picture[25, 40], expected)
    with_legend = label_overlay(thumb, labels, ["background", "stroma", "tumor"])
    assert with_legend.shape[0] > 40 and with_legend.shape[1] >= 60
    with pytest.raises(ValueError, match="differ in size"):
        label_overlay(thumb, labels[:10], ["a"])


def test_tile_table_rows_and_columns():
    probs = np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)
    table = tile_table(
        "s-1",
        np.array([0, 512]),
        np.array([256, 256]),
        512,
        np.array([0.5, 1.0]),
        probs,
        ["stroma", "tumor"],
        20.0,
        256,
    )
    rows = table.to_pylist()
    assert table.column_names == [
        "slide_id", "x", "y", "extent", "magnification", "patch_size", "tissue_fraction", "label", "class_name", "prob_stroma", "prob_tumor",
    ]  # fmt: skip
    assert [(r["x"], r["y"], r["label"], r["class_name"]) for r in rows] == [
        (0, 256, 1, "tumor"),
        (512, 256, 0, "stroma"),
    ]
    assert rows[0]["prob_tumor"] == pytest.approx(0.9) and rows[1]["extent"] == 512
    assert table.schema.metadata[b"class_names"] == b"stroma\ntumor"
    assert (
        tile_table(
            "s", np.zeros(0), np.zeros(0), 1, np.zeros(0), np.zeros((0, 2)), ["a", "b"], 20, 8
        ).num_rows
        == 0
    )


def test_file_record_and_every_kind_of_damage(tmp_path):
    """Each reason a rerun gives for predicting a slide again, and None for whole files."""
    data = bytes(range(256)) * 5000  # 1.28 MB: more than one 1 MiB chunk
    (tmp_path / "predictions.parquet").write_bytes(data)
    (tmp_path / "overlay.png").write_bytes(b"png")
    record = file_record(tmp_path / "predictions.parquet")
    assert record == {"bytes": 1_280_000, "sha256": hashlib.sha256(data).hexdigest()}
    records = {n: file_record(tmp_path / n) for n in ("predictions.parquet", "overlay.png")}
    assert damaged_output(tmp_path, records, ["overlay.png"]) is None

    assert damaged_output(tmp_path, None) == "summary.json records no output sizes and checksums"
    assert damaged_output(tmp_path, records, ["overlay.png", "heatmap.png"]) == (
        "summary.json records no size and checksum for heatmap.png"
    )
    wrong = {**records, "overlay.png": {**records["overlay.png"], "sha256": "0" * 64}}
    assert damaged_output(tmp_path, wrong) == (
        "overlay.png's SHA-256 differs from the one summary.json records"
    )
    escape = {"../predictions.parquet": records["predictions.parquet"]}
    assert "is not a size and checksum" in damaged_output(tmp_path, escape)
    (tmp_path / "predictions.parquet").write_bytes(data[:1000])  # truncated
    assert damaged_output(tmp_path, records) == (
        "predictions.parquet has 1000 bytes, summary.json records 1280000"
    )
    (tmp_path / "predictions.parquet").write_bytes(data[:-1] + b"x")  # same size, other bytes
    assert damaged_output(tmp_path, records) == (
        "predictions.parquet's SHA-256 differs from the one summary.json records"
    )
    (tmp_path / "predictions.parquet").unlink()
    assert damaged_output(tmp_path, records) == "predictions.parquet is missing"
