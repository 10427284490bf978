"""Multi-class metrics: accuracy, balanced accuracy, macro precision / recall / F1, mIoU, AUROC.

RCKD (Kim et al. 2023) Sec. 2.4, Eq. 12 reports accuracy for classification and mIoU for
segmentation. Everything here is computed from a ``C x C`` confusion matrix (rows: true
class, columns: predicted class), so counts add across batches, workers and images, and
the same functions serve image labels and pixel labels.

Conventions (the same as scikit-learn's ``zero_division=0``): a class never predicted has
precision 0, a class absent from the targets has recall 0, and a class with neither has F1 0.
For mIoU a class with ``TP + FP + FN = 0`` (absent from targets and predictions) is left out
of the mean, since its IoU is undefined; balanced accuracy likewise averages the recall of the
classes present in the targets (scikit-learn's ``balanced_accuracy_score``).

AUROC is the one metric here that needs the predicted probabilities, not the confusion matrix:
the Mann-Whitney statistic from ranks, ties averaged (Hanley and McNeil 1982, Eq. 2), binary or
one-vs-rest macro over the classes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import stats

__all__ = [
    "ClassificationMetrics",
    "accuracy",
    "auroc",
    "balanced_accuracy",
    "binary_auroc",
    "classification_metrics",
    "confusion_matrix",
    "iou_per_class",
    "macro_precision_recall_f1",
    "mean_iou",
    "precision_recall_f1",
]


def confusion_matrix(
    prediction: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    num_classes: int,
    ignore_index: int | None = None,
) -> np.ndarray:
    """Counts of (true class, predicted class) pairs.

    Args:
        prediction: Predicted class indices, any shape (labels or pixels).
        target: True class indices, the same shape.
        num_classes: C.
        ignore_index: Target value to leave out (unlabelled pixels).

    Returns:
        ``C x C`` int64 array; entry ``[t, p]`` counts samples of class t predicted as p.

    Raises:
        ValueError: Shapes differ or a value is outside ``[0, C)``.
    """
    p = (
        prediction.detach().cpu().numpy()
        if isinstance(prediction, torch.Tensor)
        else np.asarray(prediction)
    )
    t = target.detach().cpu().numpy() if isinstance(target, torch.Tensor) else np.asarray(target)
    if p.shape != t.shape:
        raise ValueError(
            f"confusion_matrix: prediction shape {p.shape} differs from target shape {t.shape}"
        )
    p, t = p.reshape(-1).astype(np.int64), t.reshape(-1).astype(np.int64)
    if ignore_index is not None:
        keep = t != ignore_index
        p, t = p[keep], t[keep]
    for name, values in (("prediction", p), ("target", t)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            bad = values[(values < 0) | (values >= num_classes)][0]
            raise ValueError(
                f"confusion_matrix: {name} value {bad} is outside [0, {num_classes - 1}]"
            )
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def accuracy(confusion: np.ndarray) -> np.ndarray:
    """RCKD Eq. 12: correctly classified / all, as a fraction (``... x C x C`` -> ``...``)."""
    confusion = np.asarray(confusion)
    correct = np.trace(confusion, axis1=-2, axis2=-1)
    return _safe_divide(correct, confusion.sum(axis=(-2, -1)))


def balanced_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Mean recall over the classes present in the targets (``... x C x C`` -> ``...``).

    NaN where no class is present (an empty matrix).
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    actual = confusion.sum(axis=-1)  # row sums: tp + fn
    recall = _safe_divide(np.diagonal(confusion, axis1=-2, axis2=-1), actual)
    present = (actual > 0).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(present > 0, recall.sum(-1) / np.maximum(present, 1), np.nan)


def binary_auroc(positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Area under the ROC curve of ``score`` for ``positive``, along the last axis.

    The Mann-Whitney U over ``n_pos * n_neg``: the chance that a positive scores above a
    negative, a tie counting one half (ranks with ties averaged). Vectorised over leading axes.

    Returns:
        ``...``; NaN where the positives or the negatives are missing.
    """
    positive = np.asarray(positive, dtype=bool)
    ranks = stats.rankdata(np.asarray(score, dtype=np.float64), method="average", axis=-1)
    n_pos = positive.sum(-1).astype(np.float64)
    n_neg = positive.shape[-1] - n_pos
    u = np.where(positive, ranks, 0.0).sum(-1) - n_pos * (n_pos + 1) / 2
    defined = (n_pos > 0) & (n_neg > 0)
    return np.where(defined, u / np.where(defined, n_pos * n_neg, 1.0), np.nan)


def auroc(target: np.ndarray, probability: np.ndarray) -> np.ndarray:
    """AUROC from predicted class probabilities: binary, or one-vs-rest macro for C > 2.

    Args:
        target: ``... x n`` true class indices.
        probability: ``... x n x C`` predicted probabilities (or scores).

    Returns:
        ``...``: for C = 2 the AUROC of class 1's probability; for C > 2 the mean of each
        class's one-vs-rest AUROC over the classes with positives and negatives (NaN if none).
    """
    target = np.asarray(target)
    probability = np.asarray(probability, dtype=np.float64)
    if probability.shape[:-1] != target.shape:
        raise ValueError(
            f"auroc: probability shape {probability.shape} does not match target shape "
            f"{target.shape} (need ... x n x C against ... x n)"
        )
    c = probability.shape[-1]
    if c == 2:
        return binary_auroc(target == 1, probability[..., 1])
    per_class = np.stack([binary_auroc(target == k, probability[..., k]) for k in range(c)], -1)
    defined = ~np.isnan(per_class)
    count = defined.sum(-1)
    total = np.where(defined, per_class, 0.0).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def precision_recall_f1(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each class's one-vs-rest precision, recall and F1 (0 where undefined).

    Works on a batch of matrices (``... x C x C``).

    Returns:
        (precision, recall, F1), each of shape ``... x C``.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    predicted = confusion.sum(axis=-2)  # column sums: tp + fp
    actual = confusion.sum(axis=-1)  # row sums: tp + fn
    precision = _safe_divide(tp, predicted)
    recall = _safe_divide(tp, actual)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    return precision, recall, f1


def macro_precision_recall_f1(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Macro (unweighted mean over classes) one-vs-rest precision, recall and F1.

    Works on a batch of matrices (``... x C x C``), which the bootstrap uses.

    Returns:
        (precision, recall, F1), each of shape ``...``.
    """
    precision, recall, f1 = precision_recall_f1(confusion)
    return precision.mean(-1), recall.mean(-1), f1.mean(-1)


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    """TP / (TP + FP + FN) per class; NaN where the class is in neither targets nor predictions."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    union = confusion.sum(axis=-2) + confusion.sum(axis=-1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def mean_iou(confusion: np.ndarray) -> np.ndarray:
    """RCKD Eq. 12: mIoU = 1/C sum_i TP_i / (TP_i + FP_i + FN_i) over the classes present."""
    iou = iou_per_class(confusion)
    present = ~np.isnan(iou)
    total = np.where(present, iou, 0.0).sum(-1)
    count = present.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


@dataclass(frozen=True)
class ClassificationMetrics:
    """What one evaluation measured; fractions in [0, 1]."""

    accuracy: float
    balanced_accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    miou: float
    num_samples: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat ``{prefix + name: value}``, for MLflow and Ray reports."""
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items()}


def classification_metrics(confusion: np.ndarray) -> ClassificationMetrics:
    """All the metrics of one ``C x C`` confusion matrix."""
    confusion = np.asarray(confusion)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(
            f"classification_metrics: need one C x C confusion matrix, got shape {confusion.shape}"
        )
    precision, recall, f1 = macro_precision_recall_f1(confusion)
    return ClassificationMetrics(
        accuracy=float(accuracy(confusion)),
        balanced_accuracy=float(balanced_accuracy(confusion)),
        macro_precision=float(precision),
        macro_recall=float(recall),
        macro_f1=float(f1),
        miou=float(mean_iou(confusion)),
        num_samples=int(confusion.sum()),
    )
