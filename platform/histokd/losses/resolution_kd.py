"""Resolution-based distillation loss: soft loss plus pixel-wise feature-map loss.

DiPalma et al. 2021, Sec. 3.3, Eqs. 1-3:

    Loss_total = Loss_soft + Loss_pixel                                               (Eq. 1)
    Loss_soft  = KL(softmax(F_t / T), softmax(F_s / T)) * T^2                          (Eq. 2)
    Loss_pixel = 1/2 sum_{k=1,2} || g_k(F_fe_t) - F_fe_s ||^2                          (Eq. 3)

with F the logits, F_fe the last feature maps, g_1 an adaptive max-pool and g_2 a bicubic
interpolation that bring the teacher's map (N^2 times larger: the teacher sees N times more
pixels per side) to the student's size. The KL divergence is reduced as a batch mean (sum over
classes, mean over images) and the squared error as a mean over elements (PyTorch's
``mse_loss``), as in the authors' public code (``../shared/RESOLUTION_KD.md``).

The public code's default ``maxpool+bicubic`` mode computes only the max-pool term and then
halves it (an if/elif slip). :func:`pixel_loss` computes the equation (both terms, averaged);
``public_code_maxpool_only=True`` reproduces the public code, for comparing numbers with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "RESIZE_MODES",
    "ResolutionKDLoss",
    "ResolutionKDTerms",
    "pixel_loss",
    "resize_teacher_map",
    "resolution_kd_loss",
    "soft_loss",
]

ResizeMode = Literal["maxpool", "bicubic"]
#: g_1 and g_2 of DiPalma Eq. 3.
RESIZE_MODES: tuple[ResizeMode, ...] = ("maxpool", "bicubic")


class ResolutionKDTerms(NamedTuple):
    """The loss of one step and its two parts (Eq. 1)."""

    total: torch.Tensor
    soft: torch.Tensor
    pixel: torch.Tensor


def soft_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """DiPalma Eq. 2: KL(teacher || student) of the softened distributions, times T^2.

    Args:
        student_logits: ``N x C``.
        teacher_logits: ``N x C`` (no gradient is needed through them).
        temperature: T; the T^2 factor keeps the gradient's scale independent of T (Hinton).

    Returns:
        Scalar: sum over classes, mean over the batch.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"soft_loss: student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: must be positive")
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * temperature**2


def resize_teacher_map(
    teacher_map: torch.Tensor, size: Sequence[int], mode: ResizeMode
) -> torch.Tensor:
    """g_k of DiPalma Eq. 3: the teacher's feature map at the student's map size.

    Args:
        teacher_map: ``N x C x H_t x W_t``.
        size: ``(H_s, W_s)``.
        mode: ``maxpool`` (adaptive max-pool, g_1) or ``bicubic`` (align_corners False, g_2).
    """
    size = (int(size[0]), int(size[1]))
    if mode == "maxpool":
        return F.adaptive_max_pool2d(teacher_map, size)
    if mode == "bicubic":
        return F.interpolate(teacher_map, size=size, mode="bicubic", align_corners=False)
    raise ValueError(f"resize mode={mode!r}: allowed: {', '.join(RESIZE_MODES)}")


def pixel_loss(
    student_map: torch.Tensor,
    teacher_map: torch.Tensor,
    modes: Sequence[ResizeMode] = RESIZE_MODES,
    distance: Literal["mse", "l1"] = "mse",
    public_code_maxpool_only: bool = False,
) -> torch.Tensor:
    """DiPalma Eq. 3: the mean over resize paths of the distance between maps.

    Args:
        student_map: ``N x C x H_s x W_s``.
        teacher_map: ``N x C x H_t x W_t`` (same N and C).
        modes: The resize paths g_k averaged (Eq. 3: max-pool and bicubic).
        distance: ``mse`` (Eq. 3) or ``l1`` (an option of the public code).
        public_code_maxpool_only: Reproduce the public code's default mode instead: the
            max-pool term alone, halved.

    Returns:
        Scalar.
    """
    if (
        student_map.dim() != 4
        or teacher_map.dim() != 4
        or student_map.shape[:2] != teacher_map.shape[:2]
    ):
        raise ValueError(
            f"pixel_loss: need N x C x H x W maps with the same N and C, got student {tuple(student_map.shape)} "
            f"and teacher {tuple(teacher_map.shape)}"
        )
    if distance not in ("mse", "l1"):
        raise ValueError(f"distance={distance!r}: allowed: mse, l1")
    measure = F.mse_loss if distance == "mse" else F.l1_loss
    size = student_map.shape[-2:]
    if public_code_maxpool_only:
        return measure(resize_teacher_map(teacher_map, size, "maxpool"), student_map) / 2
    if not modes:
        raise ValueError("pixel_loss: modes is empty; give maxpool and/or bicubic")
    terms = [measure(resize_teacher_map(teacher_map, size, mode), student_map) for mode in modes]
    return torch.stack(terms).sum() / len(terms)


def resolution_kd_loss(
    student_map: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_map: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    modes: Sequence[ResizeMode] = RESIZE_MODES,
    distance: Literal["mse", "l1"] = "mse",
    public_code_maxpool_only: bool = False,
) -> ResolutionKDTerms:
    """DiPalma Eq. 1: soft loss (Eq. 2) plus pixel loss (Eq. 3); see those functions."""
    soft = soft_loss(student_logits, teacher_logits, temperature)
    pixel = pixel_loss(student_map, teacher_map, modes, distance, public_code_maxpool_only)
    return ResolutionKDTerms(total=soft + pixel, soft=soft, pixel=pixel)


class ResolutionKDLoss(nn.Module):
    """:func:`resolution_kd_loss` as a module, with its settings fixed.

    Args:
        temperature: T of Eq. 2 (public code: 1.0).
        modes: Resize paths of Eq. 3.
        distance: ``mse`` or ``l1``.
        public_code_maxpool_only: Reproduce the public code's max-pool-only, halved term.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        modes: Sequence[ResizeMode] = RESIZE_MODES,
        distance: Literal["mse", "l1"] = "mse",
        public_code_maxpool_only: bool = False,
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r}: must be positive")
        unknown = [m for m in modes if m not in RESIZE_MODES]
        if unknown:
            raise ValueError(
                f"modes={list(modes)}: {unknown} unknown; allowed: {', '.join(RESIZE_MODES)}"
            )
        self.temperature = temperature
        self.modes = tuple(modes)
        self.distance = distance
        self.public_code_maxpool_only = public_code_maxpool_only

    def forward(
        self,
        student: tuple[torch.Tensor, torch.Tensor],
        teacher: tuple[torch.Tensor, torch.Tensor],
    ) -> ResolutionKDTerms:
        """Loss from the (feature map, logits) outputs of student and teacher."""
        (student_map, student_logits), (teacher_map, teacher_logits) = student, teacher
        return resolution_kd_loss(
            student_map, student_logits, teacher_map.detach(), teacher_logits.detach(), self.temperature,
            self.modes, self.distance, self.public_code_maxpool_only,
        )  # fmt: skip
