"""Losses, one small module each, citing their equations."""

from histokd.losses.focal import FOCAL_ALPHA, FOCAL_GAMMA, focal_loss
from histokd.losses.pixel_ce import pixel_cross_entropy

__all__ = ["FOCAL_ALPHA", "FOCAL_GAMMA", "focal_loss", "pixel_cross_entropy"]
