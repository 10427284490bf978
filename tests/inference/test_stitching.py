"""Blend windows and the canvas: overlapping tiles blend without seams; one tile keeps its value."""

from __future__ import annotations

import numpy as np
import pytest

from histokd.inference import NO_LABEL, SlideCanvas, blend_window


@pytest.mark.parametrize("kind", ["cosine", "linear", "none"])
def test_windows_are_positive_symmetric_and_peak_at_the_centre(kind):
    w = blend_window(16, kind)
    assert w.shape == (16, 16) and w.dtype == np.float32
    assert (w > 0).all()
    np.testing.assert_allclose(w, w[::-1, ::-1])
    np.testing.assert_allclose(w, w.T)
    assert w[8, 8] == pytest.approx(w.max())
    if kind == "none":
        assert (w == 1).all()
    else:
        assert w[0, 0] < 0.05 * w.max()


def test_unknown_window_is_refused():
    with pytest.raises(ValueError, match=r"blend='gauss': allowed: cosine, linear, none"):
        blend_window(8, "gauss")


def _two_tiles(blend: str) -> np.ndarray:
    """Tile A says class 0 everywhere, tile B (shifted by 24 of 32 px) says class 1."""
    canvas = SlideCanvas(56, 32, 2, 32, blend)
    a = np.zeros((2, 32, 32), np.float32)
    a[0] = 1
    canvas.add(0, 0, a)
    canvas.add(24, 0, a[::-1])
    return canvas.probabilities()[1, 16]  # P(class 1) along the middle row


def test_overlapping_tiles_blend_without_a_seam():
    profile = {blend: _two_tiles(blend) for blend in ("cosine", "linear", "none")}
    for blend in ("cosine", "linear"):
        p = profile[blend]
        assert p[:24].max() == pytest.approx(0) and p[32:].min() == pytest.approx(
            1
        )  # one tile only
        assert (np.diff(p) >= -1e-6).all()  # rises monotonically through the overlap
        assert np.abs(np.diff(p)).max() < 0.25  # over 8 px, no step
    flat = profile["none"]
    assert np.abs(np.diff(flat)).max() >= 0.5  # a plain mean steps at both tile borders


def test_classification_tiles_paint_their_footprint_and_labels_mark_gaps():
    canvas = SlideCanvas(10, 6, 3, 4, "cosine")
    mean = canvas.add(0, 0, np.array([0.2, 0.7, 0.1]))
    np.testing.assert_allclose(mean, [0.2, 0.7, 0.1])
    canvas.add(8, 2, np.array([0.6, 0.3, 0.1]))  # crosses the right edge: clipped
    probs, labels = canvas.probabilities(), canvas.labels()
    np.testing.assert_allclose(
        probs[:, :4, :4].reshape(3, -1).T, np.tile([0.2, 0.7, 0.1], (16, 1)), rtol=1e-6
    )
    assert (labels[:4, :4] == 1).all() and (labels[2:6, 8:10] == 0).all()
    assert (labels[4:, :8] == NO_LABEL).all() and (probs[:, 4:, :8] == 0).all()
    assert canvas.covered.sum() == 16 + 8


def test_tile_shape_is_checked():
    canvas = SlideCanvas(10, 10, 2, 4)
    with pytest.raises(
        ValueError, match=r"tile probabilities of shape \(2, 5, 5\); expected \(2, 4, 4\)"
    ):
        canvas.add(0, 0, np.zeros((2, 5, 5)))
