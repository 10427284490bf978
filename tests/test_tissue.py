"""The tissue rule on real H&E tiles."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from histokd.tissue import (
    TissueFilter,
    is_tissue_patch,
    mean_intensity,
    passes_intensity_rule,
    tissue_fraction,
)


def _load(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_tissue_tiles_kept_background_dropped(testdata):
    tiles = sorted((testdata / "tiles").glob("*.png"))
    tissue = [p for p in tiles if p.name.startswith("tissue-")]
    background = [p for p in tiles if p.name.startswith(("no-tissue", "almost-white"))]
    assert len(tissue) == 6 and len(background) == 8
    for p in tissue:
        assert is_tissue_patch(_load(p)), p.name
    for p in background:
        assert not is_tissue_patch(_load(p)), p.name


def test_mean_rule_alone_keeps_blank_glass(testdata):
    # Why the cheap mask is needed: blank glass passes RCKD's [50, 245] rule by itself.
    glass = _load(testdata / "tiles" / "no-tissue.png")
    assert 240 <= mean_intensity(glass) <= 245
    assert passes_intensity_rule(glass)
    assert not is_tissue_patch(glass)


def test_mean_rule_bounds():
    assert not passes_intensity_rule(np.full((8, 8, 3), 49, np.uint8))
    assert passes_intensity_rule(np.full((8, 8, 3), 50, np.uint8))
    assert passes_intensity_rule(np.full((8, 8, 3), 245, np.uint8))
    assert not passes_intensity_rule(np.full((8, 8, 3), 246, np.uint8))
    loose = TissueFilter(max_mean_intensity=250)
    assert passes_intensity_rule(np.full((8, 8, 3), 248, np.uint8), loose)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"min_tissue_fraction": 1.5}, "min_tissue_fraction"),
        ({"min_mean_intensity": 200, "max_mean_intensity": 100}, "max_mean_intensity"),
        ({"hue_range": (0, 400)}, "hue_range"),
    ],
)
def test_bad_thresholds_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"TissueFilter.{field}="):
        TissueFilter(**kwargs)


def test_is_tissue_patch_applies_the_mean_rule():
    """Patches that are tissue by the mask are still dropped outside [50, 245] (RCKD Sec. 2.1.1)."""
    # Faint stain over 3/8 of bright glass: tissue fraction over 0.35, mean intensity over 245.
    faint = np.full((64, 64, 3), 255, np.uint8)
    faint[:, :24] = (240, 212, 242)
    assert tissue_fraction(faint) == 0.375 and mean_intensity(faint) == pytest.approx(246.125)
    assert not is_tissue_patch(faint)
    dark = np.full((64, 64, 3), (60, 20, 60), np.uint8)  # all tissue by the mask, mean 46.7
    assert tissue_fraction(dark) == 1.0 and not is_tissue_patch(dark)
    purple = np.full((64, 64, 3), (150, 80, 140), np.uint8)
    assert is_tissue_patch(purple)


def test_is_tissue_patch_mean_rule_bounds_are_inclusive():
    every_pixel_tissue = TissueFilter(min_saturation=0, max_gray=255, hue_range=(0, 360))
    kept = {
        grey: is_tissue_patch(np.full((8, 8, 3), grey, np.uint8), every_pixel_tissue)
        for grey in (0, 49, 50, 128, 245, 246, 255)
    }
    assert kept == {0: False, 49: False, 50: True, 128: True, 245: True, 246: False, 255: False}
