"""The teacher contract: settings, input checks and RCKD Eq. 2."""

from __future__ import annotations

import numpy as np
import pytest

from histokd.teachers.base import (
    PAPER_ALPHA,
    Teacher,
    TeacherError,
    TeacherSettings,
    ThresholdTeacher,
    check_images,
)


class RampTeacher(ThresholdTeacher):
    """Probability = red channel / 255: Eq. 2 can be checked by hand."""

    kind = "ramp"

    def probability(self, images):
        return check_images(images)[..., 0].astype(np.float32) / 255


def test_paper_alpha_is_the_default():
    assert PAPER_ALPHA == 0.5
    assert TeacherSettings().alpha == 0.5 and TeacherSettings().mask_mode == "probability"


@pytest.mark.parametrize("alpha", [0, -0.1, 1.5, "0.5", True, None])
def test_bad_alpha_names_field_and_range(alpha):
    with pytest.raises(TeacherError, match=r"alpha=.*\(0, 1\]"):
        TeacherSettings(alpha=alpha)


def test_bad_mask_mode_lists_allowed():
    with pytest.raises(TeacherError, match="mask_mode='nms'.*probability, instances"):
        TeacherSettings(mask_mode="nms")


def test_eq2_threshold_is_inclusive():
    images = np.zeros((1, 1, 4, 3), np.uint8)
    images[0, 0, :, 0] = [0, 127, 128, 255]  # probabilities 0, 0.498, 0.502, 1
    labels = RampTeacher(alpha=0.5).pseudo_label(images)
    assert labels.dtype == np.uint8 and labels.tolist() == [[[0, 0, 1, 1]]]
    exact = np.zeros((1, 1, 1, 3), np.uint8)
    exact[..., 0] = 51  # probability exactly 0.2
    assert RampTeacher(alpha=0.2).pseudo_label(exact).item() == 1  # y >= alpha
    assert isinstance(RampTeacher(), Teacher)
    assert RampTeacher(alpha=0.2).name == "ramp[alpha=0.2]"


def test_instances_mode_unsupported_is_clear():
    with pytest.raises(
        TeacherError, match="mask_mode='instances' is not supported.*allowed: 'probability'"
    ):
        RampTeacher(mask_mode="instances").pseudo_label(np.zeros((1, 4, 4, 3), np.uint8))


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((2, 8, 8), np.uint8), r"shape \(2, 8, 8\).*\(N, H, W, 3\)"),
        (np.zeros((1, 8, 8, 4), np.uint8), r"shape \(1, 8, 8, 4\)"),
        (np.zeros((1, 8, 8, 3), np.float32), "dtype float32.*uint8"),
        (np.zeros((0, 8, 8, 3), np.uint8), "empty batch"),
    ],
)
def test_bad_images_one_clear_error(images, message):
    with pytest.raises(TeacherError, match=message):
        check_images(images)


def test_single_image_is_a_batch_of_one():
    assert check_images(np.zeros((5, 6, 3), np.uint8)).shape == (1, 5, 6, 3)
