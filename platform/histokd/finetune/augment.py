"""Training augmentations of the fine-tuning (RCKD Sec. 2.2.2 does not list them; these are the
standard ones for pathology): the eight flips and 90-degree rotations, which change nothing a
pathologist relies on, and a mild colour jitter for stain variation.
"""

from __future__ import annotations

import torch

__all__ = ["augment"]


def augment(
    image: torch.Tensor,
    mask: torch.Tensor | None = None,
    color_jitter: float = 0.1,
    hue_jitter: float = 0.02,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One random dihedral transform (same for image and mask) and a colour jitter (image only).

    Args:
        image: ``3 x H x W`` uint8 or float in [0, 1].
        mask: ``H x W`` class indices, or None.
        color_jitter: Brightness, contrast and saturation factors are drawn from
            ``[1 - color_jitter, 1 + color_jitter]``; 0 turns the colour jitter off.
        hue_jitter: Hue shift drawn from ``[-hue_jitter, hue_jitter]`` (fraction of the hue circle).
        generator: Random source (default: torch's global one).

    Returns:
        The transformed image (same dtype) and mask.
    """
    from histokd.compat import ensure_torchvision

    ensure_torchvision()
    from torchvision.transforms.v2 import functional as TF

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    k = int(torch.randint(0, 4, (), generator=generator))
    flip = bool(torch.randint(0, 2, (), generator=generator))
    if k:
        image = torch.rot90(image, k, (-2, -1))
        mask = torch.rot90(mask, k, (-2, -1)) if mask is not None else None
    if flip:
        image = image.flip(-1)
        mask = mask.flip(-1) if mask is not None else None
    if color_jitter > 0:
        image = TF.adjust_brightness(image, uniform(1 - color_jitter, 1 + color_jitter))
        image = TF.adjust_contrast(image, uniform(1 - color_jitter, 1 + color_jitter))
        image = TF.adjust_saturation(image, uniform(1 - color_jitter, 1 + color_jitter))
    if hue_jitter > 0:
        image = TF.adjust_hue(image, uniform(-hue_jitter, hue_jitter))
    return image.contiguous(), (mask.contiguous() if mask is not None else None)
