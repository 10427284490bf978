"""Tissue selection: a cheap colour mask for thumbnails, and RCKD's mean-intensity rule.

Two steps keep background out of the manifest without reading it at full resolution:
1. :func:`tissue_mask` on a thumbnail marks pixels that are stained (saturated, not white) and
   of an H&E hue (purple to pink). Green, blue and black pen marks fall outside that hue
   range, so a pen stroke on glass is not tissue.
2. :func:`passes_intensity_rule` on each candidate patch at full resolution: RCKD Sec. 2.1.1
   keeps a patch only if its mean intensity is in [50, 245].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "TissueFilter",
    "is_tissue_patch",
    "mean_intensity",
    "passes_intensity_rule",
    "tissue_fraction",
    "tissue_mask",
]


@dataclass(frozen=True)
class TissueFilter:
    """Thresholds of both tissue-selection steps.

    Attributes:
        min_saturation: Smallest max(RGB) - min(RGB) of a stained pixel (0-255).
        max_gray: Largest mean(RGB) of a tissue pixel; brighter is glass.
        hue_range: Hues in degrees counted as tissue, ``(start, end)``; wraps through 360
            when start > end. The default covers haematoxylin purple to eosin pink; set
            ``(0, 360)`` for IHC or other stains.
        min_tissue_fraction: Smallest fraction of tissue pixels for a patch to be a
            candidate.
        min_mean_intensity: RCKD Sec. 2.1.1: lower bound of a kept patch's mean intensity.
        max_mean_intensity: RCKD Sec. 2.1.1: upper bound of a kept patch's mean intensity.
    """

    min_saturation: float = 20.0
    max_gray: float = 235.0
    hue_range: tuple[float, float] = (250.0, 345.0)
    min_tissue_fraction: float = 0.35
    min_mean_intensity: float = 50.0  # RCKD Sec. 2.1.1
    max_mean_intensity: float = 245.0  # RCKD Sec. 2.1.1

    def __post_init__(self) -> None:
        checks = {
            "min_saturation": 0 <= self.min_saturation <= 255,
            "max_gray": 0 <= self.max_gray <= 255,
            "min_tissue_fraction": 0 <= self.min_tissue_fraction <= 1,
            "min_mean_intensity": 0 <= self.min_mean_intensity <= 255,
            "max_mean_intensity": self.min_mean_intensity <= self.max_mean_intensity <= 255,
        }
        for field, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"TissueFilter.{field}={getattr(self, field)!r}: allowed range is "
                    + ("[0, 1]" if field == "min_tissue_fraction" else "[0, 255]")
                    + (" and at least min_mean_intensity" if field == "max_mean_intensity" else "")
                )
        if len(self.hue_range) != 2 or not all(0 <= h <= 360 for h in self.hue_range):
            raise ValueError(
                f"TissueFilter.hue_range={self.hue_range!r}: two hues in degrees within [0, 360]"
            )


def _hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees, computed in float32 without skimage's full HSV conversion."""
    rgb = rgb.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    cmax = rgb.max(-1)
    delta = cmax - rgb.min(-1)
    safe = np.where(delta == 0, 1.0, delta)
    hue = np.where(
        cmax == r,
        ((g - b) / safe) % 6.0,
        np.where(cmax == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    return hue * 60.0


def tissue_mask(rgb: np.ndarray, params: TissueFilter | None = None) -> np.ndarray:
    """Boolean mask of tissue pixels of an RGB uint8 image (H, W, 3)."""
    params = params or TissueFilter()
    channels_max = rgb.max(-1).astype(np.int16)
    channels_min = rgb.min(-1).astype(np.int16)
    gray = rgb.mean(-1)
    stained = ((channels_max - channels_min) >= params.min_saturation) & (gray <= params.max_gray)
    start, end = params.hue_range
    if (start, end) == (0.0, 360.0) or end - start >= 360:
        return stained
    hue = _hue_degrees(rgb)
    in_range = (hue >= start) & (hue <= end) if start <= end else (hue >= start) | (hue <= end)
    return stained & in_range


def tissue_fraction(rgb: np.ndarray, params: TissueFilter | None = None) -> float:
    """Fraction of tissue pixels in an RGB image."""
    return float(tissue_mask(rgb, params).mean())


def mean_intensity(rgb: np.ndarray) -> float:
    """Mean over all pixels and channels, the quantity of RCKD's rule."""
    return float(rgb.mean())


def passes_intensity_rule(rgb: np.ndarray, params: TissueFilter | None = None) -> bool:
    """RCKD Sec. 2.1.1: keep a patch only if its mean intensity is in [50, 245]."""
    params = params or TissueFilter()
    return params.min_mean_intensity <= mean_intensity(rgb) <= params.max_mean_intensity


def is_tissue_patch(rgb: np.ndarray, params: TissueFilter | None = None) -> bool:
    """Both steps on one full-resolution patch: enough tissue pixels and the mean rule."""
    params = params or TissueFilter()
    return tissue_fraction(rgb, params) >= params.min_tissue_fraction and passes_intensity_rule(
        rgb, params
    )
