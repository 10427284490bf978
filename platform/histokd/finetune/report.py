"""Tables and charts of fine-tuning results, in the shapes RCKD publishes.

* `write_split_tables`: one job's per-split and summary tables (JSON, CSV, Markdown).
* `write_search_outputs`: the hyperparameter search's results table and a Fig. 5-style bar
  chart (RCKD Sec. 3.1: five-split mean accuracy per resolution, learning rate and positional
  encoding).
* `write_comparison_outputs`: Table 3/4-style tables (model, parameters, GMAC, pretraining,
  one column per dataset, averages) and a Fig. 10-style ball chart (accuracy against GMAC,
  circle area by parameters, colour by initialisation); with several evaluation protocols or
  label fractions, a row per (model, initialisation, protocol, label fraction) and
  `label_fraction_chart` (a panel per protocol, accuracy against the label fraction, a line per
  initialisation).
* `write_test_figures`: a job's pooled test predictions as pictures: the confusion matrix
  (counts and recall), ROC curves and each class's precision, recall and F1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = [
    "ball_chart",
    "comparison_table",
    "label_fraction_chart",
    "search_bar_chart",
    "write_comparison_outputs",
    "write_search_outputs",
    "write_split_tables",
    "write_test_figures",
]

_METRIC_LABELS = {
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "auroc": "AUROC",
    "macro_precision": "Macro precision",
    "macro_recall": "Macro recall",
    "macro_f1": "Macro F1",
    "miou": "mIoU",
}


def _pct(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


#: Short names of the classification metrics a comparison tabulates, in column order.
_COMPARED = {"accuracy": "acc", "balanced_accuracy": "bal. acc", "macro_f1": "macro-F1",
             "auroc": "AUROC"}  # fmt: skip

#: The mark of a model whose test predictions were all one class, and its footnote.
SINGLE_CLASS_MARK = "†"
_SINGLE_CLASS_NOTE = f"{SINGLE_CLASS_MARK} every test prediction of a split was the same class."


def _spread(mean: float, std: float, low: float, high: float, num_splits: int, fmt=_pct) -> str:
    """``mean ± std`` over the splits; with one split there is no spread, so its bootstrap
    interval ``value [low, high]``."""
    if num_splits == 1:
        return f"{fmt(mean)} [{fmt(low)}, {fmt(high)}]"
    return f"{fmt(mean)} ± {fmt(std)}"


def _markdown(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table without the optional ``tabulate`` dependency."""
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


def write_split_tables(summary: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """``summary.json``, ``splits.csv`` (one row per split) and ``summary.md``.

    Returns:
        Name -> path of each file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    splits = pd.DataFrame(summary["splits"]).drop(columns=["confusion_matrix"], errors="ignore")
    splits.to_csv(out / "splits.csv", index=False)
    conf = int(round(100 * summary["confidence"]))
    n = summary["num_splits"]
    value_column = "mean ± std (%)" if n > 1 else f"test [{conf}% CI] (%)"
    rows = []
    for name, entry in summary["metrics"].items():
        rows.append({
            "metric": _METRIC_LABELS.get(name, name),
            value_column: _spread(entry["mean"], entry["std"], entry["ci_low"], entry["ci_high"], n),
            f"{conf}% CI of the mean (%)": f"[{_pct(entry['ci_low'])}, {_pct(entry['ci_high'])}]",
            "per split (%)": ", ".join(_pct(v) for v in entry["values"]),
        })  # fmt: skip
    primary = summary["primary_metric"]
    per_split = pd.DataFrame([
        {
            "split": r["split"], "best epoch": r["best_epoch"], "stopped at": r["stopped_epoch"],
            "test samples": r["test_samples"], f"{_METRIC_LABELS[primary]} (%)": _pct(r[primary]),
            f"{conf}% CI (%)": f"[{_pct(r[primary + '_ci_low'])}, {_pct(r[primary + '_ci_high'])}]",
            **({"single class": SINGLE_CLASS_MARK if r["single_class_predictions"] else ""}
               if "single_class_predictions" in r else {}),
        }
        for r in summary["splits"]
    ])  # fmt: skip
    notes = ""
    if summary.get("single_class_predictions"):
        notes += "\n" + _SINGLE_CLASS_NOTE + "\n"
    if summary.get("confusion_matrix") is not None:
        matrix = summary["confusion_matrix"]
        names = summary.get("class_names") or [str(i) for i in range(len(matrix))]
        table = pd.DataFrame(matrix, columns=[f"pred. {c}" for c in names])
        table.insert(0, "true \\ predicted", names)
        notes += "\nTest confusion matrix, summed over the splits:\n\n" + _markdown(table)
    arms = summary.get("arms") or []
    if len(arms) > 1 or any((a["protocol"], a["label_fraction"]) != ("finetune", 1) for a in arms):
        by_arm = pd.DataFrame([
            {"protocol": a["protocol"], "labels": f"{100 * a['label_fraction']:g} %",
             "train rows": ", ".join(str(t) for t in a["train_samples"]),
             **{f"{_METRIC_LABELS[m]} (%)": _spread(a["metrics"][m]["mean"], a["metrics"][m]["std"],
                                                  a["metrics"][m]["ci_low"], a["metrics"][m]["ci_high"], n)
                for m in _COMPARED if m in a["metrics"]},
             "single class": SINGLE_CLASS_MARK if a.get("single_class_predictions") else ""}
            for a in arms
        ])  # fmt: skip
        notes += (
            "\nBy protocol and label fraction (the tables above: the first row's):\n\n"
            + _markdown(by_arm)
        )
    title = f"{summary.get('backbone', '')} ({summary.get('init_label', '')}) on {summary.get('dataset', '')}"
    text = (
        f"# Fine-tuning: {title}\n\n"
        + (f"Test metrics over {n} splits (mean ± sample std; bootstrap interval of the {n}-split mean, "
           if n > 1 else "Test metrics of one split (bootstrap interval of the test set, ")
        + f"{summary['n_resamples']} resamples per split).\n\n"
        + _markdown(pd.DataFrame(rows)) + "\nPer split:\n\n" + _markdown(per_split) + notes
    )  # fmt: skip
    (out / "summary.md").write_text(text)
    return {
        "summary_json": str(out / "summary.json"),
        "splits_csv": str(out / "splits.csv"),
        "summary_md": str(out / "summary.md"),
    }


def _trial_label(row: dict[str, Any]) -> str:
    lr = f"{row['lr']:.0e}".replace("e-0", "e-")
    return f"R{row['input_size']}, LR {lr}, PE {row['positional_encoding']}"


def search_bar_chart(
    frame: pd.DataFrame,
    path: str | Path,
    metric: str = "accuracy",
    title: str | None = None,
    best_trial: str | None = None,
) -> Path:
    """RCKD Fig. 5: the five-split mean of ``metric`` per trial, with its spread over the splits.

    Args:
        frame: One row per trial with ``input_size``, ``lr``, ``positional_encoding``,
            ``{metric}_mean`` and ``{metric}_std`` (fractions).
        path: PNG to write.
        metric: ``accuracy`` or ``miou``.
        title: Chart title.
        best_trial: ``trial_id`` of the bar drawn in red (default: the highest mean).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = frame.sort_values(
        ["input_size", "lr", "positional_encoding"], ascending=[True, False, True]
    ).to_dict("records")
    labels = [_trial_label(r).replace(", ", "\n") for r in rows]
    means = [100 * r[f"{metric}_mean"] for r in rows]
    stds = [100 * r[f"{metric}_std"] for r in rows]
    best = max(range(len(rows)), key=lambda i: means[i]) if rows else -1
    if best_trial is not None:
        best = next((i for i, r in enumerate(rows) if r.get("trial_id") == best_trial), best)
    colors = ["#c0392b" if i == best else "#5b7db1" for i in range(len(rows))]
    fig, ax = plt.subplots(figsize=(max(6, 1.15 * len(rows) + 1.5), 4.2))
    bars = ax.bar(
        range(len(rows)),
        means,
        yerr=stds,
        capsize=4,
        color=colors,
        edgecolor="black",
        linewidth=0.6,
    )
    for bar, mean in zip(bars, means, strict=True):  # inside the bar, clear of the error bar
        if math.isfinite(mean):
            ax.annotate(f"{mean:.1f}", (bar.get_x() + bar.get_width() / 2, mean), xytext=(0, -4), textcoords="offset points",
                        ha="center", va="top", fontsize=8, color="white", fontweight="bold")  # fmt: skip
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel(f"{_METRIC_LABELS.get(metric, metric)} (%), mean ± std over splits")
    finite = [m for m in means if math.isfinite(m)]
    low = min(finite) - max(stds + [0]) - 5 if finite else 0
    ax.set_ylim(
        max(0, min(low, 90)), 100 if metric == "accuracy" else max(100, max(finite, default=0) + 5)
    )
    ax.set_title(title or "Hyperparameter search (cf. RCKD Fig. 5); red: best")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_search_outputs(
    rows: Sequence[dict[str, Any]],
    out_dir: str | Path,
    metric: str = "accuracy",
    rank_by: str | None = None,
) -> dict[str, str]:
    """``search_results.csv``, ``search_results.md`` and ``search_results.png`` (Fig. 5).

    Args:
        rows: One dict per trial: ``trial_id``, the searched settings, ``{m}_mean``,
            ``{m}_std``, ``{m}_ci_low``, ``{m}_ci_high`` for each metric, ``num_splits``.
        out_dir: Output folder.
        metric: The test metric tabulated and charted.
        rank_by: Column the trials are ranked by, best (highest) first; ties keep the order of
            ``rows``. Default ``{metric}_mean``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(list(rows))
    frame = frame.sort_values(
        rank_by or f"{metric}_mean", ascending=False, kind="stable"
    ).reset_index(drop=True)
    frame.insert(0, "rank", range(1, len(frame) + 1))
    frame.to_csv(out / "search_results.csv", index=False)
    shown = pd.DataFrame({
        "rank": frame["rank"],
        "trial": frame["trial_id"],
        "resolution": frame["input_size"],
        "learning rate": frame["lr"].map(lambda v: f"{v:g}"),
        "positional encoding": frame["positional_encoding"],
        f"{_METRIC_LABELS[metric]} (%)": [f"{_pct(m)} ± {_pct(s)}" for m, s in zip(frame[f"{metric}_mean"], frame[f"{metric}_std"], strict=True)],
        "95% CI (%)": [f"[{_pct(lo)}, {_pct(hi)}]" for lo, hi in zip(frame[f"{metric}_ci_low"], frame[f"{metric}_ci_high"], strict=True)],
        "splits": frame["num_splits"],
    })  # fmt: skip
    (out / "search_results.md").write_text(
        f"# Hyperparameter search (RCKD Sec. 3.1, Fig. 5)\n\nTest {_METRIC_LABELS[metric].lower()}, mean ± std over the "
        "splits of each trial, best first.\n\n" + _markdown(shown)
    )
    chart = search_bar_chart(
        frame,
        out / "search_results.png",
        metric=metric,
        best_trial=frame["trial_id"].iloc[0] if len(frame) else None,
    )
    return {
        "csv": str(out / "search_results.csv"),
        "markdown": str(out / "search_results.md"),
        "chart": str(chart),
    }


def comparison_table(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """RCKD Table 3/4: one row per (model, initialisation), one column per dataset, averages.

    Args:
        rows: One dict per fine-tuning job: ``model``, ``init``, ``params`` (backbone
            parameters), ``gmac``, ``dataset``, ``task``, ``mean``, ``std`` (fractions) of the
            primary metric; optionally ``num_splits`` with ``ci_low`` / ``ci_high`` (one split:
            the interval is shown instead of the std), ``single_class_predictions`` (marked
            with `SINGLE_CLASS_MARK`) and, for classification, ``{name}_mean``, ``_std``,
            ``_ci_low``, ``_ci_high`` of balanced accuracy, macro-F1 and AUROC (a column each).
    """
    frame = pd.DataFrame(list(rows))
    datasets = list(dict.fromkeys(frame["dataset"]))
    tasks = dict(zip(frame["dataset"], frame["task"], strict=True))
    by_arm = _several_arms(frame)
    keys = ["model", "init", "protocol", "label_fraction"] if by_arm else ["model", "init"]
    out = []
    for key, group in frame.groupby(keys, sort=False):
        model, init = key[0], key[1]
        first = group.iloc[0]
        row: dict[str, Any] = {
            "Model": model,
            "Params": f"{first['params'] / 1e6:.2f} M",
            "GMAC": f"{first['gmac']:.2f}",
            "Pretraining": init,
        }
        if by_arm:
            row.update(Protocol=key[2], Labels=f"{100 * key[3]:g} %")
        cls_values: dict[str, list[float]] = {name: [] for name in _COMPARED}
        seg_values = []
        for dataset in datasets:
            hit = group[group["dataset"] == dataset]
            is_cls = tasks[dataset] == "classification"
            cell = hit.iloc[0] if not hit.empty else None
            splits = (
                int(cell["num_splits"])
                if cell is not None and "num_splits" in cell and pd.notna(cell["num_splits"])
                else 0
            )
            if not is_cls:
                row[f"{dataset} (mIoU)"] = (
                    ""
                    if cell is None
                    else _spread(
                        float(cell["mean"]),
                        float(cell["std"]),
                        cell.get("ci_low"),
                        cell.get("ci_high"),
                        splits,
                        fmt=lambda v: "n/a" if v is None or not math.isfinite(v) else f"{v:.3f}",
                    )
                )
                if cell is not None:
                    seg_values.append(float(cell["mean"]))
                continue
            for name, short in _COMPARED.items():
                key = "" if name == "accuracy" else f"{name}_"
                if name != "accuracy" and f"{key}mean" not in frame:
                    continue
                column = f"{dataset} ({short} %)"
                if cell is None:
                    row[column] = ""
                    continue
                mean = float(cell[f"{key}mean"])
                row[column] = _spread(
                    mean,
                    float(cell[f"{key}std"]),
                    cell.get(f"{key}ci_low"),
                    cell.get(f"{key}ci_high"),
                    splits,
                )
                flag = cell.get("single_class_predictions", False)
                if name == "accuracy" and pd.notna(flag) and bool(flag):
                    row[column] += f" {SINGLE_CLASS_MARK}"
                if math.isfinite(mean):
                    cls_values[name].append(mean)
        for name, values in cls_values.items():
            if values:
                label = "accuracy" if name == "accuracy" else _COMPARED[name]
                row[f"Average {label} (%)"] = f"{100 * sum(values) / len(values):.1f}"
        if seg_values:
            row["Average mIoU"] = f"{sum(seg_values) / len(seg_values):.3f}"
        out.append(row)
    return pd.DataFrame(out).fillna("")


def _several_arms(frame: pd.DataFrame) -> bool:
    """Whether the rows hold more than full fine-tuning on all labels."""
    if "protocol" not in frame:
        return False
    arms = set(zip(frame["protocol"], frame["label_fraction"], strict=True))
    return arms != {("finetune", 1.0)}


def label_fraction_chart(
    rows: Sequence[dict[str, Any]], path: str | Path, metric: str = "accuracy"
) -> Path:
    """A panel per protocol: ``metric`` (averaged over the classification datasets) against the
    label fraction (log scale), a line per (model, initialisation), bars the bootstrap interval
    (one split) or the spread over the splits.

    Args:
        rows: Comparison rows (`write_comparison_outputs`) with ``protocol`` and
            ``label_fraction``.
        path: PNG to write.
        metric: ``accuracy`` or another compared metric (``balanced_accuracy``, ``auroc``...).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(list(rows))
    frame = frame[frame["task"] == "classification"]
    key = "" if metric == "accuracy" else f"{metric}_"
    protocols = list(dict.fromkeys(frame["protocol"]))
    fig, axes = plt.subplots(1, len(protocols), figsize=(4.2 * len(protocols), 3.8), sharey=True,
                             squeeze=False)  # fmt: skip
    for ax, protocol in zip(axes[0], protocols, strict=True):
        part = frame[frame["protocol"] == protocol]
        for (model, init), line in part.groupby(["model", "init"], sort=False):
            points = line.groupby("label_fraction").agg(
                mean=(f"{key}mean", "mean"), std=(f"{key}std", "mean"), low=(f"{key}ci_low", "mean"),
                high=(f"{key}ci_high", "mean"), splits=("num_splits", "max"),
            ).sort_index()  # fmt: skip
            one = bool((points["splits"] == 1).all())
            low = points["mean"] - points["low"] if one else points["std"]
            high = points["high"] - points["mean"] if one else points["std"]
            ax.errorbar(points.index, 100 * points["mean"], yerr=[100 * low.clip(lower=0), 100 * high.clip(lower=0)],
                        marker="o", capsize=3, label=f"{model} ({init})")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("label fraction")
        ax.set_title(protocol)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{_METRIC_LABELS.get(metric, metric)} (%)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.suptitle("Test metric by label fraction and protocol", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ball_chart(
    points: Sequence[dict[str, Any]], path: str | Path, title: str | None = None
) -> Path:
    """RCKD Fig. 10: average accuracy against GMAC; circle area by parameters, colour by init.

    Args:
        points: One dict per (model, init): ``model``, ``init``, ``gmac``, ``params``,
            ``accuracy`` (fraction, averaged over the classification datasets).
        path: PNG to write.
        title: Chart title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    points = list(points)
    inits = list(dict.fromkeys(p["init"] for p in points))
    palette = [
        "#d62728",
        "#1f77b4",
        "#2ca02c",
        "#ff7f0e",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#7f7f7f",
    ]
    color = {init: palette[i % len(palette)] for i, init in enumerate(inits)}
    max_params = max((p["params"] for p in points), default=1)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for p in points:
        size = 2500 * p["params"] / max_params
        ax.scatter(
            p["gmac"],
            100 * p["accuracy"],
            s=size,
            color=color[p["init"]],
            alpha=0.55,
            edgecolors="black",
            linewidths=0.6,
        )
        ax.annotate(f"{p['model']} ({p['params'] / 1e6:.1f} M)", (p["gmac"], 100 * p["accuracy"]), xytext=(math.sqrt(size) / 2 + 2, 0),
                    textcoords="offset points", ha="left", va="center", fontsize=7)  # fmt: skip
    for init in inits:  # the paper's horizontal lines: each initialisation's average
        values = [100 * p["accuracy"] for p in points if p["init"] == init]
        ax.axhline(
            sum(values) / len(values), color=color[init], linestyle="--", linewidth=1, alpha=0.8
        )
    handles = [
        Line2D([], [], marker="o", linestyle="", markersize=9, color=color[i], alpha=0.6, label=i)
        for i in inits
    ]
    ax.legend(handles=handles, title="Initialisation (dashed: mean)", fontsize=8, loc="best")
    ax.set_xlabel("GMAC (backbone, at the fine-tuning resolution)")
    ax.set_ylabel("Average classification accuracy (%)")
    xs = [p["gmac"] for p in points] or [0, 1]
    ys = [100 * p["accuracy"] for p in points] or [0, 100]
    pad_x = 0.25 * (max(xs) - min(xs) or max(xs) or 1)
    ax.set_xlim(max(0, min(xs) - pad_x), max(xs) + pad_x)
    ax.set_ylim(max(0, min(ys) - 10), min(100.5, max(ys) + 8))
    ax.set_title(title or "Accuracy vs computation (cf. RCKD Fig. 10); circle area: parameters")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_comparison_outputs(rows: Sequence[dict[str, Any]], out_dir: str | Path) -> dict[str, str]:
    """``comparison.csv`` (raw rows), ``comparison.md`` (Table 3/4) and ``comparison.png`` (Fig. 10)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = pd.DataFrame(list(rows))
    raw.to_csv(out / "comparison.csv", index=False)
    table = comparison_table(rows)
    (out / "comparison.md").write_text(
        "# Fine-tuning by backbone and initialisation (cf. RCKD Tables 3 and 4)\n\n"
        "Test metrics, mean ± std over the splits (one split: its bootstrap interval, [low, high]). "
        + ("Protocols: finetune (the whole model trained), linear (logistic regression on the frozen "
           "backbone's pooled features), knn (20 nearest neighbours, cosine, same features); Labels: "
           "the share of each split's training rows used (the same rows for every initialisation). "
           if _several_arms(raw) else "")
        + "Params: backbone only; GMAC: backbone at the fine-tuning resolution (as RCKD counts them, "
        "Sec. 2.4).\n\n" + _markdown(table)
        + (f"\n{_SINGLE_CLASS_NOTE}\n" if raw.get("single_class_predictions", pd.Series(dtype=bool)).fillna(False).astype(bool).any() else "")
    )  # fmt: skip
    points = []
    classification = raw[raw["task"] == "classification"]
    if "protocol" in classification:  # the ball chart: full fine-tuning on all labels
        protocol, fraction = classification["protocol"], classification["label_fraction"]
        classification = classification[(protocol == "finetune") & (fraction == 1.0)]
    for (model, init), group in classification.groupby(["model", "init"], sort=False):
        points.append({"model": model, "init": init, "gmac": float(group["gmac"].iloc[0]), "params": float(group["params"].iloc[0]),
                       "accuracy": float(group["mean"].mean())})  # fmt: skip
    files = {"csv": str(out / "comparison.csv"), "markdown": str(out / "comparison.md")}
    if points:
        files["chart"] = str(ball_chart(points, out / "comparison.png"))
    if _several_arms(raw) and (raw["task"] == "classification").any():
        files["fraction_chart"] = str(label_fraction_chart(rows, out / "comparison_fractions.png"))
    return files


#: The pictures of a fine-tuning run's test predictions (`write_test_figures`).
TEST_FIGURES = {
    "confusion_matrix": "test_confusion_matrix.png",
    "roc_curve": "test_roc_curve.png",
    "per_class_metrics": "test_per_class_metrics.png",
    "numbers": "test_figures.json",  # the numbers drawn
}


def pooled_test_records(results: Sequence[dict[str, Any]]) -> tuple[Any, Any]:
    """The splits' test targets and class probabilities, concatenated (split order).

    Returns:
        ``n`` targets and ``n x C`` probabilities; the probabilities are None where a
        split's records lack them.
    """
    import numpy as np

    targets, probabilities = [], []
    for result in sorted(results, key=lambda r: r["split"]):
        records = result["test_records"]
        targets.append(np.asarray(records["target"], dtype=np.int64))
        probability = records.get("probability") or []
        probabilities.append(
            np.asarray(probability, dtype=np.float64)
            if len(probability) == len(records["target"]) and len(probability)
            else None
        )
    target = np.concatenate(targets) if targets else np.zeros(0, np.int64)
    if not probabilities or any(p is None for p in probabilities):
        return target, None
    return target, np.concatenate(probabilities)


def roc_curves(target: Any, probability: Any, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """ROC curves: class 1 against class 0 for two classes, else each class one-vs-rest.

    Each point is a distinct score threshold, tied scores in one step, so each curve's
    trapezoid area is the Mann-Whitney AUROC of `histokd.metrics.binary_auroc`.

    Returns:
        ``[{"name", "fpr", "tpr", "auc"}]``; a class without positives or negatives is left
        out.
    """
    import numpy as np

    target = np.asarray(target)
    probability = np.asarray(probability, dtype=np.float64)
    c = probability.shape[1]
    classes = [1] if c == 2 else list(range(c))
    curves = []
    for k in classes:
        positive = target == k
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        if n_pos == 0 or n_neg == 0:
            continue
        order = np.argsort(-probability[:, k], kind="stable")
        score, hit = probability[order, k], positive[order]
        last = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]  # end of each tie block
        tpr = np.r_[0.0, np.cumsum(hit)[last] / n_pos]
        fpr = np.r_[0.0, np.cumsum(~hit)[last] / n_neg]
        name = f"{class_names[1]} vs {class_names[0]}" if c == 2 else f"{class_names[k]} vs rest"
        curves.append({"name": name, "fpr": fpr, "tpr": tpr,
                       "auc": float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))})  # fmt: skip
    return curves


def write_test_figures(
    summary: dict[str, Any], results: Sequence[dict[str, Any]], out_dir: str | Path
) -> dict[str, str]:
    """The test predictions of all splits, pooled, as pictures (`TEST_FIGURES`).

    Classification: the confusion matrix (counts, and rows normalised to recall), the ROC
    curves (`roc_curves`; where the records hold probabilities) and each class's precision,
    recall and F1. Segmentation: the pixel confusion matrix. The matrix is the summary's
    (summed over the splits, as ``summary.md`` shows it). ``test_figures.json`` holds the numbers
    drawn (matrices, each curve's AUC, the per-class values).

    Returns:
        Name -> path of each picture written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from histokd.metrics import precision_recall_f1

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    matrix = summary.get("confusion_matrix")
    if matrix is None and summary.get("splits"):
        matrix = np.sum([row["confusion_matrix"] for row in summary["splits"]], axis=0).tolist()
    if matrix is None:
        return {}
    counts = np.asarray(matrix, dtype=np.float64)
    c = len(counts)
    names = list(summary.get("class_names") or [str(k) for k in range(c)])
    n = summary.get("num_splits", len(results))
    pooled = f"test, {n} split{'s' if n != 1 else ''} pooled"
    unit = "pixels" if summary.get("task") == "segmentation" else "images"
    files: dict[str, str] = {}

    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    side = max(4.0, 0.9 * c + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side, side))
    for ax, values, title in ((axes[0], counts, f"counts ({unit})"),
                              (axes[1], normalised, "rows normalised (recall)")):  # fmt: skip
        ax.imshow(values, cmap="Blues", vmin=0, vmax=values.max() or 1)
        for i in range(c):
            for j in range(c):
                text = f"{values[i, j]:.0f}" if values is counts else f"{values[i, j]:.2f}"
                dark = values[i, j] > 0.5 * (values.max() or 1)
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")  # fmt: skip
        ax.set_xticks(range(c), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(c), names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
    fig.suptitle(f"Confusion matrix ({pooled})")
    fig.tight_layout()
    files["confusion_matrix"] = str(_save(fig, out / TEST_FIGURES["confusion_matrix"]))
    numbers: dict[str, Any] = {"class_names": names, "pooled_splits": n,
                               "confusion_matrix": counts.tolist(), "recall_matrix": normalised.tolist()}  # fmt: skip
    if summary.get("task") != "classification":
        (out / TEST_FIGURES["numbers"]).write_text(json.dumps(numbers, indent=1))
        files["numbers"] = str(out / TEST_FIGURES["numbers"])
        return files

    target, probability = pooled_test_records(results)
    if probability is not None and probability.shape[1] == c:
        curves = roc_curves(target, probability, names)
        if curves:
            fig, ax = plt.subplots(figsize=(5.5, 5))
            for curve in curves:
                label = f"{curve['name']} (AUC {curve['auc']:.3f})"
                ax.plot(curve["fpr"], curve["tpr"], label=label)
            ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("true positive rate")
            ax.set_title(f"ROC ({pooled})")
            ax.legend(fontsize=8, loc="lower right")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            files["roc_curve"] = str(_save(fig, out / TEST_FIGURES["roc_curve"]))
            numbers["roc_auc"] = {curve["name"]: curve["auc"] for curve in curves}

    precision, recall, f1 = precision_recall_f1(counts)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * c + 2), 4))
    width = 0.27
    for offset, (label, values) in zip((-width, 0, width), (("precision", precision),
                                       ("recall", recall), ("F1", f1)), strict=True):  # fmt: skip
        bars = ax.bar(np.arange(c) + offset, values, width, label=label)
        for bar, value in zip(bars, values, strict=True):
            ax.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, value), xytext=(0, 2),
                        textcoords="offset points", ha="center", fontsize=7)  # fmt: skip
    ax.set_xticks(range(c), names, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("test, per class")
    ax.set_title(f"Precision, recall and F1 per class ({pooled})")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    files["per_class_metrics"] = str(_save(fig, out / TEST_FIGURES["per_class_metrics"]))
    numbers["per_class"] = {"precision": precision.tolist(), "recall": recall.tolist(),
                            "f1": f1.tolist()}  # fmt: skip
    (out / TEST_FIGURES["numbers"]).write_text(json.dumps(numbers, indent=1))
    files["numbers"] = str(out / TEST_FIGURES["numbers"])
    return files


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
