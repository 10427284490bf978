"""RCKD's fine-tuning loss: focal loss for classification (Eq. 5) and segmentation (Eq. 7).

Kim et al. 2023, Sec. 2.2.2, after Lin et al. (RetinaNet, 2017):

    L = -alpha * (1 - y_t)^gamma * log y_t                                  (Eq. 5)
    L = -1/(H W) sum_ij alpha * (1 - y_tij)^gamma * log y_tij              (Eq. 7)

where ``y_t`` is the softmax probability of the true class, alpha = 0.25 and gamma = 2.

How alpha applies to several classes. Lin et al. define alpha for a sigmoid: the positive
class is weighted by alpha and the negative by 1 - alpha. RCKD uses a softmax over T classes
and writes one scalar alpha in front of every term, so with a float ``alpha`` that is what this
module does: every sample is weighted by the same alpha. It rescales the loss (and its
gradient) by 0.25 and re-weights nothing; with plain SGD it is the same as a 4x smaller
learning rate, except that weight decay is not scaled. Pass a sequence of T weights to get
the class-balancing form instead, ``alpha_t = alpha[t]`` for a sample of class ``t``. At
gamma = 0 and alpha = 1 both equal the cross-entropy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["FOCAL_ALPHA", "FOCAL_GAMMA", "focal_loss"]

FOCAL_ALPHA = 0.25  # RCKD Sec. 2.2.2, Eq. 5
FOCAL_GAMMA = 2.0  # RCKD Sec. 2.2.2, Eq. 5


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float | Sequence[float] | torch.Tensor = FOCAL_ALPHA,
    gamma: float = FOCAL_GAMMA,
    ignore_index: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Softmax focal loss, RCKD Eq. 5 (``logits`` N x T) and Eq. 7 (N x T x H x W).

    Args:
        logits: Unnormalised class scores, ``N x T`` or ``N x T x H x W``.
        target: Class indices, ``N`` or ``N x H x W``.
        alpha: One weight for every class (RCKD: 0.25), or T per-class weights.
        gamma: Focusing exponent (RCKD: 2); 0 turns the modulation off.
        ignore_index: Target value (e.g. 255 for unlabelled pixels) left out of the loss and
            of the mean.
        reduction: ``"mean"`` over samples, or pixels for segmentation (Eq. 7 averages over
            the H x W pixels of an image; every image of a batch has H x W pixels, so the mean
            over the batch's pixels is the batch mean of Eq. 7), ``"sum"``, or ``"none"``.

    Returns:
        The loss: a scalar, or one value per sample / pixel for ``reduction="none"``
        (0 at ignored pixels).

    Raises:
        ValueError: Shapes that do not match, a negative gamma, or a bad reduction.
    """
    if logits.dim() < 2:
        raise ValueError(
            f"focal_loss: logits must be N x T or N x T x H x W, got shape {tuple(logits.shape)}"
        )
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"focal_loss: target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)} "
            "(expected the logits' shape without the class dimension)"
        )
    if gamma < 0:
        raise ValueError(f"focal_loss: gamma={gamma!r} must be >= 0 (RCKD: 2)")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"focal_loss: reduction={reduction!r}; allowed: mean, sum, none")
    num_classes = logits.shape[1]
    target = target.long()
    valid = (
        torch.ones_like(target, dtype=torch.bool)
        if ignore_index is None
        else target != ignore_index
    )
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    if bool((safe_target < 0).any()) or bool((safe_target >= num_classes).any()):
        bad = safe_target[(safe_target < 0) | (safe_target >= num_classes)][0].item()
        raise ValueError(f"focal_loss: target value {bad} is outside [0, {num_classes - 1}]")

    log_prob = F.log_softmax(logits.float(), dim=1)
    log_pt = log_prob.gather(1, safe_target.unsqueeze(1)).squeeze(1)  # log y_t
    pt = log_pt.exp()
    modulation = (1.0 - pt).clamp_min(0.0).pow(gamma) if gamma != 0 else torch.ones_like(pt)
    if isinstance(alpha, (int, float)):
        weight = torch.full_like(pt, float(alpha))
    else:
        weights = torch.as_tensor(alpha, dtype=pt.dtype, device=pt.device)
        if weights.shape != (num_classes,):
            raise ValueError(
                f"focal_loss: alpha has {tuple(weights.shape)} weights; need one float or {num_classes}"
            )
        weight = weights[safe_target]
    loss = -weight * modulation * log_pt  # RCKD Eqs. 5 and 7
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp_min(1)
