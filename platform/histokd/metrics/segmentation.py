"""Pixel metrics of a binary segmentation (student against the teacher's pseudo labels)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BinaryConfusion", "binary_confusion"]


@dataclass
class BinaryConfusion:
    """Pixel counts: true/false positives and negatives, foreground = 1."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: BinaryConfusion) -> BinaryConfusion:
        return BinaryConfusion(
            self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn
        )

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.tp, self.fp, self.fn, self.tn], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> BinaryConfusion:
        tp, fp, fn, tn = (int(v) for v in t.tolist())
        return cls(tp, fp, fn, tn)

    @property
    def pixel_accuracy(self) -> float:
        total = self.tp + self.fp + self.fn + self.tn
        return (self.tp + self.tn) / total if total else float("nan")

    @property
    def foreground_iou(self) -> float:
        """IoU of the foreground class; 1.0 when both masks are empty."""
        union = self.tp + self.fp + self.fn
        return self.tp / union if union else 1.0

    @property
    def dice(self) -> float:
        denom = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denom if denom else 1.0


def binary_confusion(prediction: torch.Tensor, target: torch.Tensor) -> BinaryConfusion:
    """Confusion counts of two same-shaped {0, 1} tensors."""
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape"
        )
    p, t = prediction.bool(), target.bool()
    tp = int((p & t).sum())
    fp = int((p & ~t).sum())
    fn = int((~p & t).sum())
    return BinaryConfusion(tp, fp, fn, p.numel() - tp - fp - fn)
