"""The weight-free teacher: haematoxylin from colour deconvolution."""

from __future__ import annotations

import numpy as np
import pytest

from histokd.teachers import build_teacher
from histokd.teachers.base import TeacherError
from histokd.teachers.deconvolution import DeconvolutionTeacher
from histokd.teachers.quality import binary_iou


def test_glass_has_no_nuclei():
    teacher = DeconvolutionTeacher()
    white = np.full((2, 32, 32, 3), 245, np.uint8)
    assert teacher.pseudo_label(white).sum() == 0
    assert teacher.probability(white).max() < 0.01


def test_haematoxylin_blue_is_nuclei_eosin_pink_is_not():
    teacher = DeconvolutionTeacher()
    patch = np.zeros((1, 32, 64, 3), np.uint8)
    patch[0, :, :32] = (60, 40, 120)  # dark haematoxylin purple
    patch[0, :, 32:] = (235, 150, 200)  # eosin pink
    prob = teacher.probability(patch)
    assert prob.dtype == np.float32 and prob.shape == (1, 32, 64)
    assert prob[0, :, :24].min() > 0.99 and prob[0, :, 40:].max() < 0.01
    assert 0 <= prob.min() and prob.max() <= 1


def test_alpha_is_the_density_midpoint():
    teacher = DeconvolutionTeacher(sigma=0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    density = teacher.haematoxylin_density(images)
    assert np.array_equal(
        teacher.pseudo_label(images), (density >= teacher.density_midpoint).astype(np.uint8)
    )
    # a lower alpha marks a superset
    low = DeconvolutionTeacher(alpha=0.1, sigma=0).pseudo_label(images)
    assert np.all(low >= teacher.pseudo_label(images))


def test_instances_mode_refused():
    with pytest.raises(TeacherError, match="mask_mode='instances'.*allowed: 'probability'"):
        DeconvolutionTeacher(mask_mode="instances")


def test_finds_synthetic_nuclei(held_out_slides):
    """The demo slides are drawn with the Beer-Lambert model deconvolution inverts."""
    from histokd.slides import SlideReader

    slide = held_out_slides[0]
    with SlideReader(slide.slide_path) as reader:
        image = reader.read_region(0, 0, 1024, 20)
    truth = slide.read_truth(0, 0, 1024, 1024) > 0
    labels = build_teacher("deconvolution").pseudo_label(image)[0]
    assert binary_iou(labels, truth) > 0.5


def test_nuclei_score_order_on_real_tiles(nuclei_score_chains, nuclei_score_order):
    nuclei_score_order(build_teacher("deconvolution"), nuclei_score_chains)
