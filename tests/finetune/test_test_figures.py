"""Fine-tuning's pictures of its test predictions (`histokd.finetune.report.write_test_figures`):
the numbers drawn are the summary's confusion matrix, the metrics' AUROC and per-class values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histokd.finetune.evaluation import summarize_splits
from histokd.finetune.report import TEST_FIGURES, roc_curves, write_test_figures
from histokd.metrics import auroc, binary_auroc, confusion_matrix, precision_recall_f1


def _result(split: int, target, probability) -> dict:
    """A classification split's result.json, as the fine-tuning loop writes it."""
    target = np.asarray(target)
    probability = np.asarray(probability, dtype=np.float64)
    prediction = probability.argmax(1)
    c = probability.shape[1]
    confusion = np.zeros((c, c), np.int64)
    np.add.at(confusion, (target, prediction), 1)
    return {
        "split": split, "task": "classification", "best_epoch": 1, "stopped_epoch": 2,
        "test_confusion": confusion.tolist(),
        "test_records": {"index": list(range(len(target))), "target": target.tolist(),
                         "prediction": prediction.tolist(), "probability": probability.tolist()},
    }  # fmt: skip


def _random_results(num_splits: int, c: int, n: int = 40, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    results = []
    for split in range(num_splits):
        target = np.r_[np.arange(c), rng.integers(0, c, n - c)]
        logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[target]
        logits[:4] = np.round(logits[:4])  # some tied scores
        probability = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        results.append(_result(split, target, probability))
    return results


def _summary(results, names):
    summary = summarize_splits(results, n_resamples=200)
    summary["class_names"] = list(names)
    return summary


def _image(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_three_classes_pooled_over_two_splits(tmp_path):
    names = ("tumour", "stroma", "normal")
    results = _random_results(2, 3)
    summary = _summary(results, names)
    files = write_test_figures(summary, results, tmp_path)
    assert set(files) == {"confusion_matrix", "roc_curve", "per_class_metrics", "numbers"}
    for key in ("confusion_matrix", "roc_curve", "per_class_metrics"):
        assert Path(files[key]).name == TEST_FIGURES[key]
        width, height = _image(files[key])
        assert width > 300 and height > 300
    numbers = json.loads(Path(files["numbers"]).read_text())
    # the matrix drawn is the summary's (summed over the splits) and the pooled records' counts
    pooled_target = np.concatenate([r["test_records"]["target"] for r in results])
    pooled_prediction = np.concatenate([r["test_records"]["prediction"] for r in results])
    counts = confusion_matrix(pooled_prediction, pooled_target, 3)
    assert numbers["confusion_matrix"] == summary["confusion_matrix"] == np.asarray(counts).tolist()
    recall = np.asarray(numbers["recall_matrix"])
    np.testing.assert_allclose(recall.sum(1), 1.0)
    np.testing.assert_allclose(np.diag(recall), precision_recall_f1(counts)[1])
    # one-vs-rest curves, each AUC the Mann-Whitney AUROC of the pooled probabilities
    probability = np.concatenate([r["test_records"]["probability"] for r in results])
    assert list(numbers["roc_auc"]) == [f"{n} vs rest" for n in names]
    for k, name in enumerate(names):
        expected = float(binary_auroc(pooled_target == k, probability[:, k]))
        assert numbers["roc_auc"][name + " vs rest"] == pytest.approx(expected, abs=1e-12)
    assert np.mean(list(numbers["roc_auc"].values())) == pytest.approx(
        float(auroc(pooled_target, probability)), abs=1e-12
    )
    precision, recall_k, f1 = precision_recall_f1(np.asarray(summary["confusion_matrix"]))
    assert numbers["per_class"] == {"precision": precision.tolist(), "recall": recall_k.tolist(),
                                    "f1": f1.tolist()}  # fmt: skip
    assert names == tuple(numbers["class_names"]) and numbers["pooled_splits"] == 2


def test_binary_one_split_roc_auc_is_the_summarys_auroc(tmp_path):
    results = _random_results(1, 2, n=30, seed=4)
    summary = _summary(results, ("benign", "malignant"))
    numbers = json.loads(
        Path(write_test_figures(summary, results, tmp_path)["numbers"]).read_text()
    )
    assert list(numbers["roc_auc"]) == ["malignant vs benign"]
    probability = np.asarray(results[0]["test_records"]["probability"])
    target = np.asarray(results[0]["test_records"]["target"])
    assert len(roc_curves(target, probability, ["benign", "malignant"])) == 1  # class 1 only
    assert numbers["roc_auc"]["malignant vs benign"] == pytest.approx(
        summary["metrics"]["auroc"]["mean"], abs=1e-12
    )
    # macro F1 of the drawn per-class values is the summary's
    assert np.mean(numbers["per_class"]["f1"]) == pytest.approx(
        summary["metrics"]["macro_f1"]["mean"]
    )


def test_roc_curve_steps_over_tied_scores_and_ends_at_one():
    target = np.array([1, 0, 1, 0, 1, 0])
    score = np.array([0.9, 0.9, 0.6, 0.4, 0.4, 0.1])
    probability = np.stack([1 - score, score], 1)
    (curve,) = roc_curves(target, probability, ["n", "p"])
    np.testing.assert_allclose(curve["tpr"], [0, 1 / 3, 2 / 3, 1, 1])
    np.testing.assert_allclose(curve["fpr"], [0, 1 / 3, 1 / 3, 2 / 3, 1])
    # by hand, each positive against the 3 negatives (a tie one half): 2.5 + 2 + 1.5 of 9 pairs
    assert curve["auc"] == pytest.approx(6 / 9)
    assert curve["auc"] == pytest.approx(float(binary_auroc(target == 1, score)))


def test_segmentation_draws_the_pixel_confusion_matrix_only(tmp_path):
    summary = {"task": "segmentation", "num_splits": 1, "class_names": ["bg", "gland"],
               "splits": [{"confusion_matrix": [[900, 100], [50, 950]]}]}  # fmt: skip
    files = write_test_figures(summary, [], tmp_path)
    assert set(files) == {"confusion_matrix", "numbers"}
    numbers = json.loads(Path(files["numbers"]).read_text())
    assert numbers["confusion_matrix"] == [[900, 100], [50, 950]]
    assert numbers["recall_matrix"] == [[0.9, 0.1], [0.05, 0.95]]
    _image(files["confusion_matrix"])


def test_no_probabilities_no_roc_curve(tmp_path):
    results = _random_results(1, 3, seed=2)
    results[0]["test_records"]["probability"] = []
    summary = _summary(results, ("a", "b", "c"))
    files = write_test_figures(summary, results, tmp_path)
    assert set(files) == {"confusion_matrix", "per_class_metrics", "numbers"}
