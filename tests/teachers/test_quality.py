"""Pooled IoU of pseudo labels against true nuclei, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from histokd.teachers.quality import binary_iou, iou_by_alpha


def test_iou_by_alpha_thresholds_ties_as_nucleus():
    # RCKD Eq. 2 is probability >= alpha: the two pixels exactly at 0.5 (and the one at 0.75)
    # are nucleus. With > instead, IoU at 0.5 would be 1/3 and at 0.75 0.
    probability = np.array([[0.25, 0.5], [0.5, 0.75]], np.float32)
    truth = np.array([[0, 1], [1, 1]])
    assert iou_by_alpha(probability, truth, (0.5, 0.75)) == {0.5: 1.0, 0.75: pytest.approx(1 / 3)}


def test_binary_iou_by_hand():
    assert binary_iou(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == pytest.approx(1 / 3)
    assert binary_iou(np.zeros(3), np.zeros(3)) == 1.0  # both empty
    with pytest.raises(
        ValueError, match=r"prediction shape \(2,\) differs from truth shape \(3,\)"
    ):
        binary_iou(np.zeros(2), np.zeros(3))
