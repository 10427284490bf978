"""Test-set evaluation as DiPalma et al. report it (Sec. 4.5, Tables 5-8, Fig. 3).

Accuracy, F1, precision and recall are one-vs-rest per class, macro-averaged (one-vs-rest
accuracy is ``1 - 2 (1 - a) / C`` for top-1 accuracy ``a``, reported beside it), each with a 95%
interval from 10,000 bootstrap resamples of the test images. Cost: FLOPs of one forward pass
(:func:`histokd.models.profile.macs_full` doubled, on the meta device) at the test set's median
region size and as the mean over the test regions.
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from histokd.metrics import (
    BootstrapInterval,
    accuracy,
    bootstrap_confusion_ci,
    macro_precision_recall_f1,
)
from histokd.resdist.region_set import RegionSet, median_size
from histokd.run import holds_run_lock

__all__ = ["METRICS", "ModelEvaluation", "evaluate_model", "forward_gflops", "markdown_table",
           "metric_intervals", "ovr_accuracy", "predict", "run_evaluation", "write_chart", "write_tables"]  # fmt: skip


def ovr_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Macro one-vs-rest accuracy of ``... x C x C`` confusion matrices: (TP_c + TN_c) / N."""
    confusion = np.asarray(confusion, dtype=np.float64)
    total = confusion.sum(axis=(-2, -1))[..., None]
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    tn = total - confusion.sum(axis=-2) - confusion.sum(axis=-1) + tp
    return np.where(total > 0, (tp + tn) / np.maximum(total, 1), 0.0).mean(-1)


#: The paper's metrics (Sec. 4.5): their labels, and functions of ``... x C x C`` confusions.
METRICS = {
    "accuracy": ("Accuracy", ovr_accuracy),
    "f1": ("F1-Score", lambda c: macro_precision_recall_f1(c)[2]),
    "precision": ("Precision", lambda c: macro_precision_recall_f1(c)[0]),
    "recall": ("Recall", lambda c: macro_precision_recall_f1(c)[1]),
    "top1_accuracy": ("Top-1 accuracy", accuracy),
}
METHOD_ORDER = ("baseline", "KD", "KD (AD)")  # the columns of Tables 6-8


@dataclass
class ModelEvaluation:
    """One model on one test set; metrics in [0, 1], GFLOPs at the median region size
    (``median_size``: height, width) and as the mean over the test regions."""

    method: str
    magnification: float
    run_name: str
    model_path: str
    num_images: int
    metrics: dict[str, BootstrapInterval]
    gflops_median: float
    gflops_mean: float
    median_size: tuple[int, int]
    targets: list[int] = field(repr=False, default_factory=list)
    predictions: list[int] = field(repr=False, default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Flat numbers for JSON, MLflow and the tables."""
        out = {k: getattr(self, k) for k in ("method", "magnification", "run_name", "model_path",
                                             "num_images", "gflops_median", "gflops_mean")}  # fmt: skip
        out.update(median_height=self.median_size[0], median_width=self.median_size[1])
        for name, interval in self.metrics.items():
            out.update(interval.as_dict(name))
        return out


@torch.no_grad()
def predict(model: nn.Module, items: Sequence[dict[str, Any]], stats, device="cpu"):
    """Targets, predicted classes and class probabilities of single-magnification items.

    Test images are only standardised with the training set's statistics (Sec. 4.5).
    """
    from histokd.resdist.dataset import RegionImages

    tag = next(iter(items[0]["paths"])) if items else ""
    images = RegionImages(items, [tag] if items else [], {tag: stats}, cache=False)
    model.eval()
    probs = [torch.softmax(model(images[i]["images"][0][None].to(device)).float(), 1)[0].cpu().numpy()
             for i in range(len(images))]  # fmt: skip
    probs = np.stack(probs) if probs else np.zeros((0, 0))
    targets = np.array([item["label"] for item in items], dtype=np.int64)
    return targets, probs.argmax(1) if len(probs) else np.zeros(0, np.int64), probs


def forward_gflops(model: nn.Module, height: int, width: int) -> float:
    """GFLOPs (multiply-add = 2) of one forward pass on one ``3 x height x width`` image, counted
    on a meta-device copy (no real forward pass, however large the region)."""
    from histokd.models.profile import macs_full

    return 2 * macs_full(copy.deepcopy(model).to("meta"), (int(height), int(width))) / 1e9


def metric_intervals(targets, predictions, num_classes: int, n_resamples: int = 10_000,
                     confidence: float = 0.95, seed: int = 0) -> dict[str, BootstrapInterval]:  # fmt: skip
    """Each metric of :data:`METRICS` with its bootstrap interval over the test images."""
    targets, predictions = np.asarray(targets, np.int64), np.asarray(predictions, np.int64)
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets, {len(predictions)} predictions")
    counts = np.zeros((len(targets), num_classes, num_classes))
    counts[np.arange(len(targets)), targets, predictions] = 1
    return {name: bootstrap_confusion_ci(counts, fn, n_resamples=n_resamples, confidence=confidence, seed=seed)
            for name, (_, fn) in METRICS.items()}  # fmt: skip


def evaluate_model(model_path: str, region_set: RegionSet, splits: Sequence[str] = ("test",), n_resamples: int = 10_000,
                   confidence: float = 0.95, seed: int = 0, device: torch.device | str = "cpu") -> ModelEvaluation:  # fmt: skip
    """Evaluate one model file on the labelled regions of ``splits`` at its own magnification; a
    ValueError where its classes differ from the data's or there are fewer than 2 images."""
    from histokd.resdist.model import load_model_file

    model, meta = load_model_file(model_path, device)
    if list(meta["class_names"]) != list(region_set.class_names):
        raise ValueError(f"{model_path}: classes {meta['class_names']} differ from the data's "
                         f"{list(region_set.class_names)}")  # fmt: skip
    mag = float(meta["magnification"])
    records = region_set.select(splits, labelled=True)
    if len(records) < 2:
        raise ValueError(f"splits {list(splits)}: {len(records)} labelled regions; need 2 or more")
    items = region_set.items(splits, [mag], labelled=True)
    targets, predictions, _ = predict(model, items, (meta["mean"], meta["std"]), device)
    intervals = metric_intervals(targets, predictions, region_set.num_classes, n_resamples, confidence, seed)  # fmt: skip
    gflops = {(w, h): forward_gflops(model, h, w) for w, h in {r.size_at(mag) for r in records}}
    median = median_size(records, mag)
    return ModelEvaluation(
        str(meta.get("method", "model")), mag, str(meta.get("run_name", "")), str(model_path),
        len(targets), intervals, forward_gflops(model, *median),
        float(np.mean([gflops[r.size_at(mag)] for r in records])), median,
        targets.tolist(), predictions.tolist(),
    )  # fmt: skip


def _cell(iv: BootstrapInterval | None, bold: bool = False) -> str:
    if iv is None:
        return "-"
    mark = "**" if bold else ""
    return f"{mark}{100 * iv.estimate:.2f} ({100 * iv.low:.2f}–{100 * iv.high:.2f}){mark}"


def _method_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def markdown_table(evaluations: Sequence[ModelEvaluation], dataset: str) -> str:
    """Table 5 (teacher) and Tables 6-8 (students per magnification) as markdown."""
    lookup = {(ev.method, ev.magnification): ev for ev in evaluations}
    n = max((ev.num_images for ev in evaluations), default=0)
    resamples = next((iv.n_resamples for ev in evaluations for iv in ev.metrics.values()), 0)
    lines = [
        f"# Resolution-based distillation: {dataset}", "",
        f"Test set: {n} regions. Percentages with 95% bootstrap intervals ({resamples:,} resamples); accuracy, F1, "
        "precision and recall one-vs-rest, macro-averaged over the classes (DiPalma Sec. 4.5); top-1 accuracy beside them. "
        "GFLOPs: one forward pass at the test set's median region size (multiply-add = 2 FLOPs).", "",
    ]  # fmt: skip

    def row(label: str, cells: list[str]) -> str:
        return (f"| {label} | " if label else "| | ") + " | ".join(cells) + " |"

    teachers = sorted((ev for ev in evaluations if ev.method == "teacher"), key=lambda e: -e.magnification)  # fmt: skip
    if teachers:
        lines += ["## Teacher (Table 5)", "", row("", [f"teacher {t.magnification:g}x ({10 / t.magnification:g} µm/pixel)" for t in teachers]),
                  "|---" * (len(teachers) + 1) + "|"]  # fmt: skip
        lines += [row(label, [_cell(t.metrics[m]) for t in teachers]) for m, (label, _) in METRICS.items()]  # fmt: skip
        lines += [row("GFLOPs", [f"{t.gflops_median:.3g}" for t in teachers]), ""]
    students = [ev for ev in evaluations if ev.method != "teacher"]
    methods = sorted({ev.method for ev in students}, key=_method_key)
    if students:
        lines += ["## Students (Tables 6-8)", "", row("", methods), "|---" * (len(methods) + 1) + "|"]  # fmt: skip
        for mag in sorted({ev.magnification for ev in students}):
            lines.append(f"| **mag = {mag:g}x ({10 / mag:g} µm/pixel)** |" + " |" * len(methods))
            evs = [lookup.get((method, mag)) for method in methods]
            for metric, (label, _) in METRICS.items():
                intervals = [ev.metrics.get(metric) if ev else None for ev in evs]
                values = [iv.estimate for iv in intervals if iv is not None]
                # the best in bold, where there is more than one value and they are not all equal
                best = max(values) if len(values) > 1 and min(values) < max(values) else None
                lines.append(row(label, [_cell(iv, iv is not None and iv.estimate == best) for iv in intervals]))  # fmt: skip
            lines.append(row("GFLOPs", [f"{ev.gflops_median:.3g}" if ev else "-" for ev in evs]))
        lines.append("")
    return "\n".join(lines)


def write_tables(evaluations: Sequence[ModelEvaluation], out_dir: str | Path, dataset: str) -> dict[str, str]:  # fmt: skip
    """``results.csv`` (one row per model and metric) and ``results.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        {"dataset": dataset, "method": ev.method, "magnification": ev.magnification, "um_per_pixel": 10.0 / ev.magnification,
         "metric": name, "estimate": iv.estimate, "ci_low": iv.low, "ci_high": iv.high, "confidence": iv.confidence,
         "n_resamples": iv.n_resamples, "num_images": ev.num_images, "gflops_median": ev.gflops_median,
         "gflops_mean": ev.gflops_mean, "run_name": ev.run_name}
        for ev in evaluations for name, iv in ev.metrics.items()
    ]  # fmt: skip
    pd.DataFrame(rows).to_csv(out / "results.csv", index=False, na_rep="nan")
    (out / "results.md").write_text(markdown_table(evaluations, dataset))
    return {"csv": str(out / "results.csv"), "markdown": str(out / "results.md")}


def write_chart(evaluations: Sequence[ModelEvaluation], path: str | Path, dataset: str) -> str:
    """Fig. 3: test accuracy against GFLOPs per forward pass, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    ticks: dict[str, float] = {}  # one tick per magnification (its methods share a cost)
    methods = sorted({ev.method for ev in evaluations}, key=_method_key)
    students = [m for m in methods if m != "teacher"]
    for method in methods:
        points = sorted((ev for ev in evaluations if ev.method == method), key=lambda e: e.gflops_median)  # fmt: skip
        teacher = method == "teacher"
        # the methods of one magnification share a cost: dodge them a little sideways to be seen
        dodge = 1.0 if teacher else 1.06 ** (students.index(method) - (len(students) - 1) / 2)
        ivs = [p.metrics["accuracy"] for p in points]
        style = dict(marker="*", markersize=12, color="black", linestyle="none") if teacher else \
            dict(marker={"baseline": "o", "KD": "s", "KD (AD)": "^"}.get(method, "D"), alpha=0.9)  # fmt: skip
        ax.errorbar([p.gflops_median * dodge for p in points], [100 * iv.estimate for iv in ivs],
                    yerr=[[100 * (iv.estimate - iv.low) for iv in ivs], [100 * (iv.high - iv.estimate) for iv in ivs]],
                    capsize=3, label=f"teacher {points[0].magnification:g}x" if teacher else method, **style)  # fmt: skip
        for p in points:
            ticks.setdefault(f"{p.magnification:g}x", p.gflops_median)
    ax.set_xscale("log")
    ax.set_xticks(list(ticks.values()), [f"{v:.2g}\n{k}" for k, v in ticks.items()], minor=False)
    ax.minorticks_off()
    ax.set(xlabel="GFLOPs per forward pass (median test region); magnification below",
           ylabel="test accuracy (one-vs-rest, macro) (%)",
           title=f"{dataset}: accuracy against computational cost (DiPalma Fig. 3)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


@dataclass
class EvaluationResult:
    evaluations: list[ModelEvaluation]
    files: dict[str, str]
    mlflow_run_id: str


@holds_run_lock
def run_evaluation(config, *, parent_run_id: str | None = None) -> EvaluationResult:
    """Evaluate every model (an :class:`~histokd.resdist.config.EvaluateConfig`) on the test set;
    write the tables, the chart and the evaluations, also to MLflow."""
    from histokd.cli import save_config
    from histokd.inference.model_file import load_checkpoint
    from histokd.resdist.region_set import build_region_set
    from histokd.run import open_mlflow_run

    started = time.monotonic()
    out = Path(config.run_dir)
    save_config(config, out / "config.yaml")
    try:  # the training's region set where it is there (and of the same data)
        region_set = RegionSet.load(config.regions_root)
    except FileNotFoundError:
        mags = {float(load_checkpoint(p)["config"]["magnification"]) for p in config.model}
        region_set = build_region_set(config.data, config.regions_root, sorted(mags))
    made_from = json.loads((region_set.root / "region_set.json").read_text())["data"]
    if made_from != str(Path(config.data).resolve()):
        raise ValueError(f"region_dir {config.regions_root} holds the regions of {made_from}, not of data={config.data}")  # fmt: skip
    evaluations = []
    for path in config.model:
        ev = evaluate_model(path, region_set, config.splits, config.bootstrap_resamples, config.confidence, config.seed)  # fmt: skip
        m = ev.metrics
        print(f"{ev.method:>9} {ev.magnification:>6g}x  accuracy {m['accuracy']}  top-1 {m['top1_accuracy']}  "
              f"F1 {m['f1']}  {ev.gflops_median:.3g} GFLOPs", flush=True)  # fmt: skip
        evaluations.append(ev)
    files = write_tables(evaluations, out, config.dataset_name)
    files["chart"] = write_chart(evaluations, out / "accuracy_vs_gflops.png", config.dataset_name)
    files["json"] = str(out / "evaluations.json")
    records = [ev.as_dict() | {"targets": ev.targets, "predictions": ev.predictions} for ev in evaluations]  # fmt: skip
    Path(files["json"]).write_text(json.dumps(records, indent=1))
    run = open_mlflow_run(config, "resdist_evaluate", parent_run_id=parent_run_id)
    metrics = {"wall_seconds": time.monotonic() - started}
    for ev in evaluations:
        key = re.sub(r"\W+", "_", ev.method).strip("_") + f"_{ev.magnification:g}x"  # KD_AD_1.25x
        for name, iv in ev.metrics.items():
            metrics |= {f"{key}_{k}": v for k, v in iv.as_dict(name).items() if math.isfinite(v)}
        metrics[f"{key}_gflops"] = ev.gflops_median
    run.log_metrics(metrics)
    for path in files.values():
        run.log_artifact(path)
    run.finish("FINISHED")
    return EvaluationResult(evaluations, files, run.run_id)
