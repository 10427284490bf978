"""Tables and charts of fine-tuning results, in the shapes RCKD publishes.

* `write_split_tables`: one job's per-split and summary tables (JSON, CSV, Markdown).
* `write_search_outputs`: the hyperparameter search's results table and a Fig. 5-style bar
  chart (RCKD Sec. 3.1: five-split mean accuracy per resolution, learning rate and positional
  encoding).
* `write_comparison_outputs`: Table 3/4-style tables (model, parameters, GMAC, pretraining,
  one column per dataset, averages) and a Fig. 10-style ball chart (accuracy against GMAC,
  circle area by parameters, colour by initialisation).
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
    "search_bar_chart",
    "write_comparison_outputs",
    "write_search_outputs",
    "write_split_tables",
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
    out = []
    for (model, init), group in frame.groupby(["model", "init"], sort=False):
        first = group.iloc[0]
        row: dict[str, Any] = {
            "Model": model,
            "Params": f"{first['params'] / 1e6:.2f} M",
            "GMAC": f"{first['gmac']:.2f}",
            "Pretraining": init,
        }
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
        "Params: backbone only; GMAC: backbone at the fine-tuning resolution (as RCKD counts them, "
        "Sec. 2.4).\n\n" + _markdown(table)
        + (f"\n{_SINGLE_CLASS_NOTE}\n" if raw.get("single_class_predictions", pd.Series(dtype=bool)).fillna(False).astype(bool).any() else "")
    )  # fmt: skip
    points = []
    classification = raw[raw["task"] == "classification"]
    for (model, init), group in classification.groupby(["model", "init"], sort=False):
        points.append({"model": model, "init": init, "gmac": float(group["gmac"].iloc[0]), "params": float(group["params"].iloc[0]),
                       "accuracy": float(group["mean"].mean())})  # fmt: skip
    files = {"csv": str(out / "comparison.csv"), "markdown": str(out / "comparison.md")}
    if points:
        files["chart"] = str(ball_chart(points, out / "comparison.png"))
    return files
