"""A slide assembled from stream rows: tiles land where they belong, and the outputs are written whole."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile

from histokd.inference import NO_LABEL, TaskModelInfo, lattice
from histokd.inference.assembly import OUTPUT_FILES, OutputSettings, SlideAssembly
from histokd.inference.outputs import file_record
from histokd.inference.stream import META_COLUMNS

WIDTH, HEIGHT, EXTENT, STRIDE = 1000, 700, 128, 96  # level-0 pixels of a 20x slide
DOWNSAMPLE = 4  # output at 5x


def _settings(task: str, names: tuple[str, ...]) -> OutputSettings:
    info = TaskModelInfo(path="m.pt", task=task, backbone="resnet18", num_classes=len(names), class_names=names,
                         input_size=32, magnification=20.0, patch_size=128)  # fmt: skip
    return OutputSettings(info=info, output_magnification=5.0, tile_side=32, overlap=0.25, blend="cosine",
                          overlay_max_side=512, base_magnification=None, fingerprint="f")  # fmt: skip


def _rows(
    slide: str, xs: np.ndarray, ys: np.ndarray, status: list[str] | None = None
) -> dict[str, np.ndarray]:
    n = len(xs)
    batch = {
        "slide_index": np.zeros(n, np.int64), "slide_path": np.array([slide] * n, object),
        "status": np.array(status or ["tile"] * n, object), "message": np.array(["bad tile"] * n, object),
        "x": xs, "y": ys, "tile_count": np.full(n, n), "tissue_fraction": np.full(n, 0.5, np.float32),
        "width": np.full(n, WIDTH), "height": np.full(n, HEIGHT), "extent": np.full(n, EXTENT), "stride": np.full(n, STRIDE),
        "base_magnification": np.full(n, 20.0), "mpp": np.full(n, 0.5), "grid_cols": np.full(n, 11), "grid_rows": np.full(n, 7),
    }  # fmt: skip
    assert set(batch) == set(META_COLUMNS)
    return batch


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.fixture
def slide(tiled_tiff):
    image = np.full((HEIGHT, WIDTH, 3), 230, np.uint8)
    return str(tiled_tiff("slide.tiff", image, mpp=0.5, compression="deflate"))


def test_tiles_land_where_they_belong(slide, tmp_path, rasterise):
    # A known probability field at the output resolution; every tile reports its own crop of it.
    h, w = HEIGHT // DOWNSAMPLE, WIDTH // DOWNSAMPLE
    field = np.zeros((2, h, w), np.float32)
    field[1] = np.linspace(0, 1, w)[None, :] * np.linspace(0.2, 1, h)[:, None]
    field[0] = 1 - field[1]
    xs, ys = lattice(WIDTH, HEIGHT, EXTENT, STRIDE)
    padded = np.pad(field, ((0, 0), (0, 32), (0, 32)))
    maps = np.stack(
        [
            padded[:, round(y / DOWNSAMPLE) :][:, :32, round(x / DOWNSAMPLE) :][:, :, :32]
            for x, y in zip(xs, ys, strict=True)
        ]
    )
    batch = _rows(slide, xs, ys)
    batch["probability_map"] = maps.astype(np.float16)
    batch["probabilities"] = maps.mean((2, 3))
    assembly = SlideAssembly(
        "slide-1",
        slide,
        {k: v[0] for k, v in batch.items()},
        _settings("segmentation", ("background", "tissue")),
    )
    half = len(xs) // 2  # rows arrive in two batches
    assembly.add(batch, np.arange(half))
    assert not assembly.complete
    assembly.add(batch, np.arange(half, len(xs)))
    assert assembly.complete and assembly.num_predicted == len(xs)
    assert (assembly.canvas.width, assembly.canvas.height) == (w, h)
    np.testing.assert_allclose(assembly.canvas.probabilities(), field, atol=2e-3)  # float16 maps
    summary = assembly.write(tmp_path / "slides")
    expected = (field[1] > field[0]).mean()
    assert summary["class_fractions"]["tissue"] == pytest.approx(expected, abs=0.01)
    assert summary["mean_probabilities"]["tissue"] == pytest.approx(field[1].mean(), abs=2e-3)
    assert summary["class_areas_mm2"]["tissue"] == pytest.approx(
        expected * w * h * (0.5 * DOWNSAMPLE) ** 2 / 1e6, rel=0.02
    )
    folder = tmp_path / "slides" / "slide-1"
    assert sorted(p.name for p in (tmp_path / "slides").iterdir()) == [
        "slide-1"
    ]  # no partial folders left
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*OUTPUT_FILES.values(), "summary.json"]
    )
    heat = tifffile.imread(folder / OUTPUT_FILES["heatmap"])
    assert heat.shape == (2, h, w)
    np.testing.assert_allclose(heat[1] / 255, field[1], atol=0.01)
    table = pq.read_table(folder / OUTPUT_FILES["predictions"])
    assert table.num_rows == len(xs) and table.column("x").to_pylist() == xs.tolist()
    assert json.loads((folder / "summary.json").read_text())["output"]["pixel_size_um"] == 2.0
    # GeoJSON: no tiles for a segmentation model; the tissue outline fills back to the label mask
    labels = tifffile.imread(folder / OUTPUT_FILES["labels"])
    features = json.loads((folder / OUTPUT_FILES["geojson"]).read_text())["features"]
    assert [f["properties"]["classification"]["name"] for f in features] == ["tissue"]
    back = rasterise(features[0]["geometry"]["coordinates"], labels.shape, scale=DOWNSAMPLE)
    assert _iou(back, labels == 1) >= 0.9


def test_unreadable_tiles_are_counted_and_rewriting_replaces_the_folder(slide, tmp_path):
    xs, ys = lattice(WIDTH, HEIGHT, EXTENT, STRIDE)
    xs, ys = xs[:4], ys[:4]
    batch = _rows(slide, xs, ys, status=["tile", "unreadable", "tile", "tile"])
    batch["probabilities"] = np.array([[0.9, 0.1], [0, 0], [0.2, 0.8], [0.3, 0.7]], np.float32)
    settings = _settings("classification", ("stroma", "tumor"))
    assembly = SlideAssembly("slide-2", slide, {k: v[0] for k, v in batch.items()}, settings)
    assembly.add(batch, np.arange(4))
    assert assembly.complete and assembly.num_predicted == 3
    summary = assembly.write(tmp_path)
    assert summary["num_unreadable_tiles"] == 1 and summary["first_unreadable"] == "bad tile"
    assert summary["class_fractions"] == pytest.approx({"stroma": 1 / 3, "tumor": 2 / 3})
    assert summary["mean_probabilities"]["tumor"] == pytest.approx((0.1 + 0.8 + 0.7) / 3)
    labels = tifffile.imread(tmp_path / "slide-2" / OUTPUT_FILES["labels"])
    # output columns: tile 0 covers 0-31 (stroma), unreadable tile 1 alone 32-47, tile 2 48-79 (tumour)
    assert (labels[0, 0], labels[0, 40], labels[0, 50]) == (0, NO_LABEL, 1)
    assert (labels == NO_LABEL).mean() > 0.5
    (tmp_path / "slide-2" / "stale.txt").write_text("from an older run")
    again = SlideAssembly("slide-2", slide, {k: v[0] for k, v in batch.items()}, settings)
    again.add(batch, np.arange(4))
    again.write(tmp_path)
    assert not (tmp_path / "slide-2" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide-2", "slide.tiff"]


def test_geojson_tiles_match_the_table_and_regions_match_the_labels(slide, tmp_path, rasterise):
    # Classification: tiles left of x = 500 are stroma, the rest tumour; QuPath's file holds
    # each tile on its level-0 box and the outline of each class's label region.
    xs, ys = lattice(WIDTH, HEIGHT, EXTENT, STRIDE)
    tumour = np.where(xs + EXTENT / 2 < 500, 0.2, 0.9).astype(np.float32)
    batch = _rows(slide, xs, ys)
    batch["probabilities"] = np.stack([1 - tumour, tumour], 1)
    settings = _settings("classification", ("stroma", "tumor"))
    assembly = SlideAssembly("slide-3", slide, {k: v[0] for k, v in batch.items()}, settings)
    assembly.add(batch, np.arange(len(xs)))
    summary = assembly.write(tmp_path / "slides")
    folder = tmp_path / "slides" / "slide-3"
    name = OUTPUT_FILES["geojson"]
    assert summary["outputs"][name] == file_record(folder / name)
    collection = json.loads((folder / name).read_text())
    assert collection["type"] == "FeatureCollection"
    tiles = [f for f in collection["features"] if f["properties"]["objectType"] == "tile"]
    rows = pq.read_table(folder / OUTPUT_FILES["predictions"]).to_pylist()
    assert len(tiles) == len(rows) == len(xs)
    for tile, row in zip(tiles, rows, strict=True):
        x, y, e = row["x"], row["y"], row["extent"]
        assert tile["geometry"]["coordinates"] == [
            [[x, y], [x + e, y], [x + e, y + e], [x, y + e], [x, y]]
        ]
        assert tile["properties"]["classification"]["name"] == row["class_name"]
        measured = tile["properties"]["measurements"]
        assert measured == pytest.approx(
            {"prob_stroma": row["prob_stroma"], "prob_tumor": row["prob_tumor"]}
        )
    regions = [f for f in collection["features"] if f["properties"]["objectType"] == "annotation"]
    assert [f["properties"]["classification"]["name"] for f in regions] == ["stroma", "tumor"]
    labels = tifffile.imread(folder / OUTPUT_FILES["labels"])
    for k, region in enumerate(regions):
        assert (labels == k).sum() > 1000
        back = rasterise(region["geometry"]["coordinates"], labels.shape, scale=DOWNSAMPLE)
        assert _iou(back, labels == k) >= 0.9, k
