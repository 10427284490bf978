"""Tables and charts from results: split summary, search table + Fig. 5 chart, Table 3 + Fig. 10."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from histokd.finetune.evaluation import summarize_splits
from histokd.finetune.report import (
    comparison_table,
    write_comparison_outputs,
    write_search_outputs,
    write_split_tables,
)


def _result(split, target, prediction):
    from histokd.metrics import classification_metrics, confusion_matrix

    cm = confusion_matrix(prediction, target, 2)
    return {
        "split": split, "task": "classification", "best_epoch": 3, "stopped_epoch": 5,
        "test": classification_metrics(cm).as_dict(), "test_confusion": cm.tolist(),
        "val": classification_metrics(cm).as_dict(),
        "test_records": {"index": list(range(len(target))), "target": target, "prediction": prediction},
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
