"""Metrics computed from confusion counts, so they add up across batches and workers."""

from histokd.metrics.bootstrap import (
    BootstrapInterval,
    bootstrap_auroc_ci,
    bootstrap_ci,
    bootstrap_confusion_ci,
    percentile_interval,
)
from histokd.metrics.classification import (
    ClassificationMetrics,
    accuracy,
    auroc,
    balanced_accuracy,
    binary_auroc,
    classification_metrics,
    confusion_matrix,
    iou_per_class,
    macro_precision_recall_f1,
    mean_iou,
    precision_recall_f1,
)
from histokd.metrics.segmentation import BinaryConfusion, binary_confusion

__all__ = [
    "BinaryConfusion",
    "BootstrapInterval",
    "ClassificationMetrics",
    "accuracy",
    "auroc",
    "balanced_accuracy",
    "binary_auroc",
    "binary_confusion",
    "bootstrap_auroc_ci",
    "bootstrap_ci",
    "bootstrap_confusion_ci",
    "classification_metrics",
    "confusion_matrix",
    "iou_per_class",
    "macro_precision_recall_f1",
    "mean_iou",
    "percentile_interval",
    "precision_recall_f1",
]
