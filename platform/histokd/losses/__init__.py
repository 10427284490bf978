"""Losses, one small module each, citing their equations."""

from histokd.losses.pixel_ce import pixel_cross_entropy

__all__ = ["pixel_cross_entropy"]
