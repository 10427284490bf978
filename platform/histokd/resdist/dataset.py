"""Region images for training and evaluation: one variable-size image at a time.

DiPalma et al. 2021 feed whole tissue regions of their native size, one at a time, and
accumulate gradients over them (Sec. 3.5), so there is no batching here: an item is one region
at one or more magnifications (the teacher's and the student's, for distillation), with the same
augmentation drawn once and applied to each, so the two views stay aligned for the pixel loss.

Augmentation (Sec. 3.2; strengths from the public code, ``../shared/RESOLUTION_KD.md``): colour
jitter with brightness, contrast and saturation factors in [0.5, 1.5] and a hue shift in
[-0.2, 0.2], in a random order as torchvision's ``ColorJitter`` applies them; horizontal and
vertical flips; rotations by multiples of 90 degrees (exact for any image size, where other
angles would need padding). Every image is then standardised with the per-channel mean and
standard deviation of its magnification's training set (Sec. 3.2, 4.5).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = [
    "AugmentParams",
    "ColorJitter",
    "RegionImages",
    "apply_augment",
    "channel_stats",
    "draw_augment",
    "load_rgb",
]


@dataclass(frozen=True)
class ColorJitter:
    """Colour jitter strengths (public code: 0.5, 0.5, 0.5, 0.2)."""

    brightness: float = 0.5
    contrast: float = 0.5
    saturation: float = 0.5
    hue: float = 0.2


@dataclass(frozen=True)
class AugmentParams:
    """One draw of the augmentation, applied identically to every view of a region."""

    rotations: int
    flip_horizontal: bool
    flip_vertical: bool
    brightness: float
    contrast: float
    saturation: float
    hue: float
    order: tuple[int, ...]


def draw_augment(generator: torch.Generator, jitter: ColorJitter | None) -> AugmentParams:
    """Random augmentation parameters (no colour change when ``jitter`` is None)."""

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    rotations = int(torch.randint(0, 4, (), generator=generator))
    flips = torch.randint(0, 2, (2,), generator=generator).tolist()
    order = tuple(torch.randperm(4, generator=generator).tolist())
    if jitter is None:
        return AugmentParams(rotations, bool(flips[0]), bool(flips[1]), 1.0, 1.0, 1.0, 0.0, order)
    return AugmentParams(
        rotations, bool(flips[0]), bool(flips[1]),
        uniform(max(0.0, 1 - jitter.brightness), 1 + jitter.brightness),
        uniform(max(0.0, 1 - jitter.contrast), 1 + jitter.contrast),
        uniform(max(0.0, 1 - jitter.saturation), 1 + jitter.saturation),
        uniform(-jitter.hue, jitter.hue), order,
    )  # fmt: skip


def apply_augment(image: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Apply one draw to a ``3 x H x W`` float image in [0, 1]."""
    from histokd.compat import ensure_torchvision

    ensure_torchvision()
    from torchvision.transforms.v2 import functional as TF

    if params.rotations:
        image = torch.rot90(image, params.rotations, (-2, -1))
    if params.flip_horizontal:
        image = image.flip(-1)
    if params.flip_vertical:
        image = image.flip(-2)
    for op in params.order:
        if op == 0 and params.brightness != 1.0:
            image = TF.adjust_brightness(image, params.brightness)
        elif op == 1 and params.contrast != 1.0:
            image = TF.adjust_contrast(image, params.contrast)
        elif op == 2 and params.saturation != 1.0:
            image = TF.adjust_saturation(image, params.saturation)
        elif op == 3 and params.hue != 0.0:
            image = TF.adjust_hue(image, params.hue)
    return image.contiguous()


def load_rgb(path: str) -> np.ndarray:
    """An RGB uint8 image file as ``H x W x 3``."""
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def channel_stats(paths: Sequence[str]) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation over all pixels of the images, in [0, 1].

    Every pixel counts once, so large regions weigh more (the statistics of the training set's
    pixels, DiPalma Sec. 3.2).
    """
    if not paths:
        raise ValueError("channel_stats: no images")
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for path in paths:
        pixels = load_rgb(path).reshape(-1, 3).astype(np.float64) / 255.0
        total += pixels.sum(0)
        total_sq += (pixels**2).sum(0)
        count += len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
    return mean.tolist(), std.tolist()


class RegionImages(torch.utils.data.Dataset):
    """Regions at one or more magnifications, standardised, optionally augmented.

    Args:
        items: ``{"region_id", "label", "paths": {mag tag: file}}`` dicts
            (:meth:`RegionSet.items`).
        views: Magnification tags to return, in order (e.g. ``["10x", "2.5x"]``).
        stats: ``{mag tag: (mean, std)}`` of the training set, for each view.
        augment: Draw an augmentation per item.
        jitter: Colour jitter strengths when augmenting (None: geometry only).
        seed: Seed of the augmentation; item i of epoch e uses ``(seed, e, i)``.
        cache: Keep the decoded images in memory.

    Each item is ``{"images": [3 x H x W float tensor per view], "label": int, "index": int}``.
    """

    def __init__(
        self,
        items: Sequence[Mapping[str, Any]],
        views: Sequence[str],
        stats: Mapping[str, tuple[Sequence[float], Sequence[float]]],
        augment: bool = False,
        jitter: ColorJitter | None = ColorJitter(),
        seed: int = 0,
        cache: bool = True,
    ) -> None:
        missing = [v for v in views if v not in stats]
        if missing:
            raise ValueError(f"RegionImages: no normalisation statistics for {missing}")
        for item in items:
            lacking = [v for v in views if v not in item["paths"]]
            if lacking:
                raise ValueError(
                    f"RegionImages: region {item['region_id']} has no image at {lacking}"
                )
        self.items = list(items)
        self.views = list(views)
        self.stats = {
            v: (
                torch.tensor(stats[v][0], dtype=torch.float32).view(3, 1, 1),
                torch.tensor(stats[v][1], dtype=torch.float32).view(3, 1, 1),
            )
            for v in self.views
        }
        self.augment = augment
        self.jitter = jitter
        self.seed = seed
        self.epoch = 0
        self.cache = cache
        self._cache: dict[tuple[int, str], np.ndarray] = {}

    def set_epoch(self, epoch: int) -> None:
        """Augmentations differ from epoch to epoch and are reproducible."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def _image(self, index: int, view: str) -> np.ndarray:
        key = (index, view)
        if key in self._cache:
            return self._cache[key]
        image = load_rgb(self.items[index]["paths"][view])
        if self.cache:
            self._cache[key] = image
        return image

    def __getitem__(self, index: int) -> dict[str, Any]:
        params = None
        if self.augment:
            state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(
                2, dtype=np.uint32
            )
            generator = torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
            params = draw_augment(generator, self.jitter)
        images = []
        for view in self.views:
            image = torch.from_numpy(self._image(index, view)).permute(2, 0, 1).float() / 255.0
            if params is not None:
                image = apply_augment(image, params)
            mean, std = self.stats[view]
            images.append((image - mean) / std)
        return {"images": images, "label": int(self.items[index]["label"]), "index": index}
