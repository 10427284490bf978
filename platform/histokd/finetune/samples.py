"""The PyTorch side of a downstream dataset: images resized to the input resolution, with targets.

RCKD's datasets range from 224 x 224 (CRC) to 2048 x 1536 (BACH microscopy) pixels; every image
is resized to the model's square input (RCKD Sec. 3.1: 224 or 384) with bilinear filtering,
masks with nearest neighbour so class indices stay indices. A non-square image is first made
square by ``resize`` (`to_square`): ``squash`` (none: the resize distorts it), ``center-crop``
(the largest centred square) or ``pad`` (white borders; a mask's borders are the ignore index).
Decoded, resized images can be
kept in memory, which on small datasets (BACH: 400 images, Lymph: 374) saves re-decoding large
files every epoch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from histokd.augment import Augmentation
from histokd.finetune.datasets import MASK_MODES, RESIZE_MODES

__all__ = ["EpochSampler", "ImageSamples", "load_image", "load_mask", "to_square"]


def to_square(img: Image.Image, resize: str, fill: int) -> Image.Image:
    """``img`` made square before its resize: unchanged (``squash``), its largest centred square
    (``center-crop``), or centred on a square canvas of ``fill`` (``pad``).

    Raises:
        ValueError: An unknown ``resize``.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize={resize!r}: allowed: {', '.join(RESIZE_MODES)}")
    width, height = img.size
    if resize == "squash" or width == height:
        return img
    if resize == "center-crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return img.crop((left, top, left + side, top + side))
    side = max(width, height)
    canvas = Image.new(img.mode, (side, side), fill if len(img.getbands()) == 1 else (fill,) * 3)
    canvas.paste(img, ((side - width) // 2, (side - height) // 2))
    return canvas


def load_image(path: str, size: int, resize: str = "squash") -> np.ndarray:
    """An RGB image made square by ``resize`` (`to_square`, padding white) and resized (bilinear)
    to ``size x size``, ``H x W x 3`` uint8.

    Raises:
        ValueError: The file cannot be decoded (naming it).
    """
    try:
        with Image.open(path) as img:
            img = to_square(img.convert("RGB"), resize, 255)
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            return np.array(img, dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise ValueError(f"image {path!r} cannot be read: {exc}") from exc


def load_mask(path: str, size: int, resize: str = "squash", ignore_index: int = 255) -> np.ndarray:
    """A class-index mask made square by ``resize`` as its image is (`to_square`, padding with
    ``ignore_index``) and resized (nearest) to ``size x size``, ``H x W`` uint8.

    Raises:
        ValueError: The file cannot be decoded or is not single-channel (naming it).
    """
    try:
        with Image.open(path) as img:
            if img.mode not in MASK_MODES:
                raise ValueError(f"mode {img.mode}: a mask must be single-channel class indices")
            img = to_square(img, resize, ignore_index)
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.NEAREST)
            return np.array(img).astype(np.uint8)
    except (OSError, ValueError) as exc:
        raise ValueError(f"mask {path!r} cannot be read: {exc}") from exc


class ImageSamples(Dataset):
    """Images with class labels or masks, at the input resolution.

    Items are ``(image, target, index)``: ``3 x S x S`` uint8, a class index (classification)
    or an ``S x S`` int64 mask (segmentation), and the sample's position in ``images``. An item
    is asked for by its index, or by ``(epoch, index)`` (`EpochSampler`): with
    ``augmentation``, sample i of epoch e is augmented with the draws of
    ``sample_generator(seed, e, i)``, as `Augmentation.draw_per_sample` gives them for the
    same sample augmented on the device. The task model normalises the batch itself
    (`histokd.models`), after augmentation; stain normalisation comes first, when the image is
    read.

    Args:
        images: Image paths.
        input_size: Side S of the square input.
        labels: Class index per image (classification).
        masks: Mask path per image (segmentation).
        augmentation: The training augmentations, applied here (None: none here).
        seed: Seed of the augmentation draws.
        stain: A stain normalisation record (`histokd.stain.stain_normalization`), or None.
        cache: Keep decoded, resized (and stain-normalised) images and masks in memory after
            the first read.
        resize: How a non-square image is made square (`to_square`): ``squash``,
            ``center-crop`` or ``pad``.
        ignore_index: Mask value of a padded border (``pad``).
    """

    def __init__(
        self,
        images: Sequence[str],
        input_size: int,
        labels: Sequence[int] | None = None,
        masks: Sequence[str] | None = None,
        augmentation: Augmentation | None = None,
        seed: int = 0,
        stain: Mapping[str, Any] | None = None,
        cache: bool = False,
        resize: str = "squash",
        ignore_index: int = 255,
    ) -> None:
        if (labels is None) == (masks is None):
            raise ValueError(
                "ImageSamples: give labels (classification) or masks (segmentation), not both or neither"
            )
        self.images = list(images)
        self.labels = list(labels) if labels is not None else None
        self.masks = list(masks) if masks is not None else None
        self.input_size = int(input_size)
        self.augmentation = (
            augmentation if augmentation is not None and augmentation.enabled else None
        )
        self.seed = int(seed)
        self.stain = dict(stain) if stain else None
        self._normalize = None  # built on first use: a loader process builds its own
        self.cache = cache
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize={resize!r}: allowed: {', '.join(RESIZE_MODES)}")
        self.resize, self.ignore_index = resize, int(ignore_index)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def __len__(self) -> int:
        return len(self.images)

    def _read(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        if i in self._cache:
            return self._cache[i]
        image = load_image(self.images[i], self.input_size, self.resize)
        if self.stain is not None:
            if self._normalize is None:
                from histokd.stain import stain_normalizer

                self._normalize = stain_normalizer(self.stain)
            image = self._normalize(torch.from_numpy(image).permute(2, 0, 1)[None])[0]
            image = image.permute(1, 2, 0).numpy()
        mask = (
            load_mask(self.masks[i], self.input_size, self.resize, self.ignore_index)
            if self.masks is not None
            else None
        )
        if self.cache:
            self._cache[i] = (image, mask)
        return image, mask

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        image_np, mask_np = self._read(i)
        image = torch.from_numpy(image_np).permute(2, 0, 1)
        mask = torch.from_numpy(mask_np.astype(np.int64)) if mask_np is not None else None
        if self.augmentation is not None:
            draws = self.augmentation.draw_per_sample(self.seed, epoch, [i])
            images, masks = self.augmentation(
                image[None], mask[None] if mask is not None else None, draws=draws
            )
            image, mask = images[0], (masks[0] if masks is not None else None)
        target = mask if mask is not None else torch.tensor(self.labels[i], dtype=torch.int64)
        return image, target, i


class EpochSampler(torch.utils.data.Sampler):
    """Another sampler's indices as ``(epoch, index)`` keys, so that an `ImageSamples` in a
    loader process knows the epoch (a sampler runs in the main process, the dataset maybe not).

    Args:
        sampler: The sampler of the indices (its ``set_epoch`` is called too, where it has one).
    """

    def __init__(self, sampler: torch.utils.data.Sampler) -> None:
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the keys to come."""
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, int(i)) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)
