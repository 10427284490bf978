"""A teacher without weights: nuclei from the haematoxylin channel of colour deconvolution.

Haematoxylin stains nuclei. Ruifrok & Johnston's colour deconvolution
(``skimage.color.rgb2hed``) separates its optical density from eosin's; a fixed logistic ramp
turns that density into a nuclei probability, so RCKD Eq. 2 (``probability >= alpha``) applies
unchanged. The ramp is centred on a *fixed* density rather than a per-image statistic, so a
patch without nuclei gets (almost) no pseudo label instead of its darkest pixels.

It is the baseline and the fallback when no StarDist weights are at hand, and it shows that the
teacher is pluggable (RCKD Sec. 4 asks for other teachers). It knows nothing about shape:
pen marks with a haematoxylin-like hue come out as nuclei.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter
from skimage.color import rgb2hed

from histokd.teachers.base import (
    PAPER_ALPHA,
    MaskMode,
    TeacherError,
    ThresholdTeacher,
    check_images,
)

__all__ = ["DeconvolutionTeacher"]


class DeconvolutionTeacher(ThresholdTeacher):
    """Nuclei probability as a logistic ramp of the haematoxylin optical density.

    Args:
        alpha: Threshold of RCKD Eq. 2 on the probability (paper: 0.5). At 0.5 a pixel is
            nucleus where its smoothed haematoxylin density is at least ``density_midpoint``.
        mask_mode: Only ``"probability"``: this teacher finds no instances.
        density_midpoint: Haematoxylin optical density (``rgb2hed`` channel 0) where the
            probability is 0.5. 0.06 separates stained nuclei from stroma on H&E at 20-40x.
        density_scale: Width of the ramp in optical density units.
        sigma: Gaussian smoothing of the density, in pixels, against single-pixel speckle.
    """

    kind = "deconvolution"

    def __init__(
        self,
        alpha: float | None = PAPER_ALPHA,
        mask_mode: MaskMode | None = "probability",
        density_midpoint: float = 0.06,
        density_scale: float = 0.01,
        sigma: float = 1.0,
    ):
        if mask_mode not in (None, "probability"):
            raise TeacherError(
                f"deconvolution teacher: mask_mode={mask_mode!r}: allowed: 'probability' "
                "(colour deconvolution finds no instances)"
            )
        super().__init__(alpha=alpha, mask_mode=mask_mode)
        if not density_midpoint > 0:
            raise TeacherError(f"density_midpoint={density_midpoint!r}: must be positive")
        if not density_scale > 0:
            raise TeacherError(f"density_scale={density_scale!r}: must be positive")
        if not sigma >= 0:
            raise TeacherError(f"sigma={sigma!r}: must be >= 0 (0 turns smoothing off)")
        self.density_midpoint = float(density_midpoint)
        self.density_scale = float(density_scale)
        self.sigma = float(sigma)

    def haematoxylin_density(self, images: np.ndarray) -> np.ndarray:
        """Smoothed haematoxylin optical density, float32 (N, H, W)."""
        images = check_images(images, self.kind)
        out = np.empty(images.shape[:3], np.float32)
        for i, image in enumerate(images):
            density = rgb2hed(image)[..., 0]
            if self.sigma > 0:
                density = gaussian_filter(density, self.sigma)
            out[i] = density
        return out

    def probability(self, images: np.ndarray) -> np.ndarray:
        """Logistic ramp of the haematoxylin density: 0.5 at ``density_midpoint``."""
        z = (self.haematoxylin_density(images) - self.density_midpoint) / self.density_scale
        return (1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))).astype(np.float32)
