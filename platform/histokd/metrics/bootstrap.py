"""Bootstrap confidence intervals of metrics, seeded and vectorised (``scipy.stats.bootstrap``).

Two entry points:

* :func:`bootstrap_ci` for any statistic of paired per-sample arrays (for example the
  difference of two models' per-patch errors in resolution distillation);
* :func:`bootstrap_confusion_ci` for a metric of a confusion matrix (accuracy, macro F1, mIoU),
  resampling samples (images) with their per-sample confusion counts. Classification gives one
  count per sample; segmentation gives an image's pixel counts, so images, not pixels, are
  resampled (pixels of one image are not independent);
* :func:`bootstrap_auroc_ci` for AUROC, resampling images with their predicted probabilities.

Both resample with replacement ``n_resamples`` times (10,000 by default) from a generator seeded
by ``seed``, so the same inputs give the same interval, and keep the bootstrap distribution, so
intervals of averages over several test sets can be formed from it (see
``histokd.finetune.evaluation``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

__all__ = [
    "BootstrapInterval",
    "bootstrap_auroc_ci",
    "bootstrap_ci",
    "bootstrap_confusion_ci",
    "percentile_interval",
]


@dataclass(frozen=True)
class BootstrapInterval:
    """A point estimate with its bootstrap interval.

    Attributes:
        estimate: The statistic on the full sample.
        low: Lower end of the interval.
        high: Upper end of the interval.
        confidence: Confidence level, e.g. 0.95.
        n_resamples: Number of bootstrap resamples.
        method: ``percentile`` or ``BCa``.
        distribution: The statistic on every resample (not part of ``as_dict``).
    """

    estimate: float
    low: float
    high: float
    confidence: float
    n_resamples: int
    method: str
    distribution: np.ndarray = field(repr=False, compare=False, default_factory=lambda: np.empty(0))

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """``{prefix}`` + estimate / ci_low / ci_high."""
        return {
            f"{prefix}": self.estimate,
            f"{prefix}_ci_low": self.low,
            f"{prefix}_ci_high": self.high,
        }

    def __str__(self) -> str:
        return f"{self.estimate:.4f} [{self.low:.4f}, {self.high:.4f}]"


def percentile_interval(distribution: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The central ``confidence`` interval of a bootstrap distribution (NaNs dropped)."""
    values = np.asarray(distribution, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _check(n_resamples: int, confidence: float, method: str) -> None:
    if not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(
            f"n_resamples={n_resamples!r}: must be a positive integer (10,000 is usual)"
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r}: must be in (0, 1), e.g. 0.95")
    if method not in ("percentile", "BCa", "basic"):
        raise ValueError(f"method={method!r}: allowed: percentile, BCa, basic")


def bootstrap_ci(
    statistic: Callable[..., np.ndarray],
    samples: Sequence[np.ndarray],
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    method: str = "percentile",
) -> BootstrapInterval:
    """Bootstrap interval of a statistic of paired samples (resampled together along axis 0).

    Args:
        statistic: ``statistic(*resampled, axis=-1)``: vectorised over the last axis, like
            ``np.mean``; it receives each sample with the resampled axis last.
        samples: Arrays of equal length n (axis 0), resampled with the same indices.
        n_resamples: Bootstrap resamples.
        confidence: Confidence level.
        seed: Seed of the resampling.
        method: ``percentile`` (default), ``BCa`` or ``basic`` (see ``scipy.stats.bootstrap``).

    Returns:
        The interval, with the bootstrap distribution.
    """
    _check(n_resamples, confidence, method)
    arrays = [np.moveaxis(np.asarray(s), 0, -1) for s in samples]
    lengths = {a.shape[-1] for a in arrays}
    if len(lengths) != 1:
        raise ValueError(f"bootstrap_ci: samples differ in length along axis 0: {sorted(lengths)}")
    n = lengths.pop()
    if n < 2:
        raise ValueError(f"bootstrap_ci: need at least 2 samples, got {n}")
    estimate = float(statistic(*arrays, axis=-1))
    return _interval(arrays, statistic, estimate, n_resamples, confidence, method, seed,
                     batch=_batch_size(n, 1), paired=True)  # fmt: skip


def _interval(data, statistic, estimate, n_resamples, confidence, method, seed, **kwargs):
    """SciPy's vectorised bootstrap as a :class:`BootstrapInterval`."""
    result = stats.bootstrap(
        data, statistic, n_resamples=n_resamples, vectorized=True, axis=-1,
        confidence_level=confidence, method=method, rng=np.random.default_rng(seed), **kwargs,
    )  # fmt: skip
    return BootstrapInterval(
        estimate=estimate,
        low=float(result.confidence_interval.low),
        high=float(result.confidence_interval.high),
        confidence=confidence,
        n_resamples=n_resamples,
        method=method,
        distribution=np.asarray(result.bootstrap_distribution, dtype=np.float64),
    )


def _batch_size(n: int, width: int) -> int:
    """Resamples per vectorised call, to keep each call's arrays near 64 MB."""
    return int(max(1, min(10_000, 8_000_000 // max(1, n * width))))


def bootstrap_confusion_ci(
    per_sample_confusion: np.ndarray,
    metric: Callable[[np.ndarray], np.ndarray],
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    method: str = "percentile",
) -> BootstrapInterval:
    """Bootstrap interval of a confusion-matrix metric, resampling samples.

    Args:
        per_sample_confusion: ``n x C x C`` counts of each sample (a one-hot matrix for an image
            label, the pixel counts of an image for segmentation).
        metric: Maps ``... x C x C`` to ``...`` (``accuracy``, ``mean_iou``, or a lambda over
            ``macro_precision_recall_f1``).
        n_resamples: Bootstrap resamples.
        confidence: Confidence level.
        seed: Seed of the resampling.
        method: ``percentile`` (default), ``BCa`` or ``basic``.

    Returns:
        The interval, with the bootstrap distribution.
    """
    _check(n_resamples, confidence, method)
    confusion = np.asarray(per_sample_confusion, dtype=np.float64)
    if confusion.ndim != 3 or confusion.shape[1] != confusion.shape[2]:
        raise ValueError(
            f"bootstrap_confusion_ci: need n x C x C counts, got shape {confusion.shape}"
        )
    n, c = confusion.shape[0], confusion.shape[1]
    if n < 2:
        raise ValueError(f"bootstrap_confusion_ci: need at least 2 samples, got {n}")
    flat = confusion.reshape(n, c * c)

    def statistic(index: np.ndarray, axis: int = -1) -> np.ndarray:
        # index holds resampled sample numbers, resamples along the leading axes; the resample's
        # confusion is the sum of its samples' counts: multiplicity @ counts.
        index = np.asarray(index, dtype=np.int64)
        lead = index.shape[:-1]
        rows = index.reshape(-1, n)
        offsets = np.arange(rows.shape[0])[:, None] * n
        multiplicity = np.bincount((rows + offsets).ravel(), minlength=rows.shape[0] * n).reshape(
            -1, n
        )
        summed = (multiplicity @ flat).reshape(*lead, c, c)
        return np.asarray(metric(summed), dtype=np.float64)

    estimate = float(metric(confusion.sum(0)))
    return _interval((np.arange(n),), statistic, estimate, n_resamples, confidence, method, seed,
                     batch=_batch_size(n, 2))  # fmt: skip


def bootstrap_auroc_ci(
    target: np.ndarray,
    probability: np.ndarray,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapInterval:
    """Percentile interval of AUROC (``histokd.metrics.auroc``), resampling samples.

    A resample that lacks a class has no AUROC for it (binary: none at all); such resamples
    are left out of the percentiles (their NaN stays in ``distribution``).

    Args:
        target: ``n`` true class indices.
        probability: ``n x C`` predicted probabilities.
        n_resamples: Bootstrap resamples.
        confidence: Confidence level.
        seed: Seed of the resampling.
    """
    from histokd.metrics.classification import auroc

    _check(n_resamples, confidence, "percentile")
    target = np.asarray(target, dtype=np.int64)
    probability = np.asarray(probability, dtype=np.float64)
    n, c = probability.shape
    if n < 2 or target.shape != (n,):
        raise ValueError(
            f"bootstrap_auroc_ci: need n >= 2 targets and n x C probabilities, got target shape "
            f"{target.shape} and probability shape {probability.shape}"
        )
    # Per class, the samples in score order and their tie groups: a resample's AUROC is then
    # sum over tie groups of W_pos(g) * (W_neg(below g) + W_neg(g) / 2) / (W_pos * W_neg), with
    # W the resample's multiplicities: linear in n, where ranking each resample is not.
    classes = [1] if c == 2 else list(range(c))
    plans = []
    for k in classes:
        order = np.argsort(probability[:, k], kind="stable")
        scores = probability[order, k]
        starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])
        plans.append((order, starts, target[order] == k))

    def statistic(index: np.ndarray, axis: int = -1) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        lead = index.shape[:-1]
        rows = index.reshape(-1, n)
        offsets = np.arange(rows.shape[0])[:, None] * n
        weight = np.bincount((rows + offsets).ravel(), minlength=rows.size).reshape(-1, n)
        per_class = []
        for order, starts, positive in plans:
            w = weight[:, order].astype(np.float64)
            w_pos = np.add.reduceat(np.where(positive, w, 0.0), starts, axis=1)
            w_neg = np.add.reduceat(np.where(positive, 0.0, w), starts, axis=1)
            below = np.cumsum(w_neg, axis=1) - w_neg
            pairs = w_pos.sum(1) * w_neg.sum(1)
            won = (w_pos * (below + w_neg / 2)).sum(1)
            per_class.append(np.where(pairs > 0, won / np.where(pairs > 0, pairs, 1), np.nan))
        stacked = np.stack(per_class, -1)
        defined = ~np.isnan(stacked)
        with np.errstate(invalid="ignore", divide="ignore"):
            value = np.where(defined, stacked, 0).sum(-1) / defined.sum(-1)
        return value.reshape(lead)

    estimate = float(auroc(target, probability))
    with warnings.catch_warnings():  # resamples without a class are NaN: SciPy warns, and
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)  # its interval is redone
        interval = _interval((np.arange(n),), statistic, estimate, n_resamples, confidence,
                             "percentile", seed, batch=_batch_size(n, 2 * len(classes)))  # fmt: skip
    low, high = percentile_interval(interval.distribution, confidence)
    return BootstrapInterval(estimate, low, high, confidence, n_resamples, "percentile",
                             interval.distribution)  # fmt: skip
