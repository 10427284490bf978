"""Single-image items with the same augmentation on every view (DiPalma Sec. 3.2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from histokd.resdist.dataset import (
    ColorJitter,
    RegionImages,
    apply_augment,
    channel_stats,
    draw_augment,
)


def _save(path, array) -> str:
    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture
def pair(tmp_path):
    """A smooth 64 x 96 image at '10x' and its 4x Lanczos downsample at '2.5x'."""
    rng = np.random.default_rng(0)
    coarse = (rng.random((8, 12, 3)) * 255).astype(np.uint8)
    big = np.asarray(Image.fromarray(coarse).resize((96, 64), Image.Resampling.BICUBIC))
    small = np.asarray(Image.fromarray(big).resize((24, 16), Image.Resampling.LANCZOS))
    items = [
        {
            "region_id": "r0",
            "label": 2,
            "paths": {
                "10x": _save(tmp_path / "b.png", big),
                "2.5x": _save(tmp_path / "s.png", small),
            },
        }
    ]
    return items, big, small


def _shrink(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return torch.nn.functional.interpolate(image[None], size=size, mode="area")[0]


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def test_views_get_the_same_geometry_and_colour(pair):
    items, big, small = pair
    stats = {"10x": ([0.0] * 3, [1.0] * 3), "2.5x": ([0.0] * 3, [1.0] * 3)}
    dataset = RegionImages(items, ["10x", "2.5x"], stats, augment=True, seed=3)
    shapes = set()
    for epoch in range(12):
        dataset.set_epoch(epoch)
        teacher, student = dataset[0]["images"]
        shapes.add(tuple(teacher.shape[1:]))
        # 4 times fewer pixels per side in every orientation
        assert (teacher.shape[1] // 4, teacher.shape[2] // 4) == tuple(student.shape[1:])
        # the teacher's view, shrunk, is the student's view: same flips, rotation and colours
        shrunk = _shrink(teacher, tuple(student.shape[1:]))
        assert _corr(shrunk, student) > 0.97
        assert float((shrunk - student).abs().mean()) < 0.06
        # a view flipped differently would not match
        assert _corr(shrunk.flip(-1), student) < 0.9
    assert shapes == {(64, 96), (96, 64)}  # rotations by 90 degrees were drawn
    dataset.set_epoch(5)
    assert torch.equal(dataset[0]["images"][0], dataset[0]["images"][0])  # reproducible per epoch
    dataset.set_epoch(6)
    other = dataset[0]["images"][0]
    dataset.set_epoch(5)
    assert other.shape != dataset[0]["images"][0].shape or not torch.equal(
        other, dataset[0]["images"][0]
    )


def test_colour_jitter_is_shared_and_within_the_public_code_ranges():
    generator = torch.Generator().manual_seed(0)
    draws = [draw_augment(generator, ColorJitter()) for _ in range(200)]
    assert all(
        0.5 <= d.brightness <= 1.5 and 0.5 <= d.contrast <= 1.5 and 0.5 <= d.saturation <= 1.5
        for d in draws
    )
    assert all(-0.2 <= d.hue <= 0.2 for d in draws)
    assert max(d.hue for d in draws) > 0.15 and min(d.hue for d in draws) < -0.15
    flat = draw_augment(generator, None)
    assert (flat.brightness, flat.contrast, flat.saturation, flat.hue) == (1.0, 1.0, 1.0, 0.0)
    image = torch.rand(3, 8, 8)
    params = draws[0]
    assert torch.equal(apply_augment(image, params), apply_augment(image.clone(), params))


def test_standardised_with_the_training_statistics(pair, tmp_path):
    items, big, _ = pair
    mean, std = channel_stats([items[0]["paths"]["10x"]])
    pixels = big.reshape(-1, 3) / 255.0
    assert np.allclose(mean, pixels.mean(0), atol=1e-9) and np.allclose(
        std, pixels.std(0), atol=1e-9
    )
    dataset = RegionImages(items, ["10x"], {"10x": (mean, std)}, augment=False)
    image = dataset[0]["images"][0]
    assert torch.allclose(image.mean((1, 2)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(image.std((1, 2), unbiased=False), torch.ones(3), atol=1e-4)
    assert dataset[0]["label"] == 2
    # pixel-weighted over images: a second, constant image shifts the mean by its share
    flat = _save(tmp_path / "flat.png", np.zeros((64, 96, 3), np.uint8))
    mean2, _ = channel_stats([items[0]["paths"]["10x"], flat])
    assert np.allclose(mean2, np.array(mean) / 2)


def test_missing_views_and_statistics_are_named(pair):
    items, _, _ = pair
    with pytest.raises(ValueError, match="statistics"):
        RegionImages(items, ["10x"], {})
    with pytest.raises(ValueError, match="no image at"):
        RegionImages(items, ["5x"], {"5x": ([0] * 3, [1] * 3)})
    with pytest.raises(ValueError, match="no images"):
        channel_stats([])
