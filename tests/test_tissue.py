"""The tissue rule on real H&E tiles."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from histokd.tissue import TissueFilter, is_tissue_patch, mean_intensity, passes_intensity_rule


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
