"""Pixel metrics against a hand-computed confusion matrix."""

import pytest
import torch

from histokd.metrics import BinaryConfusion, binary_confusion


def test_confusion_and_metrics():
    pred = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    true = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 0]])
    c = binary_confusion(pred, true)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 1, 1, 4)
    assert c.pixel_accuracy == pytest.approx(6 / 8)
    assert c.foreground_iou == pytest.approx(2 / 4)
    assert c.dice == pytest.approx(4 / 6)
    both = c + c
    assert (both.tp, both.tn) == (4, 8) and both.foreground_iou == pytest.approx(0.5)
    assert BinaryConfusion.from_tensor(c.as_tensor()) == c


def test_empty_masks_are_perfect():
    c = binary_confusion(torch.zeros(3, 3), torch.zeros(3, 3))
    assert c.foreground_iou == 1.0 and c.pixel_accuracy == 1.0
