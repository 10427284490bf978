"""Tests of histokd.demos.synthetic.

Demo slides open in OpenSlide, carry their resolution, are deterministic, and their
ground truth lines up with the image.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import openslide
import pytest
from skimage import measure

from histokd.demos.synthetic import (
    DemoSlide,
    SlideSpec,
    TissueClass,
    load_demo_slide,
    make_demo_slides,
    read_tiff_region,
    read_truth,
    synthesize_slide,
    write_label_tiff,
    write_tiled_tiff,
)
from histokd.slides import SlideReader

# Small, non-square slides (a swapped x/y shows up) with regions small enough that every
# class has room on them.
SMALL = {"width": 1536, "height": 1024, "region_size_um": 250.0}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo")


@pytest.fixture(scope="module")
def slides(demo_dir: Path) -> list[DemoSlide]:
    return make_demo_slides(demo_dir, n=2, seed=7, **SMALL)


@pytest.fixture(scope="module")
def slide_40x(tmp_path_factory: pytest.TempPathFactory) -> DemoSlide:
    out = tmp_path_factory.mktemp("demo40")
    (slide,) = make_demo_slides(
        out,
        n=1,
        seed=7,
        width=2048,
        height=2048,
        mpp=0.25,
        region_size_um=250.0,
        level_downsample=2,
    )
    return slide


def _nuclei_table(slide: DemoSlide) -> dict[str, np.ndarray]:
    nuclei = read_truth(slide, 0, 0, slide.width, slide.height)
    regions = read_truth(slide, 0, 0, slide.width, slide.height, kind="regions")
    table = measure.regionprops_table(
        nuclei.astype(np.int32),
        properties=("label", "area", "centroid", "major_axis_length", "minor_axis_length"),
    )
    cy = table["centroid-0"].astype(int)
    cx = table["centroid-1"].astype(int)
    table["class"] = regions[cy, cx]
    return table


def test_openslide_reports_size_levels_and_resolution(slides: list[DemoSlide]) -> None:
    slide = slides[0]
    with openslide.OpenSlide(slide) as osr:  # a DemoSlide is os.PathLike
        assert osr.properties["openslide.vendor"] == "aperio"
        assert osr.dimensions == (1536, 1024)
        # Downsample 4 per level until a level fits one 256 px tile.
        assert osr.level_dimensions == ((1536, 1024), (384, 256), (96, 64))
        assert osr.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
        assert float(osr.properties["openslide.objective-power"]) == 20.0
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(osr.properties["openslide.mpp-y"]) == pytest.approx(0.5)
        assert osr.properties["openslide.level[0].tile-width"] == "256"
    meta = slide.metadata
    assert meta["level_dimensions"] == [[1536, 1024], [384, 256], [96, 64]]
    assert meta["class_names"] == ["stroma", "tumor", "lymphocyte"]
    assert slide.n_nuclei == meta["counts"]["nuclei"] > 500


def test_slide_reader_reads_demo_slides_at_their_magnification(
    slides: list[DemoSlide], slide_40x: DemoSlide
) -> None:
    # Through histokd's own reader, as every stage reads them: pixel size from the MPP (the
    # objective power is only a fallback), and the right pyramid level for the usual targets.
    with SlideReader(slides[0].slide_path) as r:
        assert r.info.vendor == "aperio"
        assert r.info.dimensions == (1536, 1024)
        assert (r.info.base_magnification, r.info.mpp_source) == (20.0, "openslide-mpp")
        assert r.info.mpp == pytest.approx(0.5)
        assert r.info.level_count == 3
        assert r.best_level(20) == 0 and r.best_level(5) == 1  # levels 1x, 4x, 16x down
        assert r.read_region(0, 0, 64, 5).shape == (64, 64, 3)
        assert r.thumbnail(1.25).shape == (64, 96, 3)
    with SlideReader(slide_40x.slide_path) as r:
        assert r.info.dimensions == (2048, 2048)
        assert (r.info.base_magnification, r.info.mpp_source) == (40.0, "openslide-mpp")
        assert r.info.level_count == 4
        assert r.best_level(20) == 1 and r.best_level(5) == 3  # levels 1x, 2x, 4x, 8x down


def test_40x_slide_reports_40x_and_draws_the_same_physical_nuclei(
    slides: list[DemoSlide], slide_40x: DemoSlide
) -> None:
    with openslide.OpenSlide(slide_40x.slide_path) as osr:
        assert float(osr.properties["openslide.objective-power"]) == 40.0
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert osr.level_downsamples == pytest.approx((1.0, 2.0, 4.0, 8.0))
    # Same physical sizes: nuclei cover four times as many pixels at 40x as at 20x.
    area_20x = np.median(_nuclei_table(slides[0])["area"]) * 0.5**2
    area_40x = np.median(_nuclei_table(slide_40x)["area"]) * 0.25**2
    assert area_40x == pytest.approx(area_20x, rel=0.3)
    assert 25 < area_20x < 150  # um^2: nuclei of roughly 6-14 um


def test_image_on_disk_is_the_drawn_image_and_truth_is_exact(slides: list[DemoSlide]) -> None:
    slide = slides[1]
    drawn = synthesize_slide(SlideSpec(**SMALL), np.random.SeedSequence([7, 1]))
    with openslide.OpenSlide(slide.slide_path) as osr:
        rgba = np.asarray(osr.read_region((0, 0), 0, osr.dimensions))
    assert (rgba[..., 3] == 255).all()
    error = np.abs(rgba[..., :3].astype(np.int16) - drawn.image).mean()
    assert error < 3.0  # JPEG at quality 90
    np.testing.assert_array_equal(read_truth(slide, 0, 0, 1536, 1024), drawn.nuclei)
    np.testing.assert_array_equal(
        read_truth(slide, 0, 0, 1536, 1024, kind="regions"), drawn.regions
    )
    assert drawn.nuclei.max() == slide.n_nuclei
    assert len(np.unique(drawn.nuclei)) == slide.n_nuclei + 1  # ids 0..n, none lost


def test_same_seed_same_bytes_other_seed_other_slide(tmp_path: Path) -> None:
    spec = SlideSpec(width=512, height=384)
    a = synthesize_slide(spec, 11)
    b = synthesize_slide(spec, 11)
    c = synthesize_slide(spec, 12)
    for name in ("image", "nuclei", "regions", "nucleus_class"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert np.abs(a.image.astype(np.int16) - c.image).mean() > 10
    # Files are byte-identical too (no dates or random names inside).
    first = make_demo_slides(tmp_path / "a", n=1, seed=3, width=512, height=384)[0]
    second = make_demo_slides(tmp_path / "b", n=1, seed=3, width=512, height=384)[0]
    for attr in ("slide_path", "nuclei_path", "regions_path"):
        assert getattr(first, attr).read_bytes() == getattr(second, attr).read_bytes()


def test_nuclei_are_dark_stroma_is_pink_and_glass_fails_the_tissue_rule(
    slides: list[DemoSlide],
) -> None:
    slide = slides[0]
    with openslide.OpenSlide(slide.slide_path) as osr:
        rgb = np.asarray(osr.read_region((0, 0), 0, osr.dimensions))[..., :3].astype(np.float32)
    nuclei = read_truth(slide, 0, 0, slide.width, slide.height) > 0
    regions = read_truth(slide, 0, 0, slide.width, slide.height, kind="regions")
    grey = rgb.mean(axis=2)
    between = (regions > 0) & ~nuclei
    assert grey[nuclei].mean() < grey[between].mean() - 40
    # Haematoxylin is blue-purple (blue above red), eosin pink (red above blue).
    assert rgb[nuclei][:, 2].mean() > rgb[nuclei][:, 0].mean()
    assert rgb[regions == 1][:, 0].mean() > rgb[regions == 1][:, 2].mean()
    # Glass is brighter than the RCKD Sec. 2.1.1 upper bound of 245.
    assert grey[regions == 0].mean() > 245
    background = 1 - slide.metadata["counts"]["tissue_fraction"]
    assert 0.3 < background < 0.5
    assert background == pytest.approx((regions == 0).mean())


def test_classes_differ_in_nuclei_density_size_and_shape(slides: list[DemoSlide]) -> None:
    density, area, elongation = {}, {}, {}
    per_class_area = {1: 0, 2: 0, 3: 0}
    tables = [_nuclei_table(s) for s in slides]
    for slide in slides:
        regions = read_truth(slide, 0, 0, slide.width, slide.height, kind="regions")
        for k in per_class_area:
            per_class_area[k] += (regions == k).sum()
    for k, name in enumerate(("stroma", "tumor", "lymphocyte"), start=1):
        assert per_class_area[k] > 0.05 * sum(s.width * s.height for s in slides), name
        count = sum((t["class"] == k).sum() for t in tables)
        density[name] = count / (per_class_area[k] * 0.5**2 / 1e6)  # nuclei per mm^2
        area[name] = np.median(np.concatenate([t["area"][t["class"] == k] for t in tables]))
        ratio = np.concatenate(
            [
                t["major_axis_length"][t["class"] == k] / t["minor_axis_length"][t["class"] == k]
                for t in tables
            ]
        )
        elongation[name] = np.median(ratio)
    assert density["lymphocyte"] > 1.3 * density["tumor"] > 1.3 * 2 * density["stroma"]
    assert area["tumor"] > 1.8 * area["lymphocyte"]
    assert elongation["stroma"] > 2.0 > 1.5 > max(elongation["tumor"], elongation["lymphocyte"])
    meta_counts = slides[0].metadata["counts"]["nuclei_per_class"]
    assert set(meta_counts) == {"stroma", "tumor", "lymphocyte"}
    assert sum(meta_counts.values()) == slides[0].n_nuclei


def test_second_call_skips_and_changed_parameters_redraw(
    demo_dir: Path, slides: list[DemoSlide]
) -> None:
    paths = [
        p for s in slides for p in (s.slide_path, s.nuclei_path, s.regions_path, s.metadata_path)
    ]
    before = {p: os.stat(p).st_mtime_ns for p in paths}
    again = make_demo_slides(demo_dir, n=2, seed=7, **SMALL)
    assert again == slides
    assert {p: os.stat(p).st_mtime_ns for p in paths} == before
    # Asking for more keeps the first ones; a changed parameter redraws.
    more = make_demo_slides(demo_dir, n=3, seed=7, **SMALL)
    assert more[:2] == slides and {p: os.stat(p).st_mtime_ns for p in paths} == before
    changed = make_demo_slides(demo_dir, n=1, seed=7, jpeg_quality=80, **SMALL)
    assert os.stat(changed[0].slide_path).st_mtime_ns != before[slides[0].slide_path]
    assert (
        json.loads(changed[0].metadata_path.read_text())["params"]["writer"]["jpeg_quality"] == 80
    )
    make_demo_slides(demo_dir, n=1, seed=7, **SMALL)  # restore for other tests


def test_read_truth_crops_pads_resamples_and_loads_by_path(slides: list[DemoSlide]) -> None:
    slide = slides[0]
    full = read_truth(slide, 0, 0, slide.width, slide.height)
    assert full.dtype == np.uint32 and full.shape == (1024, 1536)
    np.testing.assert_array_equal(read_truth(slide, 300, 200, 500, 260), full[200:460, 300:800])
    # Past the edges is 0, as OpenSlide's read_region is transparent there.
    edge = read_truth(slide.slide_path, 1400, -50, 300, 100)
    np.testing.assert_array_equal(edge[50:, :136], full[:50, 1400:])
    assert not edge[:50].any() and not edge[:, 136:].any()
    # A 40x-style request: 512 level-0 px shown as 256 px. Each output pixel takes the
    # label under its centre (level-0 pixel 2i + 1), so ids stay ids.
    half = read_truth(slide.metadata_path, 512, 256, 512, 512, size=(256, 256))
    np.testing.assert_array_equal(half, full[257:768:2, 513:1024:2])
    assert load_demo_slide(slide.slide_path) == slide
    assert slide.path == slide.slide_path and os.fspath(slide) == str(slide.slide_path)
    regions = slide.read_truth(0, 0, 1536, 1024, kind="regions")
    assert regions.dtype == np.uint8 and set(np.unique(regions)) <= {0, 1, 2, 3}
    with pytest.raises(ValueError, match="kind='cells'"):
        read_truth(slide, 0, 0, 10, 10, kind="cells")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="sidecar"):
        read_truth(slide.slide_path.with_name("nope.svs"), 0, 0, 10, 10)


def test_generic_tiled_tiff_edge_cases(tmp_path: Path) -> None:
    tiny = np.full((50, 70, 3), (200, 120, 160), np.uint8)
    dims = write_tiled_tiff(tmp_path / "tiny.tif", tiny, mpp=0.5)
    assert dims == [(70, 50)]
    with openslide.OpenSlide(tmp_path / "tiny.tif") as osr:
        assert osr.properties["openslide.vendor"] == "generic-tiff"
        assert osr.dimensions == (70, 50)
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert "openslide.objective-power" not in osr.properties
        assert (
            np.abs(
                np.asarray(osr.read_region((0, 0), 0, (70, 50)))[..., :3].astype(int) - tiny
            ).max()
            <= 3
        )

    white = np.full((600, 1000), 255, np.uint8)
    write_tiled_tiff(tmp_path / "white.tif", white, compression="deflate", levels=3)
    with openslide.OpenSlide(tmp_path / "white.tif") as osr:
        assert osr.level_dimensions == ((1000, 600), (500, 300), (250, 150))
        assert "openslide.mpp-x" not in osr.properties
        assert (np.asarray(osr.read_region((0, 0), 2, (250, 150)))[..., :3] == 255).all()

    rgba = np.zeros((300, 400, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[100:, :, 3] = 255
    write_tiled_tiff(tmp_path / "rgba.tif", rgba, compression="deflate")
    with openslide.OpenSlide(tmp_path / "rgba.tif") as osr:
        pixels = np.asarray(osr.read_region((0, 0), 0, (400, 300)))
    assert (pixels[:100, :, 3] == 0).all() and (pixels[100:] == (200, 0, 0, 255)).all()

    with pytest.raises(ValueError, match="RGBA image cannot be JPEG"):
        write_tiled_tiff(tmp_path / "x.tif", rgba)
    with pytest.raises(ValueError, match="dtype float64"):
        write_tiled_tiff(tmp_path / "x.tif", np.zeros((10, 10, 3)))
    with pytest.raises(ValueError, match="tile_size=100"):
        write_tiled_tiff(tmp_path / "x.tif", tiny, tile_size=100)
    assert not list(tmp_path.glob("x.tif*")) and not list(tmp_path.glob(".x.tif*"))


def test_label_tiff_round_trip(tmp_path: Path) -> None:
    labels = np.random.default_rng(0).integers(0, 70_000, (300, 500)).astype(np.uint32)
    write_label_tiff(tmp_path / "labels.tif", labels, tile_size=64)
    np.testing.assert_array_equal(read_tiff_region(tmp_path / "labels.tif", 0, 0, 500, 300), labels)
    np.testing.assert_array_equal(
        read_tiff_region(tmp_path / "labels.tif", 63, 65, 130, 2), labels[65:67, 63:193]
    )


def test_bad_parameters_name_the_field_and_the_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"SlideSpec.mpp=0 is invalid"):
        SlideSpec(mpp=0)
    with pytest.raises(ValueError, match=r"SlideSpec.width=8 is invalid"):
        SlideSpec(width=8)
    with pytest.raises(ValueError, match=r"'blob': aspect=\(2.0, 1.0\)"):
        TissueClass("blob", 100, (5.0, 8.0), (2.0, 1.0), 0.1, (0.5, 1.0))
    with pytest.raises(ValueError, match=r"unknown slide fields \['colour'\]"):
        make_demo_slides(tmp_path, n=1, colour="red")
    with pytest.raises(ValueError, match="jpeg_quality=0"):
        make_demo_slides(tmp_path, n=1, jpeg_quality=0)
    assert not list(tmp_path.iterdir())


def test_class_weights_give_a_slide_a_dominant_class(tmp_path):
    from histokd.demos.synthetic import SlideSpec, make_demo_slides

    slide = make_demo_slides(
        tmp_path, n=1, seed=4, width=1024, height=1024, class_weights=(0.0, 1.0, 0.0)
    )[0]
    regions = slide.read_truth(0, 0, 1024, 1024, kind="regions", size=(256, 256))
    assert set(np.unique(regions)) <= {0, 2} and (regions == 2).any()  # tumour only, and glass
    with pytest.raises(ValueError, match="class_weights"):
        SlideSpec(class_weights=(1.0, 0.0))  # one weight per class
