"""Training augmentations of pretraining and fine-tuning, on a batch on any device.

RCKD does not list its augmentations; these are pathology's usual ones, each with a switch:
the eight flips and 90-degree rotations (``flip``, ``rot90``: nothing a pathologist relies on
changes), HED jitter for stain variation (``hed``, Tellez et al. 2019; `histokd.stain`), and
brightness, contrast, saturation and hue jitter (torchvision's definitions). Images and masks
get the same geometric transform; colours change on images only.

Every sample draws the same 12 uniform numbers whatever is switched on, in a fixed order, so
switching one augmentation off leaves the others' draws as they were. The numbers are drawn on
the CPU from a CPU generator and then applied where the batch lives, so an augmentation applied
on the CPU (in a data loader) and on the device (the batch on the GPU) agree for the same seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from histokd.stain import hed_jitter

__all__ = [
    "AUGMENTATIONS",
    "AUGMENT_DEVICES",
    "EXAMPLES_FILE",
    "Augmentation",
    "augment_on_device",
    "check_augment",
    "sample_generator",
    "save_augment_examples",
]

AUGMENTATIONS = ("flip", "rot90", "hed", "brightness", "contrast", "saturation", "hue")
AUGMENT_DEVICES = ("auto", "cpu", "device")
EXAMPLES_FILE = "augmentation_examples.png"  # in the run folder and the MLflow run
_COLOUR = ("hed", "brightness", "contrast", "saturation", "hue")
_DRAWS = 12  # rot90, flip, 3 HED scales, 3 HED shifts, brightness, contrast, saturation, hue
_GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def check_augment(
    value: Sequence[str] | str | bool | None, defaults: Sequence[str], name: str = "augment"
) -> list[str]:
    """The augmentations a config names: a list of `AUGMENTATIONS`, ``none`` (or an empty list,
    or ``False``) for none; ``True`` keeps the job's ``defaults`` (the old on/off switch).

    Raises:
        ValueError: An unknown name, or ``none`` with others, naming the field and the value.
    """
    if value is True:
        return list(defaults)
    if value is False or value is None:
        return []
    names = [value] if isinstance(value, str) else [str(v) for v in value]
    if names == ["none"]:
        return []
    allowed = f"allowed: {', '.join(AUGMENTATIONS)}, or none alone"
    for item in names:
        if item not in AUGMENTATIONS:
            raise ValueError(f"{name}={names!r}: unknown augmentation {item!r}; {allowed}")
    return list(dict.fromkeys(names))


def check_strengths(config: object) -> None:
    """The strength fields and ``augment_device`` of a job config (one error naming the field)."""
    if config.augment_device not in AUGMENT_DEVICES:  # type: ignore[attr-defined]
        raise ValueError(
            f"augment_device={config.augment_device!r}: allowed: {', '.join(AUGMENT_DEVICES)}"  # type: ignore[attr-defined]
        )
    for name, high, bound in (("hed_sigma", 1.0, "< 1"), ("color_jitter", 1.0, "< 1"),
                              ("hue_jitter", 0.5 + 1e-12, "<= 0.5")):  # fmt: skip
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < high:
            raise ValueError(f"{name}={value!r}: must be >= 0 and {bound}")


def augment_on_device(setting: str, device: torch.device) -> bool:
    """Whether to augment the batch on ``device`` (``auto``: where the worker computes, so on
    the GPU for a GPU worker) rather than on the CPU before it moves there."""
    if setting == "auto":
        return device.type != "cpu"
    return setting == "device"


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The random source of one sample in one epoch, independent of loader processes, ranks
    and where the augmentation runs."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


@dataclass(frozen=True)
class Augmentation:
    """The switched-on augmentations and their strengths.

    Attributes:
        ops: Names from `AUGMENTATIONS`.
        hed_sigma: HED jitter: ``a ~ U(1 - s, 1 + s)``, ``b ~ U(-s, s)`` (Tellez: 0.05).
        color_jitter: Brightness, contrast and saturation factors from ``[1 - x, 1 + x]``.
        hue_jitter: Hue shift from ``[-x, x]`` of the hue circle.
    """

    ops: tuple[str, ...] = ()
    hed_sigma: float = 0.05
    color_jitter: float = 0.1
    hue_jitter: float = 0.02

    @classmethod
    def from_config(cls, config: Mapping) -> Augmentation:
        """The augmentation of a job config as a dict (its ``augment`` and strength fields)."""
        return cls(tuple(config["augment"]), float(config["hed_sigma"]),
                   float(config["color_jitter"]), float(config["hue_jitter"]))  # fmt: skip

    @property
    def enabled(self) -> bool:
        """Whether anything is switched on."""
        return bool(self.ops)

    def draw(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n x 12`` uniform numbers in [0, 1) for ``n`` samples (on the CPU)."""
        return torch.rand(n, _DRAWS, generator=generator)

    def draw_per_sample(self, seed: int, epoch: int, indices: Sequence[int]) -> torch.Tensor:
        """The draws of samples ``indices`` in ``epoch``, each from its `sample_generator`."""
        rows = [self.draw(1, sample_generator(seed, epoch, int(i))) for i in indices]
        return torch.cat(rows) if rows else torch.empty(0, _DRAWS)

    def __call__(
        self,
        images: torch.Tensor,
        masks: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        draws: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment a batch.

        Args:
            images: ``N x 3 x H x W`` uint8 or floats in [0, 1], on any device.
            masks: ``N x H x W`` class indices (the same geometric transform), or None.
            generator: Random source of the draws (default: torch's global one).
            draws: ``N x 12`` draws (`draw`, `draw_per_sample`) instead of drawing here.

        Returns:
            The images (same dtype and device, in range) and masks.
        """
        if not self.ops or images.shape[0] == 0:
            return images, masks
        u = (draws if draws is not None else self.draw(images.shape[0], generator)).double()
        images, masks = self._geometric(images, masks, u)
        if any(op in self.ops for op in _COLOUR):
            images = self._colour(images, u)
        return images.contiguous(), (masks.contiguous() if masks is not None else None)

    def _geometric(
        self, images: torch.Tensor, masks: torch.Tensor | None, u: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per sample one of the eight flips and rotations (those switched on)."""
        k = (u[:, 0] * 4).long().clamp_(max=3) if "rot90" in self.ops else torch.zeros(len(u), dtype=torch.long)  # fmt: skip
        flip = (u[:, 1] < 0.5) if "flip" in self.ops else torch.zeros(len(u), dtype=torch.bool)
        if not (k.any() or flip.any()):
            return images, masks
        if k.any() and images.shape[-1] != images.shape[-2]:
            raise ValueError(
                f"augment rot90: images are {images.shape[-2]} x {images.shape[-1]}; it needs square ones"
            )
        out_images = images.clone()
        out_masks = masks.clone() if masks is not None else None
        for turns in range(4):
            for flipped in (False, True):
                chosen = torch.nonzero((k == turns) & (flip == flipped)).flatten()
                if (turns == 0 and not flipped) or len(chosen) == 0:
                    continue
                chosen = chosen.to(images.device)
                out_images[chosen] = _turn(images[chosen], turns, flipped)
                if masks is not None:
                    chosen_m = chosen.to(masks.device)
                    out_masks[chosen_m] = _turn(masks[chosen_m], turns, flipped)  # type: ignore[index]
        return out_images, out_masks

    def _colour(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """HED, brightness, contrast, saturation and hue jitter, in this order."""
        dtype, device = images.dtype, images.device
        x = images.float().div(255.0) if dtype == torch.uint8 else images.float()

        def factor(column: int, strength: float) -> torch.Tensor:
            return (1 + strength * (2 * u[:, column] - 1)).float().to(device).view(-1, 1, 1, 1)

        if "hed" in self.ops:
            s = self.hed_sigma
            scale, shift = 1 + s * (2 * u[:, 2:5] - 1), s * (2 * u[:, 5:8] - 1)
            x = hed_jitter(x, scale.float(), shift.float())
        grey = torch.tensor(_GREY, device=device).view(1, 3, 1, 1)
        if "brightness" in self.ops:
            x = (x * factor(8, self.color_jitter)).clamp_(0, 1)
        if "contrast" in self.ops:
            mean = (x * grey).sum(1, keepdim=True).mean((2, 3), keepdim=True)
            f = factor(9, self.color_jitter)
            x = (f * x + (1 - f) * mean).clamp_(0, 1)
        if "saturation" in self.ops:
            f = factor(10, self.color_jitter)
            x = (f * x + (1 - f) * (x * grey).sum(1, keepdim=True)).clamp_(0, 1)
        if "hue" in self.ops and self.hue_jitter > 0:
            from histokd.compat import ensure_torchvision

            ensure_torchvision()
            from torchvision.transforms.v2 import functional as TF

            shifts = (self.hue_jitter * (2 * u[:, 11] - 1)).tolist()
            x = torch.stack([TF.adjust_hue(x[i], shifts[i]) for i in range(len(shifts))])
        if dtype == torch.uint8:
            return x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
        return x.to(dtype)


def _turn(x: torch.Tensor, turns: int, flipped: bool) -> torch.Tensor:
    """``turns`` quarter turns, then a left-right flip, of the last two dimensions."""
    if turns:
        x = torch.rot90(x, turns, (-2, -1))
    return x.flip(-1) if flipped else x


def _as_uint8_hwc(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """``N x 3 x H x W`` tensors (uint8 or [0, 1]) or ``N x H x W x 3`` arrays -> uint8 NHWC."""
    if isinstance(images, np.ndarray):
        return images.astype(np.uint8)
    x = images.detach().cpu()
    if x.dtype != torch.uint8:
        x = x.float().mul(255.0).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def save_augment_examples(
    before: torch.Tensor | np.ndarray,
    after: torch.Tensor | np.ndarray,
    path: str,
    title: str = "",
    max_side: int = 160,
) -> str:
    """A PNG grid with one row per image: the image before | after augmentation.

    Args:
        before: ``N x 3 x H x W`` tensors (uint8 or [0, 1]) or ``N x H x W x 3`` uint8 arrays.
        after: The same images augmented.
        path: The PNG file to write.
        title: Text drawn above the grid.
        max_side: Each panel is shrunk to at most this many pixels.

    Returns:
        ``path``.
    """
    from PIL import Image, ImageDraw

    pairs = zip(_as_uint8_hwc(before), _as_uint8_hwc(after), strict=True)
    pad = ((2, 2), (2, 2), (0, 0))
    rows = [
        np.concatenate(
            [np.pad(a, pad, constant_values=255), np.pad(b, pad, constant_values=255)], 1
        )
        for a, b in pairs
    ]
    grid = np.concatenate(rows, axis=0)
    canvas = Image.fromarray(grid)
    scale = max_side / max(grid.shape[1] / 2, 1)
    if scale < 1:
        canvas = canvas.resize(
            (max(1, int(canvas.width * scale)), max(1, int(canvas.height * scale))),
            Image.Resampling.BILINEAR,
        )
    if title:
        framed = Image.new(
            "RGB", (max(canvas.width, 6 * len(title) + 8), canvas.height + 18), "white"
        )
        framed.paste(canvas, (0, 18))
        ImageDraw.Draw(framed).text((4, 3), title, fill=(0, 0, 0))
        canvas = framed
    canvas.save(path)
    return path
