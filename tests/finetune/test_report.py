"""Tables and charts from results: split summary, search table + Fig. 5 chart, Table 3 + Fig. 10."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from histokd.finetune.evaluation import summarize_splits
from histokd.finetune.report import (
    comparison_table,
    write_comparison_outputs,
    write_search_outputs,
    write_split_tables,
)


def _result(split, target, prediction, probability=None):
    from histokd.metrics import classification_metrics, confusion_matrix

    cm = confusion_matrix(prediction, target, 2)
    records = {"index": list(range(len(target))), "target": target, "prediction": prediction}
    if probability is not None:
        records["probability"] = [[1 - p, p] for p in probability]
    return {
        "split": split, "task": "classification", "best_epoch": 3, "stopped_epoch": 5,
        "test": classification_metrics(cm).as_dict(), "test_confusion": cm.tolist(),
        "val": classification_metrics(cm).as_dict(), "test_records": records,
    }  # fmt: skip


def test_summary_over_splits_by_hand(tmp_path):
    results = [_result(0, [0, 0, 1, 1], [0, 0, 1, 0]), _result(1, [0, 1, 1, 1], [0, 1, 1, 1])]
    summary = summarize_splits(results, n_resamples=500, seed=0)
    acc = summary["metrics"]["accuracy"]
    assert acc["values"] == [0.75, 1.0]
    assert acc["mean"] == 0.875 and math.isclose(acc["std"], np.std([0.75, 1.0], ddof=1))
    assert acc["ci_low"] <= 0.875 <= acc["ci_high"] <= 1.0
    assert (
        summary["splits"][1]["accuracy_ci_low"] == summary["splits"][1]["accuracy_ci_high"] == 1.0
    )
    files = write_split_tables(
        dict(summary, backbone="csat", init_label="RCKD", dataset="demo"), tmp_path
    )
    text = Path(files["summary_md"]).read_text()
    assert "| Accuracy | 87.5 ± 17.7 |" in text
    assert pd.read_csv(files["splits_csv"])["accuracy"].tolist() == [0.75, 1.0]


def test_summary_has_the_reported_metrics_and_confusion_matrix(tmp_path):
    # split 0: AUROC of p(class 1) .2 .6 | .6 .9 = (1/2 + 1 + 1 + 1) / 4; split 1: 3 / 3
    results = [
        _result(0, [0, 0, 1, 1], [0, 1, 1, 1], probability=[0.2, 0.6, 0.6, 0.9]),
        _result(1, [0, 1, 1, 1], [0, 1, 1, 0], probability=[0.1, 0.7, 0.8, 0.4]),
    ]
    summary = summarize_splits(results, n_resamples=300, seed=0)
    assert list(summary["metrics"])[:4] == ["accuracy", "balanced_accuracy", "macro_f1", "auroc"]
    assert summary["metrics"]["auroc"]["values"] == [3.5 / 4, 1.0]
    # balanced accuracy: (1/2 + 2/2) / 2 and (1/1 + 2/3) / 2
    assert summary["metrics"]["balanced_accuracy"]["values"] == pytest.approx([3 / 4, 5 / 6])
    # macro F1, split 1: class 0 P 1/2 R 1 F1 2/3, class 1 P 1 R 2/3 F1 4/5
    assert summary["splits"][1]["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    for name in ("balanced_accuracy", "macro_f1", "auroc"):
        row = summary["splits"][0]
        assert 0 <= row[f"{name}_ci_low"] <= row[name] <= row[f"{name}_ci_high"] <= 1
    assert summary["splits"][0]["confusion_matrix"] == [[1, 1], [0, 2]]
    assert summary["confusion_matrix"] == [[2, 1], [1, 4]]
    assert summary["single_class_predictions"] is False
    # a split without probabilities (an older result.json) has no AUROC, the rest stands
    old = summarize_splits([_result(0, [0, 1], [0, 1])], n_resamples=50)
    assert math.isnan(old["metrics"]["auroc"]["mean"]) and old["metrics"]["accuracy"]["mean"] == 1
    files = write_split_tables(dict(summary, class_names=["benign", "tumour"]), tmp_path)
    text = Path(files["summary_md"]).read_text()
    assert "| Balanced accuracy | 79.2 ± 5.9 |" in text and "| AUROC | 93.8 ± 8.8 |" in text
    assert "| true \\ predicted | pred. benign | pred. tumour |" in text
    assert "| tumour | 1 | 4 |" in text


def test_single_class_predictions_are_flagged(tmp_path):
    results = [
        _result(0, [0, 0, 1, 1], [1, 1, 1, 1], probability=[0.6, 0.7, 0.8, 0.9]),
        _result(1, [0, 1, 1, 1], [0, 1, 1, 1], probability=[0.1, 0.7, 0.8, 0.9]),
    ]
    summary = summarize_splits(results, n_resamples=100)
    assert [r["single_class_predictions"] for r in summary["splits"]] == [True, False]
    assert summary["single_class_predictions"] is True and summary["single_class_splits"] == [0]
    assert json.loads(json.dumps(summary))["single_class_predictions"] is True
    text = Path(write_split_tables(summary, tmp_path)["summary_md"]).read_text()
    lines = [line for line in text.splitlines() if line.startswith("| 0 | 3 | 5 | 4 | 50.0 |")]
    assert len(lines) == 1 and lines[0].endswith("] | † |")
    assert any(
        line.startswith("| 1 | 3 | 5 | 4 | 100.0 |") and line.endswith("] |  |")
        for line in text.splitlines()
    )
    assert "† every test prediction of a split was the same class." in text
    rows = [
        dict(_cell("Lymph", "classification", "csat", "Random Weight", 0.5, 2.8e6, 1.08), single_class_predictions=True),
        dict(_cell("Lymph", "classification", "csat", "RCKD", 0.9, 2.8e6, 1.08), single_class_predictions=False),
    ]  # fmt: skip
    table = comparison_table(rows)
    assert table["Lymph (acc %)"].tolist() == ["50.0 ± 1.0 †", "90.0 ± 1.0"]
    assert (
        "† every test prediction"
        in Path(write_comparison_outputs(rows, tmp_path)["markdown"]).read_text()
    )


def test_one_split_shows_its_bootstrap_interval_not_a_zero_std(tmp_path):
    summary = summarize_splits(
        [_result(0, [0, 0, 1, 1, 0, 1, 1, 0], [0, 1, 1, 1, 0, 1, 0, 0])], n_resamples=500, seed=0
    )
    acc = summary["metrics"]["accuracy"]
    assert acc["values"] == [0.75] and acc["ci_low"] < 0.75 < acc["ci_high"]
    text = Path(write_split_tables(summary, tmp_path)["summary_md"]).read_text()
    assert "± 0.0" not in text and "| metric | test [95% CI] (%) |" in text
    assert f"| Accuracy | 75.0 [{100 * acc['ci_low']:.1f}, {100 * acc['ci_high']:.1f}] |" in text
    row = dict(_cell("Lymph", "classification", "csat", "RCKD", 0.75, 2.8e6, 1.08), num_splits=1,
               std=0.0, ci_low=acc["ci_low"], ci_high=acc["ci_high"])  # fmt: skip
    cell = comparison_table([row]).iloc[0]["Lymph (acc %)"]
    assert cell == f"75.0 [{100 * acc['ci_low']:.1f}, {100 * acc['ci_high']:.1f}]"


def test_comparison_shows_balanced_accuracy_macro_f1_and_auroc():
    metrics = {"balanced_accuracy": 0.8, "macro_f1": 0.7, "auroc": 0.95}
    rows = []
    for dataset, shift in (("Lymph", 0.0), ("BACH", 0.1)):
        row = _cell(dataset, "classification", "csat", "RCKD", 0.9, 2.8e6, 1.08)
        for name, value in metrics.items():
            row.update({f"{name}_mean": value - shift, f"{name}_std": 0.02,
                        f"{name}_ci_low": math.nan, f"{name}_ci_high": math.nan})  # fmt: skip
        rows.append(row)
    table = comparison_table(rows).iloc[0]
    assert list(table.index[4:8]) == [
        "Lymph (acc %)", "Lymph (bal. acc %)", "Lymph (macro-F1 %)", "Lymph (AUROC %)",
    ]  # fmt: skip
    assert table["Lymph (bal. acc %)"] == "80.0 ± 2.0" and table["BACH (AUROC %)"] == "85.0 ± 2.0"
    assert table["Average bal. acc (%)"] == "75.0" and table["Average macro-F1 (%)"] == "65.0"
    assert table["Average AUROC (%)"] == "90.0" and table["Average accuracy (%)"] == "90.0"


def _trial(i, size, lr, pe, acc):
    row = {
        "trial_id": f"abc_{i:05d}",
        "input_size": size,
        "lr": lr,
        "positional_encoding": pe,
        "num_splits": 5,
    }
    for name in ("accuracy", "macro_f1"):
        row.update(
            {
                f"{name}_mean": acc,
                f"{name}_std": 0.02,
                f"{name}_ci_low": acc - 0.03,
                f"{name}_ci_high": acc + 0.03,
            }
        )
    return row


def test_search_outputs(tmp_path):
    # RCKD Fig. 5's best: 384 / 1e-4 / frozen
    rows = [
        _trial(i, size, lr, pe, 0.80 + 0.01 * i)
        for i, (size, lr, pe) in enumerate(
            (s, lr, pe) for s in (224, 384) for lr in (1e-3, 1e-4) for pe in ("trained", "frozen")
        )
    ]
    files = write_search_outputs(rows, tmp_path)
    table = pd.read_csv(files["csv"])
    assert table.iloc[0][["input_size", "lr", "positional_encoding"]].tolist() == [
        384,
        1e-4,
        "frozen",
    ]
    assert table["rank"].tolist() == list(range(1, 9))
    assert (
        "| 1 | abc_00007 | 384 | 0.0001 | frozen | 87.0 ± 2.0 | [84.0, 90.0] | 5 |"
        in Path(files["markdown"]).read_text()
    )
    image = np.asarray(Image.open(files["chart"]).convert("RGB"))
    assert image.shape[1] > 600
    assert ((image[..., 0] > 150) & (image[..., 1] < 90)).any()  # the red bar of the best setting


def _cell(dataset, task, model, init, mean, params, gmac):
    return {
        "dataset": dataset,
        "task": task,
        "model": model,
        "init": init,
        "mean": mean,
        "std": 0.01,
        "params": params,
        "gmac": gmac,
    }


def test_comparison_table_and_ball_chart(tmp_path):
    rows = [
        _cell("Lymph", "classification", "csat", "Random Weight", 0.514, 2.8e6, 1.08),
        _cell("Lymph", "classification", "csat", "RCKD", 0.925, 2.8e6, 1.08),
        _cell("Lymph", "classification", "resnet18", "RCKD", 0.938, 11.2e6, 5.36),
        _cell("BACH", "classification", "csat", "RCKD", 0.906, 2.8e6, 1.08),
        _cell("GlaS", "segmentation", "csat", "RCKD", 0.912, 2.8e6, 1.08),
    ]
    table = comparison_table(rows)
    csat_rckd = table[(table["Model"] == "csat") & (table["Pretraining"] == "RCKD")].iloc[0]
    assert csat_rckd["Lymph (acc %)"] == "92.5 ± 1.0" and csat_rckd["BACH (acc %)"] == "90.6 ± 1.0"
    assert csat_rckd["Average accuracy (%)"] == "91.5" and csat_rckd["Average mIoU"] == "0.912"
    assert csat_rckd["Params"] == "2.80 M" and csat_rckd["GMAC"] == "1.08"
    assert table[table["Pretraining"] == "Random Weight"].iloc[0]["BACH (acc %)"] == ""
    files = write_comparison_outputs(rows, tmp_path)
    assert "| csat | 2.80 M | 1.08 | RCKD |" in Path(files["markdown"]).read_text()
    image = np.asarray(Image.open(files["chart"]).convert("RGB"))
    assert image.shape[0] > 400 and image.shape[1] > 600
