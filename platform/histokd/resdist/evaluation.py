"""Test-set evaluation as DiPalma et al. report it (Sec. 4.5): metrics, 95% intervals, GFLOPs.

Accuracy, F1-score, precision and recall are computed one-vs-rest for each class and
macro-averaged over the classes (Sec. 4.5). One-vs-rest accuracy counts, for each class, the
images correctly called "this class" or "not this class"; its macro average is
``1 - 2 (1 - a) / C`` for top-1 accuracy ``a`` and C classes, which is why the paper's accuracies
sit well above its F1-scores. Top-1 accuracy is reported beside it. Every metric gets a 95%
interval from 10,000 bootstrap resamples of the test images (Sec. 4.5; ``histokd.metrics``).

Cost is the number of floating-point operations of one forward pass (Sec. 4.5, Fig. 3),
counted by ``torch.utils.flop_counter`` (a multiply-add is 2 FLOPs; convolutions and the linear
layer, not norms or activations) on the meta device, so no image is computed. Regions vary in
size, so it is given for the test set's median region size at each magnification and as the
mean over the test regions.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from histokd.metrics import (
    BootstrapInterval,
    accuracy,
    bootstrap_confusion_ci,
    macro_precision_recall_f1,
)
from histokd.resdist.region_set import RegionRecord, RegionSet
from histokd.resdist.regions import TissueRegion, magnification_tag

__all__ = [
    "METRICS",
    "METRIC_LABELS",
    "ModelEvaluation",
    "evaluate_model",
    "forward_gflops",
    "metric_intervals",
    "ovr_accuracy",
    "predict",
]


def ovr_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Macro one-vs-rest accuracy of ``... x C x C`` confusion matrices (DiPalma Sec. 4.5).

    For class c: (TP_c + TN_c) / N, averaged over the classes.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    total = confusion.sum(axis=(-2, -1))
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    fp = confusion.sum(axis=-2) - tp
    fn = confusion.sum(axis=-1) - tp
    tn = total[..., None] - tp - fp - fn
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(
            total[..., None] > 0,
            (tp + tn) / np.where(total[..., None] > 0, total[..., None], 1),
            0.0,
        )
    return per_class.mean(-1)


#: The paper's metrics (Sec. 4.5), each a function of ``... x C x C`` confusion matrices.
METRICS = {
    "accuracy": ovr_accuracy,
    "f1": lambda c: macro_precision_recall_f1(c)[2],
    "precision": lambda c: macro_precision_recall_f1(c)[0],
    "recall": lambda c: macro_precision_recall_f1(c)[1],
    "top1_accuracy": accuracy,
}

METRIC_LABELS = {
    "accuracy": "Accuracy",
    "f1": "F1-Score",
    "precision": "Precision",
    "recall": "Recall",
    "top1_accuracy": "Top-1 accuracy",
}


@dataclass
class ModelEvaluation:
    """One model on one test set.

    Attributes:
        method: ``teacher``, ``baseline``, ``KD``, ``KD (AD)``, ...
        magnification: Input magnification.
        run_name: The training run.
        model_path: The model file.
        num_images: Test images.
        metrics: Point estimate and interval of each metric, fractions in [0, 1].
        gflops_median: GFLOPs of one forward pass at the median test region size.
        gflops_mean: Mean GFLOPs of one forward pass over the test regions.
        median_size: Median (height, width) of the test regions at the magnification.
        targets: True classes.
        predictions: Predicted classes.
    """

    method: str
    magnification: float
    run_name: str
    model_path: str
    num_images: int
    metrics: dict[str, BootstrapInterval]
    gflops_median: float
    gflops_mean: float
    median_size: tuple[int, int]
    targets: list[int] = field(repr=False, default_factory=list)
    predictions: list[int] = field(repr=False, default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Flat numbers for JSON, MLflow and the tables."""
        out: dict[str, Any] = {
            "method": self.method, "magnification": self.magnification, "run_name": self.run_name,
            "model_path": self.model_path, "num_images": self.num_images, "gflops_median": self.gflops_median,
            "gflops_mean": self.gflops_mean, "median_height": self.median_size[0], "median_width": self.median_size[1],
        }  # fmt: skip
        for name, interval in self.metrics.items():
            out.update(interval.as_dict(name))
        return out


@torch.no_grad()
def predict(
    model: nn.Module,
    items: Sequence[dict[str, Any]],
    tag: str,
    stats: tuple[Sequence[float], Sequence[float]],
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets, predicted classes and class probabilities of the items, one image at a time.

    Test images are only standardised with the training set's statistics (Sec. 4.5).
    """
    from histokd.resdist.dataset import RegionImages

    images = RegionImages(items, [tag], {tag: stats}, augment=False, cache=False)
    model.eval()
    targets, probabilities = [], []
    for i in range(len(images)):
        item = images[i]
        _, logits = model(item["images"][0][None].to(device))
        probabilities.append(torch.softmax(logits.float(), 1)[0].cpu().numpy())
        targets.append(item["label"])
    probs = np.stack(probabilities) if probabilities else np.zeros((0, 0))
    return (
        np.asarray(targets, dtype=np.int64),
        probs.argmax(1) if len(probs) else np.zeros(0, np.int64),
        probs,
    )


def forward_gflops(model: nn.Module, height: int, width: int) -> float:
    """GFLOPs (multiply-add = 2) of one forward pass on one ``3 x height x width`` image."""
    from torch.utils.flop_counter import FlopCounterMode

    meta_model = copy.deepcopy(model).to("meta").eval()
    image = torch.empty(1, 3, int(height), int(width), device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta_model(image)
    return counter.get_total_flops() / 1e9


def metric_intervals(
    targets: np.ndarray,
    predictions: np.ndarray,
    num_classes: int,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    metrics: Sequence[str] = tuple(METRICS),
) -> dict[str, BootstrapInterval]:
    """Each metric with its bootstrap interval over the test images (Sec. 4.5)."""
    targets, predictions = np.asarray(targets, np.int64), np.asarray(predictions, np.int64)
    if len(targets) != len(predictions):
        raise ValueError(
            f"metric_intervals: {len(targets)} targets but {len(predictions)} predictions"
        )
    counts = np.zeros((len(targets), num_classes, num_classes))
    counts[np.arange(len(targets)), targets, predictions] = 1
    out = {}
    for name in metrics:
        if name not in METRICS:
            raise ValueError(f"metric {name!r}: allowed: {', '.join(METRICS)}")
        out[name] = bootstrap_confusion_ci(
            counts, METRICS[name], n_resamples=n_resamples, confidence=confidence, seed=seed
        )
    return out


def _size(record: RegionRecord, magnification: float) -> tuple[int, int]:
    w, h = TissueRegion(
        record.slide, 0, record.x, record.y, record.width, record.height, record.base_magnification
    ).size_at(magnification)
    return h, w


def evaluate_model(
    model_path: str,
    region_set: RegionSet,
    splits: Sequence[str] = ("test",),
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> ModelEvaluation:
    """Evaluate one model file on the labelled regions of ``splits`` at its own magnification.

    Raises:
        ValueError: The model's classes differ from the data's, or there are fewer than 2 images.
    """
    from histokd.resdist.training import load_model_file

    model, meta = load_model_file(model_path, device)
    if list(meta.get("class_names", region_set.class_names)) != list(region_set.class_names):
        raise ValueError(
            f"{model_path}: classes {meta.get('class_names')} differ from the data's {list(region_set.class_names)}"
        )
    mag = float(meta["magnification"])
    tag = magnification_tag(mag)
    records = region_set.select(splits, labelled=True)
    if len(records) < 2:
        raise ValueError(
            f"splits {list(splits)}: {len(records)} labelled regions; need at least 2 to evaluate"
        )
    items = region_set.items(splits, [mag], labelled=True)
    targets, predictions, _ = predict(model, items, tag, meta["stats"], device)
    intervals = metric_intervals(
        targets, predictions, region_set.num_classes, n_resamples, confidence, seed
    )
    sizes = [_size(r, mag) for r in records]
    cache: dict[tuple[int, int], float] = {}
    for size in sizes:
        if size not in cache:
            cache[size] = forward_gflops(model, *size)
    heights, widths = np.array([s[0] for s in sizes]), np.array([s[1] for s in sizes])
    median = (int(math.floor(np.median(heights) + 0.5)), int(math.floor(np.median(widths) + 0.5)))
    return ModelEvaluation(
        method=str(meta.get("method", "model")), magnification=mag, run_name=str(meta.get("run_name", "")),
        model_path=str(model_path), num_images=len(targets), metrics=intervals,
        gflops_median=forward_gflops(model, *median), gflops_mean=float(np.mean([cache[s] for s in sizes])),
        median_size=median, targets=targets.tolist(), predictions=predictions.tolist(),
    )  # fmt: skip
