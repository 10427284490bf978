"""Multi-class metrics against hand-computed confusion matrices, and the bootstrap."""

import numpy as np
import pytest
import torch

from histokd.metrics import (
    accuracy,
    bootstrap_ci,
    bootstrap_confusion_ci,
    classification_metrics,
    confusion_matrix,
    iou_per_class,
    macro_precision_recall_f1,
    mean_iou,
    percentile_interval,
)

TARGET = [0, 0, 1, 1, 2, 2]
PREDICTION = [0, 1, 1, 1, 2, 0]
# rows: true class, columns: predicted
HAND = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 1]])


def test_confusion_matrix_by_hand():
    assert confusion_matrix(PREDICTION, TARGET, 3).tolist() == HAND.tolist()
    assert (
        confusion_matrix(torch.tensor(PREDICTION), torch.tensor(TARGET), 3).tolist()
        == HAND.tolist()
    )


def test_metrics_by_hand():
    m = classification_metrics(HAND)
    assert m.accuracy == pytest.approx(4 / 6)
    # precision: 1/2, 2/3, 1/1; recall: 1/2, 2/2, 1/2
    assert m.macro_precision == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m.macro_recall == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    # F1: 1/2, 2*(2/3)(1)/(5/3) = 4/5, 2*(1)(1/2)/(3/2) = 2/3
    assert m.macro_f1 == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    # IoU (Eq. 12): 1/(1+1+1), 2/(2+1+0), 1/(1+0+1)
    assert iou_per_class(HAND).tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert m.miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m.num_samples == 6


def test_matches_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, 200)
    prediction = np.where(rng.random(200) < 0.6, target, rng.integers(0, 4, 200))
    prediction[prediction == 3] = 2  # class 3 is never predicted: precision 0 by convention
    cm = confusion_matrix(prediction, target, 4)
    p, r, f, _ = sklearn_metrics.precision_recall_fscore_support(
        target, prediction, average="macro", labels=range(4), zero_division=0
    )
    assert macro_precision_recall_f1(cm) == pytest.approx((p, r, f))
    assert accuracy(cm) == pytest.approx(sklearn_metrics.accuracy_score(target, prediction))
    assert mean_iou(cm) == pytest.approx(
        sklearn_metrics.jaccard_score(target, prediction, average="macro", zero_division=0)
    )


def test_absent_classes():
    # class 2 neither in targets nor predictions: left out of mIoU, counts 0 in macro scores
    cm = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    assert np.isnan(iou_per_class(cm)[2])
    assert mean_iou(cm) == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert macro_precision_recall_f1(cm)[0] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_pixels_with_ignore_index():
    target = torch.tensor([[0, 1], [255, 1]])
    prediction = torch.tensor([[0, 0], [1, 1]])
    assert confusion_matrix(prediction, target, 2, ignore_index=255).tolist() == [[1, 0], [1, 1]]


def test_batched_metrics_equal_single():
    stack = np.stack([HAND, np.eye(3, dtype=int) * 2])
    assert accuracy(stack).tolist() == pytest.approx([4 / 6, 1.0])
    assert mean_iou(stack).tolist() == pytest.approx([(1 / 3 + 2 / 3 + 1 / 2) / 3, 1.0])


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="differs from target"):
        confusion_matrix([0, 1], [0], 3)


def _one_hot(target, prediction, c):
    counts = np.zeros((len(target), c, c))
    counts[np.arange(len(target)), target, prediction] = 1
    return counts


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, 150)
    prediction = np.where(rng.random(150) < 0.8, target, rng.integers(0, 3, 150))
    counts = _one_hot(target, prediction, 3)
    a = bootstrap_confusion_ci(counts, accuracy, n_resamples=2000, seed=3)
    b = bootstrap_confusion_ci(counts, accuracy, n_resamples=2000, seed=3)
    assert (a.low, a.high) == (b.low, b.high)
    assert a.estimate == pytest.approx(np.mean(target == prediction))
    assert a.low < a.estimate < a.high
    # binomial standard error: the 95% interval is about +-1.96 sqrt(p(1-p)/n)
    se = np.sqrt(a.estimate * (1 - a.estimate) / 150)
    assert a.high - a.low == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert len(a.distribution) == 2000


def test_bootstrap_of_a_perfect_classifier_is_degenerate():
    target = np.array([0, 1, 2, 0, 1, 2])
    interval = bootstrap_confusion_ci(_one_hot(target, target, 3), accuracy, n_resamples=500)
    assert (interval.low, interval.estimate, interval.high) == (1.0, 1.0, 1.0)


def test_bootstrap_of_segmentation_resamples_images():
    # two images: one all correct (4 px), one all wrong (4 px)
    good = np.array([[2, 0], [0, 2]])
    bad = np.array([[0, 2], [2, 0]])
    interval = bootstrap_confusion_ci(
        np.stack([good, bad] * 10), accuracy, n_resamples=1000, seed=0
    )
    assert interval.estimate == pytest.approx(0.5)
    assert interval.low < 0.5 < interval.high
    # 20 images: width about 2 x 1.96 x sqrt(0.25 / 20) = 0.44; resampling the 80 pixels
    # independently would give about half that
    assert interval.high - interval.low == pytest.approx(0.44, abs=0.08)


def test_bootstrap_ci_of_a_mean():
    values = np.random.default_rng(1).normal(0, 1, 1000)
    interval = bootstrap_ci(np.mean, [values], n_resamples=2000, seed=0)
    assert interval.estimate == pytest.approx(values.mean())
    assert interval.high - interval.low == pytest.approx(2 * 1.96 / np.sqrt(1000), rel=0.15)
    paired = bootstrap_ci(
        lambda a, b, axis: np.mean(a - b, axis=axis), [values, values], n_resamples=200
    )
    assert (paired.low, paired.high) == (0.0, 0.0)


def test_percentile_interval():
    assert percentile_interval(np.arange(101), 0.9) == pytest.approx((5.0, 95.0))


def test_balanced_accuracy_and_macro_f1_by_hand():
    from histokd.metrics import balanced_accuracy

    # HAND: recall 1/2, 2/2, 1/2
    assert float(balanced_accuracy(HAND)) == pytest.approx(2 / 3)
    # class 1 never a target: balanced accuracy averages the two classes present
    cm = np.array([[2, 1, 0], [0, 0, 0], [1, 0, 3]])
    assert float(balanced_accuracy(cm)) == pytest.approx((2 / 3 + 3 / 4) / 2)
    # precision 2/3, 0/1, 3/3; recall 2/3, 0, 3/4; F1 2/3, 0, 2 * 1 * 3/4 / (7/4) = 6/7
    assert float(macro_precision_recall_f1(cm)[2]) == pytest.approx((2 / 3 + 0 + 6 / 7) / 3)
    m = classification_metrics(cm)
    assert m.balanced_accuracy == pytest.approx(17 / 24) and m.macro_recall == pytest.approx(
        (2 / 3 + 3 / 4) / 3
    )
    batch = np.stack([HAND, cm])  # vectorised, as the bootstrap calls it
    assert balanced_accuracy(batch).tolist() == pytest.approx([2 / 3, 17 / 24])


def test_binary_auroc_with_ties_by_hand():
    from histokd.metrics import auroc

    target = np.array([0, 0, 1, 1, 0, 1])
    score = np.array([0.1, 0.4, 0.4, 0.8, 0.8, 0.9])
    # positives 0.4, 0.8, 0.9 against negatives 0.1, 0.4, 0.8 (a tie counts 1/2):
    # 0.4: 1 + 1/2 + 0; 0.8: 1 + 1 + 1/2; 0.9: 3  ->  7 of 9 pairs
    probability = np.stack([1 - score, score], -1)
    assert float(auroc(target, probability)) == pytest.approx(7 / 9)
    assert np.isnan(auroc(np.zeros(3, int), np.full((3, 2), 0.5)))  # no positives: undefined


def test_one_vs_rest_auroc_with_ties_by_hand():
    from histokd.metrics import auroc

    target = np.array([0, 0, 1, 1, 2, 2])
    probability = np.array(
        [[0.5, 0.3, 0.2], [0.4, 0.4, 0.2], [0.4, 0.4, 0.2], [0.2, 0.5, 0.3], [0.2, 0.3, 0.5],
         [0.5, 0.2, 0.3]]
    )  # fmt: skip
    # class 0: positives .5, .4 vs .4 .2 .2 .5: 3.5 + 2.5 = 6 of 8
    # class 1: positives .4, .5 vs .3 .4 .3 .2: 3.5 + 4 = 7.5 of 8
    # class 2: positives .5, .3 vs .2 .2 .2 .3: 4 + 3.5 = 7.5 of 8
    expected = (6 / 8 + 7.5 / 8 + 7.5 / 8) / 3
    assert float(auroc(target, probability)) == pytest.approx(expected)
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    assert expected == pytest.approx(
        sklearn_metrics.roc_auc_score(target, probability, multi_class="ovr")
    )
    # class 2 absent from the targets: left out of the mean
    # class 0: positives .5 .4 .5 vs .4 .2 .2: 3 + 2.5 + 3; class 1: .4 .5 .3 vs .3 .4 .2: 2.5 + 3 + 1.5
    absent = np.array([0, 0, 1, 1, 1, 0])
    assert float(auroc(absent, probability)) == pytest.approx((8.5 / 9 + 7 / 9) / 2)


def test_bootstrap_auroc_equals_ranking_each_resample():
    from histokd.metrics import auroc, bootstrap_auroc_ci

    rng = np.random.default_rng(1)
    for c in (2, 3):
        target = rng.integers(0, c, 12)
        probability = np.round(rng.dirichlet([1] * c, 12), 1)  # rounded: many ties
        fast = bootstrap_auroc_ci(target, probability, n_resamples=300, seed=3)
        ranked = bootstrap_ci(
            lambda t, *s, axis=-1: auroc(t, np.stack(s, -1)), [target, *probability.T],
            n_resamples=300, seed=3,
        )  # fmt: skip
        assert np.allclose(fast.distribution, ranked.distribution, equal_nan=True)
        assert fast.estimate == pytest.approx(float(auroc(target, probability)))
        assert fast.low <= fast.estimate <= fast.high
    again = bootstrap_auroc_ci(target, probability, n_resamples=300, seed=3)
    assert (again.low, again.high) == (fast.low, fast.high)  # seeded
