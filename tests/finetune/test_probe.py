"""The frozen-backbone linear probe and kNN (`histokd.finetune.probe`) on synthetic features."""

import numpy as np
import pytest

from histokd.finetune.evaluation import summarize_splits
from histokd.finetune.probe import fit_linear_probe, knn_probabilities, probe_result


def _blobs(n: int, classes: int, dim: int, spread: float, seed: int):
    """``n`` points per class around random centres (norm ~ 3), ``spread`` their std."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 3 / np.sqrt(dim) * 3
    y = np.repeat(np.arange(classes), n)
    return centres[y] + rng.normal(scale=spread, size=(len(y), dim)), y


@pytest.mark.parametrize("probe", ["linear", "knn"])
def test_probes_separate_separable_features_and_are_at_chance_on_shuffled_labels(probe):
    x, y = _blobs(60, 3, 16, 0.5, seed=0)
    rng = np.random.default_rng(1)
    order = rng.permutation(len(y))
    train, val, test = order[:100], order[100:140], order[140:]

    def predict(train_y):
        if probe == "linear":
            return fit_linear_probe(x[train], train_y, x[val], y[val], x[test], 3)[0]
        return knn_probabilities(x[train], train_y, x[test], 3, k=20)

    prob = predict(y[train])
    assert prob.shape == (40, 3) and np.allclose(prob.sum(1), 1)
    result = probe_result(probe, 1.0, 0, test, y[test], prob, ["a", "b", "c"], len(train))
    assert result["test"]["accuracy"] >= 0.95 and result["test"]["auroc"] >= 0.98
    assert np.trace(result["test_confusion"]) == round(40 * result["test"]["accuracy"])
    summary = summarize_splits([result], n_resamples=200)  # the fine-tuning metrics, as they are
    assert summary["metrics"]["accuracy"]["mean"] == result["test"]["accuracy"]
    assert summary["metrics"]["accuracy"]["ci_low"] <= result["test"]["accuracy"]
    # labels unrelated to the features: near chance (1/3) over a larger test set
    x, y = _blobs(300, 3, 16, 0.5, seed=2)
    shuffled = np.random.default_rng(3).permutation(y)
    train, val, test = np.arange(0, 900, 3), np.arange(1, 900, 3), np.arange(2, 900, 3)
    if probe == "linear":
        prob = fit_linear_probe(x[train], shuffled[train], x[val], shuffled[val], x[test], 3)[0]
    else:
        prob = knn_probabilities(x[train], shuffled[train], x[test], 3, k=20)
    assert abs(np.mean(prob.argmax(1) == shuffled[test]) - 1 / 3) < 0.1


def test_linear_probe_chooses_c_on_validation():
    # the class signal hides under a large noise shared by both features: only a weakly
    # regularised model (C >= 1) learns x0 - x1 and cancels it; strong regularisation keeps the
    # class-mean direction (x0 alone) and stays near chance
    rng = np.random.default_rng(0)

    def rows(n):
        y = rng.integers(0, 2, n)
        shared = rng.normal(scale=3.0, size=n)
        signal = (2 * y - 1) * 0.5 + shared + rng.normal(scale=0.2, size=n)
        return np.stack([signal, shared], 1), y

    (tx, ty), (vx, vy), (sx, sy) = rows(200), rows(200), rows(200)
    prob, chosen, scores = fit_linear_probe(tx, ty, vx, vy, sx, 2)
    assert set(scores) == {1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0}
    assert chosen == 1.0  # the best validation accuracy, ties to the stronger regularisation
    assert scores[1.0] >= 0.98 and scores[1e-3] < 0.6
    assert np.mean(prob.argmax(1) == sy) >= 0.95
    # standardised with the training rows' statistics: feature units and offsets change nothing
    scale, shift = np.array([1000.0, 0.001]), np.array([5.0, -300.0])
    rescaled = fit_linear_probe(
        tx * scale + shift, ty, vx * scale + shift, vy, sx * scale + shift, 2
    )
    assert rescaled[1] == chosen and np.allclose(rescaled[0], prob, atol=1e-6)
    # the choice follows the validation labels: flipped, the near-chance C wins
    assert fit_linear_probe(tx, ty, vx, 1 - vy, sx, 2)[1] == 1e-3


def test_knn_uses_cosine_and_at_most_n_train_neighbours():
    # cosine: the direction counts, not the length ([8, 9] is nearer [10, 0] in Euclidean
    # distance, nearer [0, 1] in angle); two training rows, k = 20 -> 2 neighbours
    train = np.array([[10.0, 0.0], [0.0, 1.0]])
    test = np.array([[100.0, 1.0], [8.0, 9.0]])
    one = knn_probabilities(train, np.array([0, 1]), test, 2, k=1)
    assert np.allclose(one, [[1, 0], [0, 1]], atol=1e-6)
    # k = 20 > 2 rows: both neighbours vote, weighted by exp(cosine / 0.07) (DINO)
    both = knn_probabilities(train, np.array([0, 1]), test, 2, k=20)
    cos = (test / np.linalg.norm(test, axis=1, keepdims=True)) @ (
        train / np.linalg.norm(train, axis=1, keepdims=True)
    ).T
    weights = np.exp(cos / 0.07)
    assert np.allclose(both, weights / weights.sum(1, keepdims=True), atol=1e-9)
    assert both.argmax(1).tolist() == [0, 1]


def test_knn_with_fewer_rows_than_k_is_not_a_majority_vote():
    # 1 % labels: 3 rows of class 0, 2 of class 1, k = 20 takes them all; a plain majority vote
    # would call every image class 0, the weighted vote follows the nearest rows
    rng = np.random.default_rng(0)
    centres = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    train_y = np.array([0, 0, 0, 1, 1])
    train_x = centres[train_y] + rng.normal(scale=0.1, size=(5, 3))
    test_y = rng.integers(0, 2, 200)
    test_x = centres[test_y] + rng.normal(scale=0.1, size=(200, 3))
    prob = knn_probabilities(train_x, train_y, test_x, 2, k=20)
    assert np.mean(prob.argmax(1) == test_y) >= 0.95
