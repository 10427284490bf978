"""DiPalma Tables 5-8 and Fig. 3 from model evaluations, as files and in MLflow.

* ``results.csv``: one row per model and metric (estimate, interval, GFLOPs, images);
* ``results.md``: the teacher's table (Table 5) and, per magnification, baseline against KD
  against KD with the auxiliary set (Tables 6-8), percentages with 95% intervals, the best of
  each row in bold;
* ``accuracy_vs_gflops.png``: test accuracy against GFLOPs per forward pass (Fig. 3), the
  magnification under each cost, with the intervals as error bars.

:func:`run_evaluation` is the evaluation job: evaluate the model files, write the three files
and ``evaluations.json``, log them to MLflow.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histokd.resdist.evaluation import METRIC_LABELS, ModelEvaluation

__all__ = [
    "EvaluationResult",
    "METHOD_ORDER",
    "markdown_table",
    "run_evaluation",
    "write_chart",
    "write_tables",
]

#: Column order of Tables 6-8.
METHOD_ORDER = ("baseline", "KD", "KD (AD)")
_TABLE_METRICS = ("accuracy", "f1", "precision", "recall", "top1_accuracy")


def _cell(entry: dict[str, Any] | None, bold: bool = False) -> str:
    if entry is None:
        return "-"
    text = (
        f"{100 * entry['estimate']:.2f} ({100 * entry['ci_low']:.2f}–{100 * entry['ci_high']:.2f})"
    )
    return f"**{text}**" if bold else text


def _entry(interval) -> dict[str, float]:
    return {"estimate": interval.estimate, "ci_low": interval.low, "ci_high": interval.high}


def _rows(evaluations: Sequence[ModelEvaluation], dataset: str) -> list[dict[str, Any]]:
    rows = []
    for ev in evaluations:
        for name, interval in ev.metrics.items():
            rows.append({
                "dataset": dataset, "method": ev.method, "magnification": ev.magnification, "um_per_pixel": 10.0 / ev.magnification,
                "metric": name, "estimate": interval.estimate, "ci_low": interval.low, "ci_high": interval.high,
                "confidence": interval.confidence, "n_resamples": interval.n_resamples, "num_images": ev.num_images,
                "gflops_median": ev.gflops_median, "gflops_mean": ev.gflops_mean, "run_name": ev.run_name,
            })  # fmt: skip
    return rows


def _method_key(method: str) -> tuple[int, str]:
    return (
        (METHOD_ORDER.index(method), method)
        if method in METHOD_ORDER
        else (len(METHOD_ORDER), method)
    )


def markdown_table(evaluations: Sequence[ModelEvaluation], dataset: str) -> str:
    """Table 5 (teacher) and Tables 6-8 (students per magnification) as markdown."""
    lookup: dict[tuple[str, float], ModelEvaluation] = {
        (ev.method, ev.magnification): ev for ev in evaluations
    }
    lines = [f"# Resolution-based distillation: {dataset}", ""]
    n = max((ev.num_images for ev in evaluations), default=0)
    resamples = next((iv.n_resamples for ev in evaluations for iv in ev.metrics.values()), 0)
    lines.append(
        f"Test set: {n} regions. Percentages with 95% bootstrap intervals ({resamples:,} resamples); accuracy, F1, "
        "precision and recall one-vs-rest, macro-averaged over the classes (DiPalma Sec. 4.5); top-1 accuracy beside them. "
        "GFLOPs: one forward pass at the test set's median region size (multiply-add = 2 FLOPs)."
    )
    lines.append("")
    teachers = sorted(
        (ev for ev in evaluations if ev.method == "teacher"), key=lambda e: -e.magnification
    )
    if teachers:
        lines += ["## Teacher (Table 5)", ""]
        header = (
            "| | "
            + " | ".join(
                f"teacher {t.magnification:g}x ({10 / t.magnification:g} µm/pixel)"
                for t in teachers
            )
            + " |"
        )
        lines += [header, "|---" * (len(teachers) + 1) + "|"]
        for metric in _TABLE_METRICS:
            cells = [_cell(_entry(t.metrics[metric])) for t in teachers]
            lines.append(f"| {METRIC_LABELS[metric]} | " + " | ".join(cells) + " |")
        lines.append("| GFLOPs | " + " | ".join(f"{t.gflops_median:.3g}" for t in teachers) + " |")
        lines.append("")
    students = [ev for ev in evaluations if ev.method != "teacher"]
    methods = sorted({ev.method for ev in students}, key=_method_key)
    if students:
        lines += ["## Students (Tables 6-8)", ""]
        lines += ["| | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for mag in sorted({ev.magnification for ev in students}):
            lines.append(f"| **mag = {mag:g}x ({10 / mag:g} µm/pixel)** |" + " |" * len(methods))
            for metric in _TABLE_METRICS:
                entries = []
                for method in methods:
                    ev = lookup.get((method, mag))
                    iv = ev.metrics.get(metric) if ev else None
                    entries.append(_entry(iv) if iv else None)
                values = [e["estimate"] for e in entries if e is not None]
                best = max(values) if values else math.nan
                tied = len(values) > 1 and min(values) == best  # all equal: nothing to mark
                cells = [
                    _cell(
                        e,
                        bold=not tied
                        and len(values) > 1
                        and e is not None
                        and e["estimate"] == best,
                    )
                    for e in entries
                ]
                lines.append(f"| {METRIC_LABELS[metric]} | " + " | ".join(cells) + " |")
            gflops = [
                lookup[(m, mag)].gflops_median if (m, mag) in lookup else None for m in methods
            ]
            lines.append(
                "| GFLOPs | "
                + " | ".join(f"{g:.3g}" if g is not None else "-" for g in gflops)
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


def write_tables(
    evaluations: Sequence[ModelEvaluation], out_dir: str | Path, dataset: str
) -> dict[str, str]:
    """``results.csv`` (long format) and ``results.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = _rows(evaluations, dataset)
    csv_path = out / "results.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["dataset"])
        writer.writeheader()
        writer.writerows(rows)
    md_path = out / "results.md"
    md_path.write_text(markdown_table(evaluations, dataset))
    return {"csv": str(csv_path), "markdown": str(md_path)}


def write_chart(
    evaluations: Sequence[ModelEvaluation], path: str | Path, dataset: str, metric: str = "accuracy"
) -> str:
    """Fig. 3: test ``metric`` against GFLOPs per forward pass, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    markers = {"baseline": "o", "KD": "s", "KD (AD)": "^"}
    ticks: dict[float, str] = {}
    methods = sorted({ev.method for ev in evaluations if ev.method != "teacher"}, key=_method_key)
    for rank, method in enumerate(methods):
        points = sorted(
            (ev for ev in evaluations if ev.method == method), key=lambda e: e.gflops_median
        )
        # the methods of one magnification share a cost: dodge them a little sideways to be seen
        dodge = 1.06 ** (rank - (len(methods) - 1) / 2)
        x = [p.gflops_median * dodge for p in points]
        y = [100 * p.metrics[metric].estimate for p in points]
        err = [[100 * (p.metrics[metric].estimate - p.metrics[metric].low) for p in points],
               [100 * (p.metrics[metric].high - p.metrics[metric].estimate) for p in points]]  # fmt: skip
        ax.errorbar(
            x, y, yerr=err, marker=markers.get(method, "D"), capsize=3, label=method, alpha=0.9
        )
        for p in points:
            ticks[p.gflops_median] = f"{p.gflops_median:.2g}\n{p.magnification:g}x"
    for t in (ev for ev in evaluations if ev.method == "teacher"):
        iv = t.metrics[metric]
        ax.errorbar([t.gflops_median], [100 * iv.estimate], yerr=[[100 * (iv.estimate - iv.low)], [100 * (iv.high - iv.estimate)]],
                    marker="*", markersize=12, color="black", capsize=3, linestyle="none", label=f"teacher {t.magnification:g}x")  # fmt: skip
        ticks[t.gflops_median] = f"{t.gflops_median:.2g}\n{t.magnification:g}x"
    ax.set_xscale("log")
    if ticks:
        # one tick per magnification (costs of one magnification coincide across methods)
        merged: dict[str, float] = {}
        for value, label in sorted(ticks.items()):
            merged.setdefault(label.split("\n")[1], value)
        ax.set_xticks(list(merged.values()))
        ax.set_xticklabels([f"{v:.2g}\n{k}" for k, v in merged.items()])
        ax.minorticks_off()
    ax.set_xlabel("GFLOPs per forward pass (median test region); magnification below")
    label = (
        "accuracy (one-vs-rest, macro)" if metric == "accuracy" else METRIC_LABELS[metric].lower()
    )
    ax.set_ylabel(f"test {label} (%)")
    ax.set_title(f"{dataset}: accuracy against computational cost (DiPalma Fig. 3)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def _region_set(config):
    """The training's region set when it is there (and of the same data), else built for the models."""
    import torch

    from histokd.resdist.region_set import RegionSet, build_region_set

    try:
        region_set = RegionSet.load(config.regions_root)
    except FileNotFoundError:
        mags = sorted(
            {
                float(torch.load(p, map_location="cpu", weights_only=True)["meta"]["magnification"])
                for p in config.models
            }
        )
        return build_region_set(config.data, config.regions_root, mags)
    meta = json.loads((Path(config.regions_root) / "region_set.json").read_text())
    if meta.get("data") != str(Path(config.data).resolve()):
        raise ValueError(
            f"region_dir {config.regions_root} holds the regions of {meta.get('data')}, not of data={config.data}"
        )
    return region_set


@dataclass
class EvaluationResult:
    """What the evaluation job produced."""

    evaluations: list[ModelEvaluation]
    files: dict[str, str]
    mlflow_run_id: str | None


def run_evaluation(
    config, *, parent_run_id: str | None = None, tracking: bool = True
) -> EvaluationResult:
    """Evaluate every model on the test set and write the tables and the chart.

    Args:
        config: An :class:`~histokd.resdist.config.EvaluateConfig`.
        parent_run_id: MLflow run to nest this one under.
        tracking: Log to MLflow.
    """
    from histokd.cli import config_to_dict, save_config
    from histokd.resdist.evaluation import evaluate_model
    from histokd.tracking import MLflowRun

    started = time.monotonic()
    out = Path(config.storage_path) / config.run_name
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    region_set = _region_set(config)
    evaluations = []
    for path in config.models:
        ev = evaluate_model(
            path, region_set, config.splits, config.n_resamples, config.confidence, config.seed
        )
        print(
            f"{ev.method:>9} {ev.magnification:>6g}x  accuracy {ev.metrics['accuracy']}  top-1 {ev.metrics['top1_accuracy']}  "
            f"F1 {ev.metrics['f1']}  {ev.gflops_median:.3g} GFLOPs",
            flush=True,
        )
        evaluations.append(ev)
    files = write_tables(evaluations, out, config.dataset_name)
    files["chart"] = write_chart(evaluations, out / "accuracy_vs_gflops.png", config.dataset_name)
    (out / "evaluations.json").write_text(json.dumps([ev.as_dict() | {"targets": ev.targets, "predictions": ev.predictions}
                                                      for ev in evaluations], indent=1))  # fmt: skip
    files["json"] = str(out / "evaluations.json")
    run_id = None
    if tracking:
        run = MLflowRun(
            config.tracking_uri,
            config.mlflow_experiment,
            config.run_name,
            artifact_location=str(Path(config.storage_path) / "mlartifacts"),
        )
        run.log_params(config_to_dict(config))
        run.log_standard_tags()
        tags = {"histokd.job": "resdist_evaluate", "histokd.run_dir": str(out)}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run.set_tags(tags)
        metrics = {}
        for ev in evaluations:
            key = f"{ev.method.replace(' ', '_').replace('(', '').replace(')', '')}_{ev.magnification:g}x"
            for name, iv in ev.metrics.items():
                metrics.update(
                    {f"{key}_{k}": v for k, v in iv.as_dict(name).items() if math.isfinite(v)}
                )
            metrics[f"{key}_gflops"] = ev.gflops_median
        metrics["wall_seconds"] = time.monotonic() - started
        run.log_metrics(metrics)
        for path in files.values():
            run.log_artifact(path)
        run.finish("FINISHED")
        run_id = run.run_id
    return EvaluationResult(evaluations, files, run_id)
