"""RCKD Eqs. 5 and 7 (focal loss) against hand-computed values and cross-entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

from histokd.losses import FOCAL_ALPHA, FOCAL_GAMMA, focal_loss

# Two samples, three classes. By hand:
#   sample 1, logits (2, 0, 0), class 0: p_t = e^2 / (e^2 + 2)         = 0.7869860
#       (1 - p_t)^2 = 0.0453749, -log p_t = 0.2395448
#       alpha 0.25:  0.25 * 0.0453749 * 0.2395448                      = 0.0027173
#   sample 2, logits (0, 1, 3), class 1: p_t = e / (1 + e + e^3)       = 0.1141952
#       (1 - p_t)^2 = 0.7846501, -log p_t = 2.1698460
#       alpha 0.25:  0.25 * 0.7846501 * 2.1698460                      = 0.4256425
LOGITS = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
TARGET = torch.tensor([0, 1])
HAND = [0.0027173, 0.4256425]


def test_rckd_defaults():
    assert (FOCAL_ALPHA, FOCAL_GAMMA) == (0.25, 2.0)


def test_classification_matches_hand_computation():
    per_sample = focal_loss(LOGITS, TARGET, reduction="none")
    assert per_sample.tolist() == pytest.approx(HAND, abs=1e-6)
    assert focal_loss(LOGITS, TARGET).item() == pytest.approx(sum(HAND) / 2, abs=1e-6)
    assert focal_loss(LOGITS, TARGET, reduction="sum").item() == pytest.approx(sum(HAND), abs=1e-6)


@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5, 7)])
def test_equals_cross_entropy_at_gamma_0_alpha_1(shape):
    torch.manual_seed(0)
    logits = torch.randn(*shape) * 3
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]))
    expected = F.cross_entropy(logits, target)
    assert focal_loss(logits, target, alpha=1.0, gamma=0.0).item() == pytest.approx(
        expected.item(), rel=1e-6
    )


def test_segmentation_equals_cross_entropy_with_ignored_pixels():
    torch.manual_seed(1)
    logits, target = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    target[0, 0, :] = 255
    expected = F.cross_entropy(logits, target, ignore_index=255)
    got = focal_loss(logits, target, alpha=1.0, gamma=0.0, ignore_index=255)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert (focal_loss(logits, target, ignore_index=255, reduction="none")[0, 0] == 0).all()


def test_segmentation_is_the_per_pixel_focal_term_averaged():
    # Eq. 7 on a 1 x 2 image whose two pixels are the two samples above.
    logits = LOGITS.t().reshape(1, 3, 1, 2)
    target = TARGET.reshape(1, 1, 2)
    assert focal_loss(logits, target).item() == pytest.approx(sum(HAND) / 2, abs=1e-6)


def test_scalar_alpha_scales_and_class_alpha_weights():
    base = focal_loss(LOGITS, TARGET, alpha=1.0, reduction="none")
    assert focal_loss(LOGITS, TARGET, alpha=0.25, reduction="none").tolist() == pytest.approx(
        (0.25 * base).tolist()
    )
    weighted = focal_loss(LOGITS, TARGET, alpha=[0.5, 2.0, 9.0], reduction="none")
    assert weighted.tolist() == pytest.approx([0.5 * base[0].item(), 2.0 * base[1].item()])


def test_gamma_down_weights_easy_samples():
    ce = focal_loss(LOGITS, TARGET, alpha=1.0, gamma=0.0, reduction="none")
    focal = focal_loss(LOGITS, TARGET, alpha=1.0, gamma=2.0, reduction="none")
    ratio = (focal / ce).tolist()
    assert ratio[0] == pytest.approx((1 - 0.7869860) ** 2, rel=1e-5)  # easy: strongly down-weighted
    assert ratio[1] == pytest.approx((1 - 0.1141952) ** 2, rel=1e-5)


def test_gradients_are_finite_for_confident_predictions():
    logits = torch.tensor([[60.0, -60.0], [-60.0, 60.0]], requires_grad=True)
    loss = focal_loss(logits, torch.tensor([0, 0]))
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(logits.grad).all()


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="does not match logits"):
        focal_loss(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        focal_loss(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="gamma"):
        focal_loss(LOGITS, TARGET, gamma=-1)
    with pytest.raises(ValueError, match="alpha has"):
        focal_loss(LOGITS, TARGET, alpha=[1.0, 1.0])
