"""RCKD Eq. 3 against hand-computed values."""

import math

import pytest
import torch

from histokd.losses import pixel_cross_entropy


def test_matches_hand_computation():
    # One image, 1 x 2 pixels, two classes.
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (N=1, C=2, H=1, W=2)
    target = torch.tensor([[[0, 1]]])
    # pixel 1: -log(e^2 / (e^2 + 1)); pixel 2: -log(e / (1 + e)); Eq. 3 averages them.
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.e / (1 + math.e))) / 2
    assert pixel_cross_entropy(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_batch_mean_of_per_image_means():
    torch.manual_seed(0)
    logits, target = torch.randn(3, 2, 4, 5), torch.randint(0, 2, (3, 4, 5))
    per_image = [pixel_cross_entropy(logits[i : i + 1], target[i : i + 1]) for i in range(3)]
    assert pixel_cross_entropy(logits, target).item() == pytest.approx(
        torch.stack(per_image).mean().item(), rel=1e-6
    )


def test_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="decoder must output at the label's size"):
        pixel_cross_entropy(torch.zeros(1, 2, 4, 4), torch.zeros(1, 8, 8, dtype=torch.long))
