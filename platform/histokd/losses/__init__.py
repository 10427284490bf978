"""Losses, one small module each, citing their equations."""

from histokd.losses.focal import FOCAL_ALPHA, FOCAL_GAMMA, focal_loss
from histokd.losses.pixel_ce import pixel_cross_entropy
from histokd.losses.resolution_kd import ResolutionKDLoss, pixel_loss, resolution_kd_loss, soft_loss

__all__ = [
    "FOCAL_ALPHA",
    "FOCAL_GAMMA",
    "ResolutionKDLoss",
    "focal_loss",
    "pixel_cross_entropy",
    "pixel_loss",
    "resolution_kd_loss",
    "soft_loss",
]
