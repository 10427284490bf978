"""Tissue regions and their Lanczos downsampling from the original (DiPalma Sec. 4.1-4.2)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from histokd.resdist.regions import (
    RegionFinder,
    TissueRegion,
    find_tissue_regions,
    lanczos_resize,
    magnification_tag,
    read_region_magnifications,
    scaled_size,
)
from histokd.slides import SlideError, SlideReader

MAGS = [10.0, 5.0, 2.5, 1.25, 0.625]


def _texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A stained-looking, detailed RGB image (so that resampling differences show)."""
    rng = np.random.default_rng(seed)
    base = np.array([200, 110, 185], dtype=np.float64)
    noise = rng.normal(0, 30, size=(height, width, 1))
    return np.clip(base + noise * np.array([1.0, 0.8, 0.6]), 0, 255).astype(np.uint8)


@pytest.fixture
def scan_20x(tiled_tiff):
    """A 1000 x 600 px, 20x (0.5 um/px) lossless pyramid of 3 levels."""
    image = _texture(600, 1000)
    return tiled_tiff("scan.tif", image, mpp=0.5, levels=3, compression="zlib"), image


def test_scaled_size_rounds_half_up():
    assert scaled_size(1000, 600, 16) == (63, 38)  # 62.5 and 37.5
    assert scaled_size(1000, 600, 32) == (31, 19)  # 31.25 and 18.75
    assert scaled_size(3, 2, 64) == (1, 1)  # never below one pixel
    with pytest.raises(ValueError, match="downsample"):
        scaled_size(10, 10, 0)


def test_expected_sizes_at_each_magnification(scan_20x):
    path, _ = scan_20x
    with SlideReader(path) as reader:
        assert reader.info.base_magnification == 20.0
        whole = TissueRegion(str(path), 0, 0, 0, 1000, 600, 20.0)
        images = read_region_magnifications(reader, whole, MAGS)
        sizes = {mag: (im.shape[1], im.shape[0]) for mag, im in images.items()}
        assert sizes == {
            10.0: (500, 300),
            5.0: (250, 150),
            2.5: (125, 75),
            1.25: (63, 38),
            0.625: (31, 19),
        }
        odd = TissueRegion(str(path), 1, 100, 50, 333, 201, 20.0)
        images = read_region_magnifications(reader, odd, MAGS)
        assert {m: (im.shape[1], im.shape[0]) for m, im in images.items()} == {
            10.0: (167, 101),
            5.0: (83, 50),
            2.5: (42, 25),
            1.25: (21, 13),
            0.625: (10, 6),
        }
        assert all(im.dtype == np.uint8 and im.shape[2] == 3 for im in images.values())
        assert odd.size_at(2.5) == (42, 25)


def test_every_magnification_is_lanczos_from_the_original(scan_20x):
    path, original = scan_20x
    region = TissueRegion(str(path), 0, 0, 0, 1000, 600, 20.0)
    with SlideReader(path) as reader:
        images = read_region_magnifications(reader, region, MAGS)
    for mag, image in images.items():
        size = region.size_at(mag)
        direct = np.asarray(Image.fromarray(original).resize(size, Image.Resampling.LANCZOS))
        assert np.array_equal(image, direct), f"{mag}x is not a single Lanczos step from level 0"
    # a composition of downsamplings (20x -> 10x -> ... -> 1.25x) gives other pixels
    composed = original
    for mag in (10.0, 5.0, 2.5, 1.25):
        composed = lanczos_resize(composed, region.size_at(mag))
    assert not np.array_equal(composed, images[1.25])


def test_large_regions_fall_back_to_the_highest_magnification(scan_20x, caplog):
    path, original = scan_20x
    region = TissueRegion(str(path), 0, 0, 0, 1000, 600, 20.0)
    with SlideReader(path) as reader:
        images = read_region_magnifications(reader, region, [10.0, 2.5], max_source_pixels=1000)
    assert "max_source_pixels" in caplog.text
    assert images[10.0].shape == (300, 500, 3) and images[2.5].shape == (75, 125, 3)


def test_magnification_above_the_scan_is_refused(scan_20x):
    path, _ = scan_20x
    with SlideReader(path) as reader, pytest.raises(SlideError, match="above the scan"):
        read_region_magnifications(reader, TissueRegion(str(path), 0, 0, 0, 100, 100, 20.0), [40.0])


def test_magnification_tags():
    assert [magnification_tag(m) for m in MAGS] == ["10x", "5x", "2.5x", "1.25x", "0.625x"]


def test_tissue_regions_are_the_boxes_of_the_tissue_pieces(tiled_tiff):
    image = np.full((800, 1200, 3), 245, np.uint8)
    pieces = [(160, 160, 480, 400), (700, 480, 1040, 720)]  # x0, y0, x1, y1 at level 0 (20x)
    for x0, y0, x1, y1 in pieces:
        image[y0:y1, x0:x1] = _texture(y1 - y0, x1 - x0, seed=x0)
    image[40:60, 1100:1120] = (200, 100, 180)  # a 10 x 10 um speck: below min_area_um2
    path = tiled_tiff("blobs.tif", image, mpp=0.5, levels=2, compression="zlib")
    regions = find_tissue_regions(path)
    assert len(regions) == 2
    # row-major order of the corners; each box holds its piece with at most 8 um padding plus
    # one thumbnail pixel (16 level-0 px at 1.25x) on every side
    for region, (x0, y0, x1, y1) in zip(regions, pieces, strict=True):
        assert region.x <= x0 and region.y <= y0
        assert region.x + region.width >= x1 and region.y + region.height >= y1
        assert x0 - region.x <= 16 + 16 and y0 - region.y <= 16 + 16
        assert region.x + region.width - x1 <= 32 and region.y + region.height - y1 <= 32
        assert region.base_magnification == 20.0 and 0.7 < region.tissue_fraction <= 1.0
    assert [r.region_id for r in regions] == ["blobs-r000", "blobs-r001"]
    # a smaller minimum area keeps the speck too
    assert len(find_tissue_regions(path, RegionFinder(min_area_um2=10.0))) == 3
    blank = tiled_tiff("blank.tif", np.full((256, 256, 3), 245, np.uint8), mpp=0.5)
    assert find_tissue_regions(blank) == []


def test_region_finder_settings_are_checked():
    with pytest.raises(ValueError, match="min_area_um2"):
        RegionFinder(min_area_um2=-1)
    with pytest.raises(ValueError, match="thumbnail_magnification"):
        RegionFinder(thumbnail_magnification=0)
