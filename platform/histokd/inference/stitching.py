"""Stitching tile predictions into slide-sized maps, with overlapping tiles blended.

A network's output is least reliable near the border of its input (less context, padding), so
where tiles overlap each one's prediction is weighted by a window that is highest at the tile's
centre and falls towards its edges (TIAToolbox and MONAI's sliding-window inference do the
same): ``cosine`` (a Hann window, sin^2), ``linear`` (a tent) or ``none`` (flat, a plain mean).
The weighted sum and the sum of weights are accumulated per output pixel; their ratio is the
blended class probability, so tile borders do not show. No window reaches exactly 0, so a
pixel seen by one tile only (at the slide's edge) keeps that tile's prediction.

A classification tile adds its class probabilities over its whole footprint, so the same canvas
gives a classification model's heatmap.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["BLEND_WINDOWS", "NO_LABEL", "SlideCanvas", "blend_window"]

BLEND_WINDOWS = ("cosine", "linear", "none")
NO_LABEL = 255  # label-mask value of pixels no tile predicted

BlendWindow = Literal["cosine", "linear", "none"]


def blend_window(size: int, kind: BlendWindow = "cosine") -> np.ndarray:
    """A ``size x size`` float32 weight window, largest at the centre, positive everywhere.

    Args:
        size: Tile side in output pixels.
        kind: ``cosine`` (Hann), ``linear`` (tent) or ``none`` (ones).
    """
    if kind not in BLEND_WINDOWS:
        raise ValueError(f"blend={kind!r}: allowed: {', '.join(BLEND_WINDOWS)}")
    if size < 1:
        raise ValueError(f"window size {size}: must be at least 1")
    t = (np.arange(size, dtype=np.float64) + 0.5) / size  # pixel centres in (0, 1)
    if kind == "cosine":
        profile = np.sin(np.pi * t) ** 2
    elif kind == "linear":
        profile = 1.0 - np.abs(2.0 * t - 1.0)
    else:
        profile = np.ones(size)
    return np.outer(profile, profile).astype(np.float32)


class SlideCanvas:
    """Blended class probabilities of one slide at the output resolution.

    Args:
        width: Output width in pixels.
        height: Output height in pixels.
        num_classes: Classes of the model.
        tile_side: Side of a tile's footprint in output pixels.
        blend: Weight window of overlapping tiles.
    """

    def __init__(
        self,
        width: int,
        height: int,
        num_classes: int,
        tile_side: int,
        blend: BlendWindow = "cosine",
    ):
        if width < 1 or height < 1:
            raise ValueError(f"canvas {width}x{height}: both sides must be at least 1 pixel")
        self.width, self.height = int(width), int(height)
        self.num_classes = int(num_classes)
        self.tile_side = int(tile_side)
        self.window = blend_window(self.tile_side, blend)
        self.weighted = np.zeros((self.num_classes, self.height, self.width), np.float32)
        self.weight = np.zeros((self.height, self.width), np.float32)

    @property
    def nbytes(self) -> int:
        """Memory held by the accumulators."""
        return self.weighted.nbytes + self.weight.nbytes

    def add(self, x: int, y: int, probabilities: np.ndarray) -> np.ndarray:
        """Add one tile at output pixel (x, y).

        Args:
            x: Left edge in output pixels (may be past the right edge for no effect).
            y: Top edge in output pixels.
            probabilities: ``C x S x S`` per-pixel probabilities with S = ``tile_side``
                (segmentation), or ``C`` probabilities of the whole tile (classification).

        Returns:
            The tile's mean probability per class over its part inside the canvas (for a
            classification tile, its probabilities).
        """
        side = self.tile_side
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(self.width, x + side), min(self.height, y + side)
        probabilities = np.asarray(probabilities, np.float32)
        if x1 <= x0 or y1 <= y0:
            return probabilities.reshape(self.num_classes, -1).mean(1)
        window = self.window[y0 - y : y1 - y, x0 - x : x1 - x]
        if probabilities.ndim == 1:
            self.weighted[:, y0:y1, x0:x1] += probabilities[:, None, None] * window
            mean = probabilities
        else:
            if probabilities.shape != (self.num_classes, side, side):
                raise ValueError(
                    f"tile probabilities of shape {probabilities.shape}; expected {(self.num_classes, side, side)}"
                )
            crop = probabilities[:, y0 - y : y1 - y, x0 - x : x1 - x]
            self.weighted[:, y0:y1, x0:x1] += crop * window
            mean = crop.reshape(self.num_classes, -1).mean(1)
        self.weight[y0:y1, x0:x1] += window
        return mean

    @property
    def covered(self) -> np.ndarray:
        """Pixels at least one tile predicted."""
        return self.weight > 0

    def probabilities(self) -> np.ndarray:
        """``C x H x W`` blended probabilities, 0 where no tile predicted."""
        weight = np.where(self.weight > 0, self.weight, 1.0)
        return self.weighted / weight

    def labels(self) -> np.ndarray:
        """``H x W`` uint8 class of the highest blended probability; `NO_LABEL` where none."""
        labels = self.weighted.argmax(0).astype(np.uint8)
        labels[~self.covered] = NO_LABEL
        return labels
