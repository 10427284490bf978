"""RCKD's distillation loss: pixel-wise cross-entropy against the teacher's pseudo label."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pixel_cross_entropy"]


def pixel_cross_entropy(logits: torch.Tensor, pseudo_label: torch.Tensor) -> torch.Tensor:
    """RCKD Eq. 3: cross-entropy averaged over the H x W pixels, then over the batch.

    Args:
        logits: Student output, (N, C, H, W) unnormalised scores (C = 2 for nuclei).
        pseudo_label: Teacher's binary map N(x) (Eq. 2), (N, H, W) integer class indices.

    Returns:
        The scalar loss.
    """
    if logits.shape[-2:] != pseudo_label.shape[-2:]:
        raise ValueError(
            f"logits are {tuple(logits.shape[-2:])} pixels, pseudo labels "
            f"{tuple(pseudo_label.shape[-2:])}: the decoder must output at the label's size"
        )
    # Every image has H x W pixels, so the mean over all pixels of the batch equals the batch
    # mean of Eq. 3's per-image means.
    return F.cross_entropy(logits.float(), pseudo_label.long())
