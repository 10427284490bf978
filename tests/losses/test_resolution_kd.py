"""DiPalma Eqs. 1-3 against values worked out by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from histokd.losses.resolution_kd import (
    ResolutionKDLoss,
    pixel_loss,
    resize_teacher_map,
    resolution_kd_loss,
    soft_loss,
)

# Teacher logits [ln 3, 0]: softmax (0.75, 0.25) at T = 1; student logits [0, 0]: (0.5, 0.5).
LN3 = math.log(3.0)


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def test_soft_loss_is_kl_teacher_to_student_at_t1():
    teacher = torch.tensor([[LN3, 0.0]])
    student = torch.zeros(1, 2)
    # 0.75 ln 1.5 + 0.25 ln 0.5 = 0.130812
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert expected == pytest.approx(0.1308121, abs=1e-6)
    assert float(soft_loss(student, teacher, 1.0)) == pytest.approx(expected, rel=1e-6)


def test_soft_loss_softens_with_t_and_multiplies_by_t_squared():
    teacher = torch.tensor([[LN3, 0.0]])
    student = torch.zeros(1, 2)
    # T = 2: teacher softmax of [ln3 / 2, 0] = (sqrt3, 1) / (sqrt3 + 1) = (0.633975, 0.366025)
    p = [math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1)]
    kl = _kl(p, [0.5, 0.5])
    assert kl == pytest.approx(0.0363408, abs=1e-6)
    value = float(soft_loss(student, teacher, 2.0))
    assert value == pytest.approx(4 * kl, rel=1e-5)  # the T^2 factor of Eq. 2
    assert value == pytest.approx(0.1453631, abs=1e-6)
    # without the factor the loss would shrink as T grows; with it the KL alone is 4x smaller
    assert value / 4 == pytest.approx(kl, rel=1e-5)


def test_soft_loss_is_a_batch_mean_and_zero_for_equal_logits():
    teacher = torch.tensor([[LN3, 0.0], [0.0, 0.0]])
    student = torch.zeros(2, 2)
    first = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert float(soft_loss(student, teacher)) == pytest.approx(first / 2, rel=1e-6)
    logits = torch.randn(3, 4)
    assert float(soft_loss(logits, logits.clone(), 3.0)) == pytest.approx(0.0, abs=1e-6)


# Teacher map 4x4 holding 4 r + c (r, c = 0..3), student map 2x2 of zeros.
TEACHER_MAP = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
STUDENT_MAP = torch.zeros(1, 1, 2, 2)
# g_1, adaptive max-pool to 2x2: the maxima of the four 2x2 blocks.
MAXPOOL = [[5.0, 7.0], [13.0, 15.0]]
# g_2, bicubic (Keys, a = -0.75; align_corners False): output pixels sit at source coordinates
# 0.5 and 2.5; at distance 0.5 the four taps weigh (-0.09375, 0.59375, 0.59375, -0.09375) and
# taps beyond the border repeat the edge. Along one axis of 0, 1, 2, 3:
#   at 0.5: -0.09375*0 + 0.59375*0 + 0.59375*1 - 0.09375*2 = 0.40625
#   at 2.5: -0.09375*1 + 0.59375*2 + 0.59375*3 - 0.09375*3 = 2.59375
# so the map 4 r + c becomes 4 * (0.40625, 2.59375) + (0.40625, 2.59375):
BICUBIC = [[2.03125, 4.21875], [10.78125, 12.96875]]


def _mse(a: list[list[float]], b: list[list[float]]) -> float:
    values = [
        (x - y) ** 2 for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)
    ]
    return sum(values) / len(values)


def test_both_resize_paths_by_hand():
    assert resize_teacher_map(TEACHER_MAP, (2, 2), "maxpool")[0, 0].tolist() == MAXPOOL
    bicubic = resize_teacher_map(TEACHER_MAP, (2, 2), "bicubic")[0, 0]
    assert torch.allclose(bicubic, torch.tensor(BICUBIC), atol=1e-5)


def test_pixel_loss_averages_the_two_paths():
    zeros = [[0.0, 0.0], [0.0, 0.0]]
    mse_max = _mse(MAXPOOL, zeros)  # (25 + 49 + 169 + 225) / 4 = 117
    mse_bic = _mse(BICUBIC, zeros)
    assert mse_max == 117.0
    assert float(pixel_loss(STUDENT_MAP, TEACHER_MAP, ["maxpool"])) == pytest.approx(mse_max)
    assert float(pixel_loss(STUDENT_MAP, TEACHER_MAP, ["bicubic"])) == pytest.approx(
        mse_bic, rel=1e-6
    )
    # Eq. 3: 1/2 (maxpool term + bicubic term)
    assert float(pixel_loss(STUDENT_MAP, TEACHER_MAP)) == pytest.approx(
        (mse_max + mse_bic) / 2, rel=1e-6
    )
    # against a non-zero student the terms differ
    student = torch.tensor([[[[5.0, 4.0], [11.0, 13.0]]]])
    expected = (_mse(MAXPOOL, student[0, 0].tolist()) + _mse(BICUBIC, student[0, 0].tolist())) / 2
    assert float(pixel_loss(student, TEACHER_MAP)) == pytest.approx(expected, rel=1e-6)


def test_public_code_flag_is_the_halved_maxpool_term():
    # the public code's "maxpool+bicubic" mode: only the max-pool MSE, divided by 2
    assert float(
        pixel_loss(STUDENT_MAP, TEACHER_MAP, public_code_maxpool_only=True)
    ) == pytest.approx(117.0 / 2)
    assert float(pixel_loss(STUDENT_MAP, TEACHER_MAP)) != pytest.approx(117.0 / 2)


def test_l1_distance():
    assert float(pixel_loss(STUDENT_MAP, TEACHER_MAP, ["maxpool"], distance="l1")) == pytest.approx(
        (5 + 7 + 13 + 15) / 4
    )


def test_total_is_soft_plus_pixel_and_only_the_student_gets_gradients():
    teacher_logits = torch.tensor([[LN3, 0.0]])
    student_logits = torch.zeros(1, 2, requires_grad=True)
    student_map = torch.zeros(1, 1, 2, 2, requires_grad=True)
    teacher_map = TEACHER_MAP.clone().requires_grad_(True)
    terms = ResolutionKDLoss(temperature=2.0)(
        (student_map, student_logits), (teacher_map, teacher_logits)
    )
    assert float(terms.soft.detach()) == pytest.approx(0.1453631, abs=1e-6)
    assert float(terms.pixel.detach()) == pytest.approx(
        (117.0 + _mse(BICUBIC, [[0, 0], [0, 0]])) / 2, rel=1e-6
    )
    assert float(terms.total.detach()) == pytest.approx(
        float(terms.soft.detach()) + float(terms.pixel.detach()), rel=1e-7
    )
    terms.total.backward()
    assert student_logits.grad is not None and student_map.grad is not None
    assert teacher_map.grad is None  # the teacher is frozen: its outputs are detached
    functional = resolution_kd_loss(
        student_map, student_logits, TEACHER_MAP, teacher_logits, temperature=2.0
    )
    assert float(functional.total.detach()) == pytest.approx(float(terms.total.detach()), rel=1e-7)


def test_teacher_map_larger_by_n_shrinks_to_the_student_size():
    teacher = torch.randn(2, 8, 13, 9)  # rounded, non-integer ratios happen (Sec. 3.3)
    student = torch.randn(2, 8, 4, 3)
    for mode in ("maxpool", "bicubic"):
        assert resize_teacher_map(teacher, student.shape[-2:], mode).shape == student.shape
    assert torch.isfinite(pixel_loss(student, teacher))


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="same N and C"):
        pixel_loss(torch.zeros(1, 4, 2, 2), torch.zeros(1, 8, 4, 4))
    with pytest.raises(ValueError, match="temperature"):
        soft_loss(torch.zeros(1, 2), torch.zeros(1, 2), 0.0)
    with pytest.raises(ValueError, match="resize mode"):
        resize_teacher_map(TEACHER_MAP, (2, 2), "bilinear")
    with pytest.raises(ValueError, match="modes"):
        ResolutionKDLoss(modes=("nearest",))
    with pytest.raises(ValueError, match="distance"):
        pixel_loss(STUDENT_MAP, TEACHER_MAP, distance="huber")
