"""The tile lattice and the tissue selection, on tiled TIFFs with a known tissue rectangle."""

from __future__ import annotations

import numpy as np
import pytest

from histokd.inference import lattice, plan_tiles
from histokd.slides import SlideError
from histokd.tissue import TissueFilter

PINK = (200, 100, 180)  # hue 312 degrees: inside the default H&E range


def test_lattice_covers_every_pixel_and_starts_inside():
    for width, height, extent, stride in [
        (1000, 700, 256, 256),
        (1000, 700, 256, 192),
        (100, 50, 256, 192),
        (512, 512, 256, 256),
    ]:
        xs, ys = lattice(width, height, extent, stride)
        covered = np.zeros((height, width), bool)
        for x, y in zip(xs, ys, strict=True):
            covered[y : y + extent, x : x + extent] = True
        assert covered.all()
        assert (xs < width).all() and (ys < height).all()
        assert (xs % stride == 0).all() and (ys % stride == 0).all()
    xs, ys = lattice(512, 512, 256, 256)
    assert len(xs) == 4  # exactly fitting: no extra row or column
    assert list(zip(xs[:3], ys[:3], strict=True)) == [(0, 0), (256, 0), (0, 256)]  # row-major
    with pytest.raises(ValueError, match="need 1 <= stride <= extent"):
        lattice(100, 100, 64, 65)


@pytest.fixture
def tissue_rectangle_slide(tiled_tiff):
    """1024 x 768 white glass with a 'tissue' rectangle x in [256, 768), y in [128, 512), 20x (0.5 um/px)."""

    def make(mpp: float = 0.5, scale: int = 1):
        image = np.full((768 * scale, 1024 * scale, 3), 255, np.uint8)
        image[128 * scale : 512 * scale, 256 * scale : 768 * scale] = PINK
        return tiled_tiff(f"rect_{mpp}.tiff", image, mpp=mpp, levels=3, compression="deflate")

    return make


def test_tissue_tiles_are_those_over_the_tissue(tissue_rectangle_slide):
    path = tissue_rectangle_slide()
    every = plan_tiles(
        str(path), magnification=20, patch_size=128, tissue=TissueFilter(min_tissue_fraction=0)
    )
    assert (every.extent, every.stride, every.grid_shape, len(every)) == (128, 128, (8, 6), 48)
    assert np.isnan(every.tissue_fraction).all()  # no mask computed without a threshold
    kept = plan_tiles(
        str(path), magnification=20, patch_size=128, tissue=TissueFilter(min_tissue_fraction=0.5)
    )
    expected = {(x, y) for x in range(256, 768, 128) for y in range(128, 512, 128)}
    assert set(zip(kept.xs.tolist(), kept.ys.tolist(), strict=True)) == expected
    assert kept.tissue_fraction.min() > 0.9
    half = plan_tiles(
        str(path),
        magnification=10,
        patch_size=128,
        overlap=0.5,
        tissue=TissueFilter(min_tissue_fraction=0.2),
    )
    assert (half.extent, half.stride) == (256, 128)
    assert all(
        x + 256 > 256 and x < 768 and y + 256 > 128 and y < 512
        for x, y in zip(half.xs, half.ys, strict=True)
    )


def test_a_40x_scan_gives_tiles_of_twice_the_level0_extent(tissue_rectangle_slide):
    path = tissue_rectangle_slide(mpp=0.25, scale=2)
    kept = plan_tiles(
        str(path), magnification=20, patch_size=128, tissue=TissueFilter(min_tissue_fraction=0.5)
    )
    assert kept.base_magnification == 40 and kept.extent == 256
    expected = {(2 * x, 2 * y) for x in range(256, 768, 128) for y in range(128, 512, 128)}
    assert set(zip(kept.xs.tolist(), kept.ys.tolist(), strict=True)) == expected


def test_slide_errors_name_the_file(tmp_path, tissue_rectangle_slide):
    with pytest.raises(SlideError, match=r"missing\.svs: file not found"):
        plan_tiles(str(tmp_path / "missing.svs"), 20, 128)
    with pytest.raises(SlideError, match=r"magnification=40x is above the scan's 20x"):
        plan_tiles(str(tissue_rectangle_slide()), 40, 128)
    with pytest.raises(ValueError, match=r"overlap=1: must be in \[0, 1\)"):
        plan_tiles(str(tissue_rectangle_slide()), 20, 128, overlap=1)
