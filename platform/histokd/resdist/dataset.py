"""Region images for training and evaluation: one variable-size image at a time.

DiPalma Sec. 3.5: whole regions of native size, one at a time; an item is one region at the
teacher's and the student's magnification with the same augmentation (Sec. 3.2: colour jitter
in torchvision's random order, flips, 90-degree rotations), standardised per magnification.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["AugmentParams", "ColorJitter", "RegionImages", "apply_augment", "channel_stats", "draw_augment",
           "load_rgb"]  # fmt: skip


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
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    order: tuple[int, ...] = (0, 1, 2, 3)


def draw_augment(generator: torch.Generator, jitter: ColorJitter | None) -> AugmentParams:
    """Random augmentation parameters (no colour change when ``jitter`` is None)."""

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    rotations = int(torch.randint(0, 4, (), generator=generator))
    flips = [bool(f) for f in torch.randint(0, 2, (2,), generator=generator).tolist()]
    order = tuple(torch.randperm(4, generator=generator).tolist())
    if jitter is None:
        return AugmentParams(rotations, *flips, order=order)
    factors = [uniform(max(0.0, 1 - s), 1 + s) for s in (jitter.brightness, jitter.contrast, jitter.saturation)]  # fmt: skip
    return AugmentParams(rotations, *flips, *factors, uniform(-jitter.hue, jitter.hue), order)


def apply_augment(image: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Apply one draw to a ``3 x H x W`` float image in [0, 1]."""
    from torchvision.transforms.v2 import functional as TF

    image = torch.rot90(image, params.rotations, (-2, -1))
    if params.flip_horizontal:
        image = image.flip(-1)
    if params.flip_vertical:
        image = image.flip(-2)
    ops = [(TF.adjust_brightness, params.brightness, 1.0), (TF.adjust_contrast, params.contrast, 1.0),
           (TF.adjust_saturation, params.saturation, 1.0), (TF.adjust_hue, params.hue, 0.0)]  # fmt: skip
    for op, value, identity in (ops[i] for i in params.order):
        if value != identity:
            image = op(image, value)
    return image.contiguous()


def load_rgb(path: str) -> np.ndarray:
    """An RGB uint8 image file as ``H x W x 3``."""
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def channel_stats(paths: Sequence[str]) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation in [0, 1] over every pixel of the images.

    Large regions weigh more: the statistics of the training set's pixels (DiPalma Sec. 3.2).
    """
    if not paths:
        raise ValueError("channel_stats: no images")
    total, total_sq, count = np.zeros(3), np.zeros(3), 0
    for path in paths:
        pixels = load_rgb(path).reshape(-1, 3).astype(np.float64) / 255.0
        total += pixels.sum(0)
        total_sq += (pixels**2).sum(0)
        count += len(pixels)
    mean = total / count
    return mean.tolist(), np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12)).tolist()


class RegionImages(torch.utils.data.Dataset):
    """:meth:`RegionSet.items` at the magnification tags ``views``, standardised by ``stats``
    (``{tag: (mean, std)}``); with ``augment``, item i of epoch e drawn from ``(seed, e, i)``
    (``jitter`` None: geometry only). An item: ``{"images": [3 x H x W per view], "label", "index"}``.
    """

    def __init__(self, items: Sequence[Mapping[str, Any]], views: Sequence[str], stats: Mapping[str, tuple],
                 augment: bool = False, jitter: ColorJitter | None = ColorJitter(), seed: int = 0, cache: bool = True):  # fmt: skip
        missing = [v for v in views if v not in stats]
        if missing:
            raise ValueError(f"RegionImages: no normalisation statistics for {missing}")
        for item in items:
            lacking = [v for v in views if v not in item["paths"]]
            if lacking:
                raise ValueError(f"RegionImages: region {item['region_id']} has no image at {lacking}")  # fmt: skip
        self.items, self.views = list(items), list(views)
        self.stats = {v: [torch.tensor(s, dtype=torch.float32).view(3, 1, 1) for s in stats[v]] for v in views}  # fmt: skip
        self.augment, self.jitter, self.seed, self.cache = augment, jitter, seed, cache
        self.epoch = 0
        self._cache: dict[tuple[int, str], np.ndarray] = {}

    def set_epoch(self, epoch: int) -> None:  # augmentations differ by epoch, reproducibly
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        params = None
        if self.augment:
            state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(2)
            generator = torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
            params = draw_augment(generator, self.jitter)
        images = []
        for view in self.views:
            array = self._cache.get((index, view))
            if array is None:
                array = load_rgb(self.items[index]["paths"][view])
                if self.cache:
                    self._cache[index, view] = array
            image = torch.from_numpy(array).permute(2, 0, 1).float() / 255.0
            if params is not None:
                image = apply_augment(image, params)
            mean, std = self.stats[view]
            images.append((image - mean) / std)
        return {"images": images, "label": int(self.items[index]["label"]), "index": index}
