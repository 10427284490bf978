"""From per-split test results to the numbers RCKD reports: mean and spread over the splits.

RCKD (Algorithm 2, line 16) reports the mean test performance over five splits. Here each
metric also gets its standard deviation over the splits (sample standard deviation, ddof = 1),
a bootstrap 95% interval on each split's test set, and an interval for the five-split mean:
every split's test set is resampled independently (same number of resamples), the metric is
averaged over the splits resample by resample, and the percentile interval of those averages is
taken. That interval covers test-set sampling noise, not the spread due to the split itself,
which the standard deviation shows. With one split there is no spread over splits, and the
tables show the bootstrap interval instead (``histokd.finetune.report``).

For classification each split also keeps its test confusion matrix and a
``single_class_predictions`` flag (every test image predicted as one class: a collapsed model
that accuracy alone can hide on an unbalanced test set), and AUROC comes from the predicted
probabilities the split's records keep.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from histokd.metrics import (
    accuracy,
    auroc,
    balanced_accuracy,
    bootstrap_auroc_ci,
    bootstrap_confusion_ci,
    macro_precision_recall_f1,
    mean_iou,
    percentile_interval,
)

__all__ = [
    "CLASSIFICATION_METRICS",
    "METRICS",
    "PRIMARY_METRIC",
    "PROBABILITY_METRICS",
    "per_sample_confusion",
    "single_class_predictions",
    "summarize_splits",
]

#: Metric name -> function of ``... x C x C`` confusion matrices.
METRICS = {
    "accuracy": accuracy,
    "balanced_accuracy": balanced_accuracy,
    "macro_precision": lambda c: macro_precision_recall_f1(c)[0],
    "macro_recall": lambda c: macro_precision_recall_f1(c)[1],
    "macro_f1": lambda c: macro_precision_recall_f1(c)[2],
    "miou": mean_iou,
}

#: Metric name -> function of (targets, probabilities); classification only.
PROBABILITY_METRICS = {"auroc": auroc}

#: What a classification summary holds, in table order: what the field reports first.
CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc",
                          "macro_precision", "macro_recall", "miou")  # fmt: skip

#: What RCKD reports per task (Sec. 2.4, Eq. 12).
PRIMARY_METRIC = {"classification": "accuracy", "segmentation": "miou"}


def per_sample_confusion(result: dict[str, Any]) -> np.ndarray:
    """``n x C x C`` test counts of one split: one-hot per image, or each image's pixel counts."""
    c = len(result["test_confusion"])
    records = result["test_records"]
    if result["task"] == "classification":
        target = np.asarray(records["target"], dtype=np.int64)
        prediction = np.asarray(records["prediction"], dtype=np.int64)
        counts = np.zeros((len(target), c, c))
        counts[np.arange(len(target)), target, prediction] = 1
        return counts
    return np.asarray(records["confusion"], dtype=np.float64).reshape(-1, c, c)


def single_class_predictions(result: dict[str, Any]) -> bool:
    """Whether every test prediction of a classification split is the same class."""
    predictions = result["test_records"].get("prediction") or []
    return result["task"] == "classification" and len(set(predictions)) == 1


def _probabilities(result: dict[str, Any]) -> np.ndarray | None:
    """The split's ``n x C`` test probabilities, or None where its records lack them."""
    records = result["test_records"]
    probability = records.get("probability") or []
    if not probability or len(probability) != len(records["target"]):
        return None
    return np.asarray(probability, dtype=np.float64)


def summarize_splits(
    results: Sequence[dict[str, Any]],
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    metrics: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Mean, standard deviation and bootstrap intervals over the splits' test results.

    Args:
        results: One ``result.json`` per split (see ``histokd.finetune.loop``).
        n_resamples: Bootstrap resamples per split.
        confidence: Confidence level.
        seed: Bootstrap seed; split i uses ``seed + i``.
        metrics: Metrics to summarise (default: `CLASSIFICATION_METRICS` for classification,
            all of `METRICS` for segmentation).

    Returns:
        ``{"task", "primary_metric", "num_splits", "metrics": {name: {"mean", "std", "values",
        "ci_low", "ci_high"}}, "splits": [{"split", "best_epoch", "stopped_epoch", name: value,
        name + "_ci_low", name + "_ci_high", "confusion_matrix", ...}]}``; for classification
        also ``single_class_predictions`` (any split), ``single_class_splits`` and
        ``confusion_matrix`` (summed over the splits). AUROC is NaN for a split whose records
        hold no probabilities.
    """
    if not results:
        raise ValueError("summarize_splits: no split results")
    task = results[0]["task"]
    classification = task == "classification"
    names = list(metrics or (CLASSIFICATION_METRICS if classification else METRICS))
    allowed = {**METRICS, **(PROBABILITY_METRICS if classification else {})}
    unknown = [m for m in names if m not in allowed]
    if unknown:
        raise ValueError(f"metrics {unknown}: allowed for {task}: {', '.join(allowed)}")
    splits: list[dict[str, Any]] = []
    distributions: dict[str, list[np.ndarray]] = {m: [] for m in names}
    for result in sorted(results, key=lambda r: r["split"]):
        row: dict[str, Any] = {
            "split": result["split"],
            "best_epoch": result["best_epoch"],
            "stopped_epoch": result["stopped_epoch"],
        }
        counts = per_sample_confusion(result)
        row["test_samples"] = len(counts)  # images (for segmentation not pixels)
        confusion = np.asarray(result["test_confusion"])
        probability = _probabilities(result) if classification else None
        for name in names:
            interval = None
            if name in PROBABILITY_METRICS:
                target = np.asarray(result["test_records"]["target"], dtype=np.int64)
                row[name] = (
                    float(PROBABILITY_METRICS[name](target, probability))
                    if probability is not None
                    else float("nan")
                )
                if probability is not None and len(target) >= 2:
                    interval = bootstrap_auroc_ci(target, probability, n_resamples, confidence,
                                                  seed + int(result["split"]))  # fmt: skip
            else:
                row[name] = float(METRICS[name](confusion))
                if len(counts) >= 2:
                    interval = bootstrap_confusion_ci(
                        counts,
                        METRICS[name],
                        n_resamples=n_resamples,
                        confidence=confidence,
                        seed=seed + int(result["split"]),
                    )
            if interval is not None:
                row[f"{name}_ci_low"], row[f"{name}_ci_high"] = interval.low, interval.high
                distributions[name].append(interval.distribution)
            else:
                row[f"{name}_ci_low"] = row[f"{name}_ci_high"] = float("nan")
        row["confusion_matrix"] = confusion.tolist()
        if classification:
            row["single_class_predictions"] = single_class_predictions(result)
        splits.append(row)
    summary_metrics = {}
    for name in names:
        values = np.array([row[name] for row in splits], dtype=np.float64)
        finite = values[~np.isnan(values)]
        entry = {
            "mean": float(finite.mean()) if finite.size else float("nan"),
            "std": float(np.std(finite, ddof=1)) if finite.size > 1 else 0.0,
            "values": values.tolist(),
        }
        if len(distributions[name]) == len(splits):
            mean_distribution = np.mean(np.stack(distributions[name]), axis=0)
            entry["ci_low"], entry["ci_high"] = percentile_interval(mean_distribution, confidence)
        else:
            entry["ci_low"] = entry["ci_high"] = float("nan")
        summary_metrics[name] = entry
    summary = {
        "task": task,
        "primary_metric": PRIMARY_METRIC[task],
        "num_splits": len(splits),
        "confidence": confidence,
        "n_resamples": n_resamples,
        "metrics": summary_metrics,
        "splits": splits,
    }
    if classification:
        flagged = [row["split"] for row in splits if row["single_class_predictions"]]
        summary.update(
            single_class_predictions=bool(flagged),
            single_class_splits=flagged,
            confusion_matrix=np.sum([row["confusion_matrix"] for row in splits], axis=0).tolist(),
        )
    return summary
