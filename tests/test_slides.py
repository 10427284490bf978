"""The slide reader on real files in real formats, and on tiled TIFFs written here."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

import histokd.slides
from histokd.slides import SlideError, SlideReader, flatten_rgba, magnification_from_mpp


def test_cmu_aperio_is_20x(slides_dir):
    with SlideReader(slides_dir / "cmu-1-small-region.svs") as r:
        info = r.info
        assert (info.vendor, info.dimensions, info.level_count) == ("aperio", (2220, 2967), 1)
        assert r.info.base_magnification == 20
        assert r.info.mpp == pytest.approx(0.499)
        # Its MPP alone gives the same answer.
        assert magnification_from_mpp(r.info.mpp) == 20
        patch = r.read_region(1000, 1000, 256, 20)
        assert patch.shape == (256, 256, 3) and patch.dtype == np.uint8
        half = r.read_region(1000, 1000, 128, 10)
        assert half.shape == (128, 128, 3)
        # 10x is the 20x region shrunk by 2: means agree closely.
        assert abs(float(half.mean()) - float(patch.mean())) < 2.0


def test_mpp_rule():
    assert magnification_from_mpp(0.25) == 40
    assert magnification_from_mpp(0.5) == 20
    assert magnification_from_mpp(0.2527) == 40
    assert magnification_from_mpp(3.0) == pytest.approx(10 / 3)


def test_tcga_jpeg2000_needs_user_magnification(slides_dir):
    path = slides_dir / "tcga-cr-7395-01a-01-ts1.svs"
    with pytest.raises(SlideError, match="base magnification unknown.*base_magnification") as err:
        SlideReader(path)
    assert "tcga-cr-7395-01a-01-ts1.svs" in str(err.value)
    with SlideReader(path, base_magnification=40) as r:
        assert r.info.level_dimensions == ((4443, 3567), (2221, 1783))
        assert r.info.magnification_source == "user"
        assert r.best_level(20) == 1  # 20x from a 40x scan: the 2x level, not level 0
        assert r.best_level(40) == 0
        patch = r.read_region(1600, 1600, 512, 20)  # decodes JPEG 2000 tiles
        assert patch.shape == (512, 512, 3)
        assert 50 < patch.mean() < 245


def test_boxes_tiff_four_levels(slides_dir):
    # Its 72-dpi resolution tag is 352.8 um/px: no plausible MPP, so a user value is needed.
    with pytest.raises(SlideError, match="base magnification unknown"):
        SlideReader(slides_dir / "boxes.tiff")
    with SlideReader(slides_dir / "boxes.tiff", base_magnification=20) as r:
        assert r.info.vendor == "generic-tiff"
        assert r.info.level_count == 4
        assert r.info.dimensions == (300, 250)
        # Level 2 is 4.016x down, a hair coarser than 5x asks: level 1 it is.
        assert r.best_level(5) == 1 and r.best_level(2.5) == 2 and r.best_level(2) == 3


def test_dicom_pair(slides_dir):
    # One slide in two files of one series: either file opens the same slide.
    with SlideReader(slides_dir / "boxes_0.dcm") as r:
        assert (r.info.vendor, r.info.dimensions, r.info.level_count) == ("dicom", (16, 16), 1)
        assert r.info.base_magnification == 20
        first = r.read_region(0, 0, 16, 20)
        assert first.shape == (16, 16, 3)
    with SlideReader(slides_dir / "boxes_1.dcm") as other:
        assert other.info.vendor == "dicom"
        assert other.info.dimensions == (16, 16)
        assert other.info.level_dimensions == r.info.level_dimensions
        assert other.info.base_magnification == 20
        np.testing.assert_array_equal(other.read_region(0, 0, 16, 20), first)


@pytest.mark.parametrize(
    "name, message",
    [
        ("broken.svs", "not a slide format OpenSlide reads"),
        ("kidney-48-5.tif", "not a slide format OpenSlide reads"),
        ("unopenable.tiff", "OpenSlide cannot open the file: Unsupported TIFF compression"),
        ("does-not-exist.svs", "file not found"),
    ],
)
def test_unopenable_files_name_the_file(slides_dir, name, message):
    with pytest.raises(SlideError, match=message) as err:
        SlideReader(slides_dir / name)
    assert name in str(err.value)
    assert str(err.value).count("\n") == 0  # one line


def test_unreadable_tiles_then_reader_still_usable(slides_dir):
    with SlideReader(slides_dir / "unreadable.svs") as r:
        for _ in range(2):  # the handle is reopened after each failure
            with pytest.raises(
                SlideError, match=r"unreadable.svs: tiles cannot be read at x=0, y=0"
            ):
                r.read_region(0, 0, 16, 20)


def test_truncated_file(slides_dir, tmp_path):
    source = slides_dir / "cmu-1-small-region.svs"
    truncated = tmp_path / "truncated.svs"
    data = source.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(SlideError) as err:
        with SlideReader(truncated) as r:
            r.read_region(0, 0, 2048, 20)
            r.read_region(0, 2048, 2048, 20)
    assert "truncated.svs" in str(err.value)


def test_magnification_above_scan(slides_dir):
    with SlideReader(slides_dir / "cmu-1-small-region.svs") as r:
        with pytest.raises(
            SlideError, match=r"magnification=40x is above the scan's 20x.*allowed: at most 20x"
        ):
            r.read_region(0, 0, 64, 40)


def test_20x_from_40x_tiff(tiled_tiff):
    image = np.full((2048, 2048, 3), 230, np.uint8)
    image[512:1536, 512:1536] = (150, 80, 140)
    path = tiled_tiff("scan40.tiff", image, mpp=0.25, levels=3)
    with SlideReader(path) as r:
        assert (r.info.base_magnification, r.info.magnification_source) == (40, "mpp")
        assert r.best_level(20) == 1 and r.best_level(10) == 2
        patch = r.read_region(1024, 1024, 128, 20)  # 256 level-0 px inside the square
        assert patch.shape == (128, 128, 3)
        np.testing.assert_allclose(patch.reshape(-1, 3).mean(0), (150, 80, 140), atol=3)
        edge = r.read_region(0, 0, 1024, 20)  # whole slide at 20x: square in the middle
        assert abs(int(edge[512, 512, 1]) - 80) < 6 and abs(int(edge[10, 10, 1]) - 230) < 6


def test_flatten_transparency_onto_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)  # transparent: white
    rgba[0, 1] = (100, 50, 0, 255)  # opaque: unchanged
    rgba[1, 0] = (0, 0, 0, 128)  # half: mid grey
    rgb = flatten_rgba(Image.fromarray(rgba, "RGBA"))
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert tuple(rgb[0, 0]) == (255, 255, 255)
    assert tuple(rgb[0, 1]) == (100, 50, 0)
    assert tuple(rgb[1, 0]) == (127, 127, 127)


def test_reading_outside_the_slide_is_white(slides_dir):
    with SlideReader(slides_dir / "small.svs") as r:
        patch = r.read_region(64, 64, 32, 20)
        assert patch.min() == 255


def test_bad_user_magnification(slides_dir, tmp_path):
    shutil.copy(slides_dir / "small.svs", tmp_path / "small.svs")
    with pytest.raises(SlideError, match="base_magnification=-1: must be a positive number"):
        SlideReader(tmp_path / "small.svs", base_magnification=-1)


def test_thumbnail_reads_a_big_single_level_slide_in_bounded_pieces(tiled_tiff, monkeypatch):
    # A single-level tiled TIFF (the layout where the thumbnail's best level is the whole
    # scan): with a small bound the thumbnail is read in strips, then in tiles, never in one
    # read above the bound, and equals the whole level read at once and shrunk.
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:1100, :1500]
    image = np.stack([xx * 255 // 1500, yy * 255 // 1100, (xx + yy) % 256], -1).astype(np.uint8)
    image[300:700, 400:1200] = (150, 80, 140)
    image = np.clip(image.astype(int) + rng.integers(-30, 30, image.shape), 0, 255).astype(np.uint8)
    path = tiled_tiff("single.tiff", image, mpp=0.5)  # 20x, one level
    with SlideReader(path) as r:
        assert r.info.level_count == 1
        width, height = r.size_at(1.25)  # 1500 / 16 = 93.75: a non-integer scale
        assert (width, height) == (93, 68)
        whole = r._slide.read_region((0, 0), 0, r.info.dimensions)
        expected = np.asarray(
            Image.fromarray(flatten_rgba(whole)).resize((width, height), Image.Resampling.BOX)
        )
        assert np.array_equal(r.thumbnail(1.25), expected)  # fits the default bound: one read

        sizes = []
        read = r._slide.read_region

        def recording(location, level, size):
            sizes.append(size)
            return read(location, level, size)

        monkeypatch.setattr(r._slide, "read_region", recording)
        for bound, layout in [(200_000, "strips"), (20_000, "tiles")]:
            monkeypatch.setattr(histokd.slides, "_THUMBNAIL_READ_PIXELS", bound)
            sizes.clear()
            thumb = r.thumbnail(1.25)
            assert thumb.shape == (height, width, 3) and thumb.dtype == np.uint8
            assert len(sizes) > 1, layout
            assert max(w * h for w, h in sizes) <= bound, layout
            assert all(w == 1500 for w, _ in sizes) == (layout == "strips")
            diff = np.abs(thumb.astype(int) - expected)
            assert diff.max() <= 2 and diff.mean() < 0.05, (layout, diff.max(), diff.mean())
            # The pieces cover the level once, but for the rows/columns shared at their edges.
            assert sum(w * h for w, h in sizes) < 1.25 * 1500 * 1100, layout
