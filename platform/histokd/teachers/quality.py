"""How good a pseudo label is: IoU against true nuclei masks, at several alphas.

The IoU is pooled over all pixels of all images (sum of intersections over sum of unions),
so patches with few nuclei count by their area rather than as equal votes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["DEFAULT_ALPHAS", "binary_iou", "iou_by_alpha"]

DEFAULT_ALPHAS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)


def binary_iou(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Pooled IoU of two binary masks of the same shape (1.0 when both are empty).

    Raises:
        ValueError: The shapes differ.
    """
    prediction = np.asarray(prediction).astype(bool)
    truth = np.asarray(truth).astype(bool)
    if prediction.shape != truth.shape:
        raise ValueError(
            f"prediction shape {prediction.shape} differs from truth shape {truth.shape}"
        )
    union = np.count_nonzero(prediction | truth)
    if union == 0:
        return 1.0
    return float(np.count_nonzero(prediction & truth) / union)


def iou_by_alpha(
    probability: np.ndarray, truth: np.ndarray, alphas: Sequence[float] = DEFAULT_ALPHAS
) -> dict[float, float]:
    """Pooled IoU of ``probability >= alpha`` (RCKD Eq. 2) against ``truth`` for each alpha."""
    truth = np.asarray(truth).astype(bool)
    return {float(a): binary_iou(probability >= a, truth) for a in alphas}
