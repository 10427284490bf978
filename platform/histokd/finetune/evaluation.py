"""From per-split test results to the numbers RCKD reports: mean and spread over the splits.

RCKD (Algorithm 2, line 16) reports the mean test performance over five splits. Here each
metric also gets its standard deviation over the splits (sample standard deviation, ddof = 1),
a bootstrap 95% interval on each split's test set, and an interval for the five-split mean:
every split's test set is resampled independently (same number of resamples), the metric is
averaged over the splits resample by resample, and the percentile interval of those averages is
taken. That interval covers test-set sampling noise, not the spread due to the split itself,
which the standard deviation shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from histokd.metrics import (
    accuracy,
    bootstrap_confusion_ci,
    macro_precision_recall_f1,
    mean_iou,
    percentile_interval,
)

__all__ = ["METRICS", "PRIMARY_METRIC", "per_sample_confusion", "summarize_splits"]

#: Metric name -> function of ``... x C x C`` confusion matrices.
METRICS = {
    "accuracy": accuracy,
    "macro_precision": lambda c: macro_precision_recall_f1(c)[0],
    "macro_recall": lambda c: macro_precision_recall_f1(c)[1],
    "macro_f1": lambda c: macro_precision_recall_f1(c)[2],
    "miou": mean_iou,
}

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
        metrics: Metrics to summarise (default: all of `METRICS`).

    Returns:
        ``{"task", "primary_metric", "num_splits", "metrics": {name: {"mean", "std", "values",
        "ci_low", "ci_high"}}, "splits": [{"split", "best_epoch", "stopped_epoch", name: value,
        name + "_ci_low", name + "_ci_high", ...}]}``.
    """
    if not results:
        raise ValueError("summarize_splits: no split results")
    task = results[0]["task"]
    names = list(metrics or METRICS)
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(f"metrics {unknown}: allowed: {', '.join(METRICS)}")
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
        for name in names:
            row[name] = float(result["test"][name])
            if len(counts) >= 2:
                interval = bootstrap_confusion_ci(
                    counts,
                    METRICS[name],
                    n_resamples=n_resamples,
                    confidence=confidence,
                    seed=seed + int(result["split"]),
                )
                row[f"{name}_ci_low"], row[f"{name}_ci_high"] = interval.low, interval.high
                distributions[name].append(interval.distribution)
            else:
                row[f"{name}_ci_low"] = row[f"{name}_ci_high"] = float("nan")
        splits.append(row)
    summary_metrics = {}
    for name in names:
        values = np.array([row[name] for row in splits], dtype=np.float64)
        entry = {
            "mean": float(np.nanmean(values)),
            "std": float(np.nanstd(values, ddof=1)) if len(values) > 1 else 0.0,
            "values": values.tolist(),
        }
        if len(distributions[name]) == len(splits):
            mean_distribution = np.mean(np.stack(distributions[name]), axis=0)
            entry["ci_low"], entry["ci_high"] = percentile_interval(mean_distribution, confidence)
        else:
            entry["ci_low"] = entry["ci_high"] = float("nan")
        summary_metrics[name] = entry
    return {
        "task": task,
        "primary_metric": PRIMARY_METRIC[task],
        "num_splits": len(splits),
        "confidence": confidence,
        "n_resamples": n_resamples,
        "metrics": summary_metrics,
        "splits": splits,
    }
