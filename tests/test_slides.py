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
        # MPP first (the objective power, 20, is only a fallback), unsnapped: 10 / 0.499.
        assert (info.mpp_x, info.mpp_y, info.mpp_source) == (0.499, 0.499, "openslide-mpp")
        assert info.base_magnification == pytest.approx(20.04, abs=0.001)
        assert magnification_from_mpp(r.info.mpp) == 20
        # 0.5 um/px from a 0.499 scan: level 0 as is (within 1 %), no resize.
        where = r.footprint(256, 20)
        assert (where.level, where.read_size, where.extent) == (0, (256, 256), (256, 256))
        assert where.mpp == (pytest.approx(0.499), pytest.approx(0.499))
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
        # Level 2 is 4.0x and 4.03x down, within 1 % of what 5x asks: read as is. Level 3 is
        # 8.1x in x, 1.35 % over 2.5x's 8: level 2, resized.
        assert r.best_level(5) == 2 and r.best_level(2.5) == 2 and r.best_level(2) == 3
        assert r.footprint(16, 5).read_size == (16, 16)
        assert r.footprint(16, 2.5).read_size == (32, 32)


def test_dicom_pair(slides_dir):
    # One slide in two files of one series: either file opens the same slide.
    with SlideReader(slides_dir / "boxes_0.dcm") as r:
        assert (r.info.vendor, r.info.dimensions, r.info.level_count) == ("dicom", (16, 16), 1)
        # DICOM pixel spacing comes through OpenSlide's mpp properties.
        assert (r.info.mpp_x, r.info.mpp_source) == (0.499, "openslide-mpp")
        first = r.read_region(0, 0, 16, 20)
        assert first.shape == (16, 16, 3)
    with SlideReader(slides_dir / "boxes_1.dcm") as other:
        assert other.info.vendor == "dicom"
        assert other.info.dimensions == (16, 16)
        assert other.info.level_dimensions == r.info.level_dimensions
        assert other.info.mpp_x == 0.499
        np.testing.assert_array_equal(other.read_region(0, 0, 16, 20), first)


@pytest.mark.parametrize(
    "name, message",
    [
        ("broken.svs", "not a slide format OpenSlide reads"),
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
        assert (r.info.base_magnification, r.info.mpp_source) == (40, "openslide-mpp")
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


# -- physical units first ---------------------------------------------------------------------
def _svs(path, image, *, app_mag=None, mpp=None, tile=256):
    """An Aperio-style tiled TIFF whose description records AppMag and/or MPP (or neither)."""
    import tifffile

    h, w = image.shape[:2]
    fields = "".join(
        f"|{key} = {value:g}" for key, value in (("AppMag", app_mag), ("MPP", mpp)) if value
    )
    description = (
        f"Aperio Image Library v12.0.16 \r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) RAW{fields}"
    )
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=(tile, tile), photometric="rgb", compression="zlib",
                  description=description, metadata=None, software=False)  # fmt: skip
    return path


def _smooth_tissue(size: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB field (no detail finer than ~16 px), so resampling barely matters."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(40, 230, (size // 32, size // 32, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))


def test_mpp_first_then_objective_power_with_one_warning(tmp_path, caplog):
    image = _smooth_tissue(512)
    # Scanner metadata that disagree: MPP 0.25 (40x) wins over AppMag 20.
    both = _svs(tmp_path / "both.svs", image, app_mag=20, mpp=0.25)
    with SlideReader(both) as r:
        assert (r.info.vendor, r.info.mpp_x, r.info.mpp_source) == ("aperio", 0.25, "openslide-mpp")
        assert r.info.base_magnification == 40 and r.footprint(64, mpp=0.5).extent == (128, 128)
    only = _svs(tmp_path / "only.svs", image, app_mag=40)
    with caplog.at_level("WARNING", logger="histokd.slides"):
        for _ in range(2):
            with SlideReader(only, assume_mpp=1.0) as r:  # a recorded power beats assume_mpp
                assert (r.info.mpp_x, r.info.mpp_y, r.info.mpp_source) == (
                    0.25,
                    0.25,
                    "objective-power",
                )
    warnings = [rec.getMessage() for rec in caplog.records if "only.svs" in rec.getMessage()]
    assert len(warnings) == 1 and "objective power 40x" in warnings[0]
    bare = _svs(tmp_path / "bare.svs", image)
    with pytest.raises(
        SlideError, match=r"bare.svs: pixel size and base magnification unknown.*assume_mpp"
    ):
        SlideReader(bare)
    with SlideReader(bare, assume_mpp=0.5) as r:
        assert (r.info.mpp_x, r.info.mpp_source, r.info.base_magnification) == (0.5, "user", 20)


def test_assume_mpp_and_its_older_name(slides_dir):
    path = slides_dir / "tcga-cr-7395-01a-01-ts1.svs"
    for kwargs in (
        {"assume_mpp": 0.25},
        {"base_magnification": 40},
        {"assume_mpp": 0.25, "base_magnification": 40},
    ):
        with SlideReader(path, **kwargs) as r:
            assert (r.info.mpp_x, r.info.mpp_source, r.info.base_magnification) == (
                0.25,
                "user",
                40,
            )
    with pytest.raises(
        SlideError, match=r"assume_mpp=0.5 and base_magnification=40 disagree: 40x is 0.25 um/px"
    ):
        SlideReader(path, assume_mpp=0.5, base_magnification=40)
    with pytest.raises(SlideError, match=r"assume_mpp=-1: must be a positive um/px"):
        SlideReader(path, assume_mpp=-1)


def test_the_same_tissue_at_any_scan_resolution(tmp_path, tiled_tiff):
    """One tissue scanned at 0.25 and at 0.5 um/px, and as a 40x objective-only SVS: read at
    0.5 um/px, the same physical region gives the same pixels."""
    fine = _smooth_tissue(2048, seed=3)
    coarse = np.asarray(Image.fromarray(fine).reduce(2))  # 0.5 um/px
    at_025 = tiled_tiff("a025.tiff", fine, mpp=0.25, compression="deflate")  # one level: resized
    at_05 = tiled_tiff("a05.tiff", coarse, mpp=0.5, compression="deflate")
    objective = _svs(tmp_path / "obj.svs", fine, app_mag=40)
    # 300 um square at (200 um, 260 um): 600 px at 0.5 um/px
    patches = {}
    for name, path, base in [("025", at_025, 0.25), ("05", at_05, 0.5), ("obj", objective, 0.25)]:
        with SlideReader(path) as r:
            x, y = round(200 / base), round(260 / base)
            where = r.footprint(600, mpp=0.5)
            assert where.extent == (round(300 / base),) * 2 and where.mpp == (0.5, 0.5)
            patches[name] = r.read_region(x, y, 600, mpp=0.5).astype(int)
            assert r.read_region(x, y, 600, 20).shape == (600, 600, 3)  # 20x is the same target
    assert np.abs(patches["025"] - patches["05"]).mean() < 1.5
    assert np.abs(patches["obj"] - patches["05"]).mean() < 1.5
    # A wrong scale does not agree: the fine scan read at its own 0.25 um/px covers half of it.
    with SlideReader(at_025) as r:
        wrong = r.read_region(800, 1040, 600, mpp=0.25).astype(int)
    assert np.abs(wrong - patches["05"]).mean() > 10


def test_anisotropic_pixels_give_square_patches(tmp_path):
    """0.25 um/px across, 0.5 um/px down: a patch at 0.5 um/px covers twice the level-0 px in
    x as in y, and shows the same tissue as an isotropic scan."""
    import tifffile

    iso = _smooth_tissue(1024, seed=5)  # 0.5 um/px both ways
    stretched = np.asarray(Image.fromarray(iso).resize((2048, 1024), Image.Resampling.BICUBIC))
    path = tmp_path / "aniso.tiff"
    tifffile.imwrite(path, stretched, tile=(256, 256), photometric="rgb", compression="zlib",
                     resolution=(1e4 / 0.25, 1e4 / 0.5), resolutionunit="CENTIMETER")  # fmt: skip
    with SlideReader(path) as r:
        assert (r.info.mpp_x, r.info.mpp_y) == (pytest.approx(0.25), pytest.approx(0.5))
        assert r.size_at(mpp=0.5) == (1024, 1024) and r.size_at(mpp=1.0) == (512, 512)
        where = r.footprint(256, mpp=0.5)
        assert (where.extent, where.read_size) == ((512, 256), (512, 256))
        assert where.mpp == (pytest.approx(0.5), pytest.approx(0.5))
        patch = r.read_region(400, 300, 256, mpp=0.5)
        assert patch.shape == (256, 256, 3)
        assert r.thumbnail(mpp=4.0).shape == (128, 128, 3)
    assert np.abs(patch.astype(int) - iso[300:556, 200:456]).mean() < 2.0


def test_plain_images_read_as_one_level_slides(slides_dir, testdata, tmp_path):
    kidney = slides_dir / "kidney-48-5.tif"  # a strip TIFF OpenSlide refuses, no resolution
    with pytest.raises(
        SlideError, match=r"kidney-48-5.tif: pixel size and base magnification unknown"
    ) as err:
        SlideReader(kidney)
    assert str(err.value).count("\n") == 0
    with SlideReader(kidney, assume_mpp=0.5) as r:
        assert (r.info.vendor, r.info.dimensions, r.info.level_count) == ("image", (1493, 901), 1)
        import tifffile

        whole = tifffile.imread(kidney)
        np.testing.assert_array_equal(r.read_region(100, 200, 64, mpp=0.5), whole[200:264, 100:164])
        assert r.read_region(1480, 890, 32, mpp=0.5)[20:, 20:].min() == 255  # outside: white
        assert r.thumbnail(mpp=8.0).shape == (56, 93, 3)
    # A PNG's pHYs (PIL: dpi) is its resolution: 50800 dpi is 0.5 um/px. RGBA flattens on white.
    tile = np.asarray(Image.open(testdata / "tiles" / "tissue-level0-4302-10273-4814-10785.png"))
    Image.fromarray(tile).save(tmp_path / "t.png", dpi=(50800, 50800))
    Image.fromarray(tile[..., :3]).save(tmp_path / "t.jpg", dpi=(25400, 25400), quality=95)
    with SlideReader(tmp_path / "t.png") as r:
        assert (r.info.mpp_x, r.info.mpp_source) == (pytest.approx(0.5), "tiff-resolution")
        np.testing.assert_array_equal(
            r.read_region(0, 0, 512, mpp=0.5), flatten_rgba(Image.fromarray(tile))
        )
    with SlideReader(tmp_path / "t.jpg") as r:
        assert (r.info.mpp_x, r.info.dimensions) == (pytest.approx(1.0), (512, 512))
        assert r.read_region(0, 0, 256, mpp=2.0).shape == (256, 256, 3)
    Image.fromarray(tile).save(tmp_path / "plain.png")  # no pHYs: needs assume_mpp
    with pytest.raises(SlideError, match="plain.png: pixel size and base magnification unknown"):
        SlideReader(tmp_path / "plain.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(SlideError, match="bad.png: cannot read the image"):
        SlideReader(tmp_path / "bad.png", assume_mpp=0.5)


def test_target_mpp_and_magnification_alias():
    from histokd.slides import resolve_target_mpp

    assert resolve_target_mpp(None, None) == 0.5  # RCKD's 20x
    assert resolve_target_mpp(None, 40) == 0.25 and resolve_target_mpp(0.3, None) == 0.3
    assert resolve_target_mpp(0.5, 20) == 0.5
    with pytest.raises(
        ValueError, match=r"mpp=0.25 and magnification=20 disagree: 20x is 0.5 um/px"
    ):
        resolve_target_mpp(0.25, 20)
    with pytest.raises(ValueError, match=r"mpp=0: must be positive"):
        resolve_target_mpp(0, None)
