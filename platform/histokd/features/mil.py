"""ABMIL: attention-based multiple-instance learning on exported features (Ilse et al. 2018).

A slide is a bag of patch features (``features`` of a `histokd.features.extract` h5 file). Each
instance is embedded, ``h_k = ReLU(W x_k)`` (M = ``hidden_dim``), weighted by gated attention
(Ilse et al. 2018, Eq. 9)::

    a_k = softmax_k( w^T (tanh(V h_k) * sigmoid(U h_k)) )      (V, U: L x M, L = attention_dim)

and the bag embedding ``z = sum_k a_k h_k`` is classified by a linear layer. Features are
standardised with the training fold's instance mean and std. Training is Adam (Ilse et al.
Sec. 5: lr 5e-4, weight decay 1e-4, betas 0.9, 0.999), one bag per step, with early stopping
on the validation bags' loss, the best epoch's weights kept.

Evaluation is k-fold cross-validation grouped by patient (`histokd.finetune.splits.group_k_folds`):
each fold tests a k-th of the patients, and splits the rest into train and validation. The folds
are summarised as fine-tuning summarises its splits (`histokd.finetune.evaluation.summarize_splits`:
mean and standard deviation over folds, bootstrap intervals), and the out-of-fold predictions of
every slide are pooled into one set of metrics with bootstrap intervals. Run folder::

    config.yaml  summary.json  summary.md  folds.csv  predictions.csv
"""

from __future__ import annotations

import copy
import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histokd.features.config import MilConfig
from histokd.features.extract import H5_DIR
from histokd.resume import write_atomic, write_text_atomic
from histokd.run import holds_run_lock

__all__ = ["ABMIL", "Bags", "MilResult", "read_bags", "run_mil", "train_fold"]

LABEL_COLUMNS = ("slide", "label")
METRIC_NAMES = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")


class ABMIL(nn.Module):
    """Gated-attention MIL (Ilse et al. 2018, Sec. 2.4, Eq. 9).

    Args:
        in_dim: D of the instance features.
        num_classes: Classes of the bag label.
        hidden_dim: M, the instance embedding size.
        attention_dim: L, the attention's hidden size.
        dropout: Dropout of the instance embeddings.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden_dim: int = 128,
        attention_dim: int = 128,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden_dim, attention_dim)
        self.attention_u = nn.Linear(hidden_dim, attention_dim)
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits (C,) and attention weights (N,) of one bag (N, D)."""
        h = self.embed(bag)
        gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))  # Eq. 9
        attention = self.attention_w(gate).squeeze(-1).softmax(0)
        return self.classifier(attention @ h), attention


@dataclass
class Bags:
    """The labelled slides and their features.

    Attributes:
        slides, patients: One per bag.
        labels: Class index per bag.
        classes: Class names, sorted; ``labels`` index them.
        features: One float32 (N_i, D) array per bag.
    """

    slides: list[str]
    patients: list[str]
    labels: np.ndarray
    classes: list[str]
    features: list[np.ndarray] = field(repr=False)

    @property
    def dim(self) -> int:
        return int(self.features[0].shape[1])


def _h5_dir(features: str | Path) -> Path:
    folder = Path(features)
    return folder / H5_DIR if (folder / H5_DIR).is_dir() else folder


def read_bags(features: str | Path, labels_csv: str | Path) -> Bags:
    """The bags of the slides a labels CSV names, from a features folder.

    Args:
        features: A ``features_<tag>`` folder, or its ``h5_files``.
        labels_csv: Columns ``slide``, ``label`` and optionally ``patient`` (empty: the slide).

    Raises:
        ValueError: A missing column, an empty or repeated slide, a slide without an h5 file,
            or fewer than two classes; one line naming the file, the value and what is allowed.
    """
    import h5py

    labels_csv, h5_dir = str(labels_csv), _h5_dir(features)
    with open(labels_csv, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        for column in LABEL_COLUMNS:
            if column not in columns:
                raise ValueError(
                    f"{labels_csv}: no {column!r} column (columns: {columns}); "
                    "allowed: slide,label[,patient]"
                )
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    available = sorted(p.stem for p in h5_dir.glob("*.h5"))
    slides, patients, names, features = [], [], [], []
    for line, row in enumerate(rows, start=2):
        slide, label = row["slide"], row["label"]
        if not slide or not label:
            raise ValueError(
                f"{labels_csv}, line {line}: slide={slide!r}, label={label!r}; both are needed"
            )
        if slide in slides:
            raise ValueError(
                f"{labels_csv}, line {line}: slide {slide!r} is listed twice; allowed: once"
            )
        path = h5_dir / f"{Path(slide).stem}.h5"
        if not path.is_file():
            shown = ", ".join(available[:3]) + (", ..." if len(available) > 3 else "")
            raise ValueError(
                f"{labels_csv}, line {line}: slide {slide!r} has no features file {path.name} in "
                f"{h5_dir}; allowed: the {len(available)} slides there ({shown or 'none'})"
            )
        with h5py.File(path, "r") as f:
            bag = np.asarray(f["features"][:], np.float32)
        if bag.ndim != 2 or len(bag) == 0:
            raise ValueError(f"{path}: features of shape {bag.shape}; need N x D with N >= 1")
        slides.append(slide)
        patients.append(row.get("patient") or slide)
        names.append(label)
        features.append(bag)
    classes = sorted(set(names))
    if len(classes) < 2:
        raise ValueError(
            f"{labels_csv}: label has one class only ({classes}); allowed: at least two classes"
        )
    dims = {b.shape[1] for b in features}
    if len(dims) > 1:
        raise ValueError(
            f"{h5_dir}: features of different sizes {sorted(dims)}; one backbone's files only"
        )
    labels = np.array([classes.index(n) for n in names], np.int64)
    return Bags(slides, patients, labels, classes, features)


def train_fold(
    bags: list[np.ndarray],
    labels: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    num_classes: int,
    config: MilConfig,
    seed: int,
) -> tuple[ABMIL, dict[str, Any]]:
    """Train ABMIL on ``train`` bags, early-stopped on ``val`` bags; the best epoch's model.

    Returns:
        The model (eval mode, its standardisation in ``model.mean``/``model.std``) and a record
        of ``best_epoch``, ``stopped_epoch`` and ``best_val_loss``.
    """
    from histokd.finetune.early_stopping import EarlyStopping

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    instances = np.concatenate([bags[i] for i in train])
    mean, std = instances.mean(0), instances.std(0) + 1e-6
    tensors = [torch.from_numpy((b - mean) / std) for b in bags]
    targets = torch.as_tensor(labels)
    model = ABMIL(
        bags[0].shape[1], num_classes, config.hidden_dim, config.attention_dim, config.dropout
    )
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay
    )
    loss_fn = nn.CrossEntropyLoss()
    stopper = EarlyStopping(patience=config.patience)
    best = copy.deepcopy(model.state_dict())
    epoch = 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        for i in rng.permutation(train):
            logits, _ = model(tensors[i])
            loss = loss_fn(logits[None], targets[i : i + 1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            val_loss = float(
                np.mean(
                    [loss_fn(model(tensors[i])[0][None], targets[i : i + 1]).item() for i in val]
                )
            )
        if stopper.step(epoch, val_loss):
            best = copy.deepcopy(model.state_dict())
        if stopper.should_stop:
            break
    model.load_state_dict(best)
    model.eval()
    model.mean, model.std = mean, std
    return model, {"best_epoch": stopper.best_epoch, "stopped_epoch": epoch,
                   "best_val_loss": stopper.best_loss}  # fmt: skip


def predict_bags(model: ABMIL, bags: list[np.ndarray]) -> np.ndarray:
    """Class probabilities (n, C) of bags, standardised as the model was trained."""
    with torch.no_grad():
        return np.stack([
            model(torch.from_numpy((b - model.mean) / model.std))[0].softmax(-1).numpy() for b in bags
        ])  # fmt: skip


@dataclass
class MilResult:
    """What a cross-validation run gave.

    Attributes:
        summary: ``summary.json``: per-fold and pooled metrics with bootstrap intervals.
        folds: The folds (`histokd.finetune.splits.Split`).
        probabilities: Out-of-fold (n, C) probabilities, in the labels CSV's order.
        files: Name -> path of the run's files.
    """

    summary: dict[str, Any]
    folds: list
    probabilities: np.ndarray
    bags: Bags
    files: dict[str, str]
    mlflow_run_id: str | None = None


def _pooled_metrics(labels: np.ndarray, probs: np.ndarray, resamples: int, seed: int) -> dict:
    from histokd.finetune.evaluation import METRICS
    from histokd.metrics import auroc, bootstrap_auroc_ci, bootstrap_confusion_ci, confusion_matrix

    c = probs.shape[1]
    prediction = probs.argmax(1)
    counts = np.zeros((len(labels), c, c))
    counts[np.arange(len(labels)), labels, prediction] = 1
    out: dict[str, Any] = {}
    for name in METRIC_NAMES:
        if name == "auroc":
            value = float(auroc(labels, probs))
            ci = bootstrap_auroc_ci(labels, probs, resamples, seed=seed)
        else:
            value = float(METRICS[name](counts.sum(0)))
            ci = bootstrap_confusion_ci(counts, METRICS[name], resamples, seed=seed)
        out[name] = {"value": value, "ci_low": ci.low, "ci_high": ci.high}
    out["confusion_matrix"] = confusion_matrix(prediction, labels, c).tolist()
    out["single_class_predictions"] = bool(len(np.unique(prediction)) == 1)
    return out


def _markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# ABMIL, {summary['num_folds']}-fold cross-validation by patient",
        "",
        f"{summary['num_slides']} slides of {summary['num_patients']} patients; classes "
        f"{', '.join(summary['classes'])}; features {summary['features']}",
        "",
        "| metric | pooled out-of-fold (95% CI) | fold mean ± std |",
        "| --- | --- | --- |",
    ]
    for name in METRIC_NAMES:
        p, f = summary["pooled"][name], summary["folds_summary"]["metrics"][name]
        lines.append(
            f"| {name} | {p['value']:.4f} [{p['ci_low']:.4f}, {p['ci_high']:.4f}] | "
            f"{f['mean']:.4f} ± {f['std']:.4f} |"
        )
    if summary["pooled"]["single_class_predictions"]:
        lines += ["", "**Every slide is predicted as one class.**"]
    lines += [
        "",
        f"Confusion matrix (rows: true, columns: predicted): {summary['pooled']['confusion_matrix']}",
    ]
    return "\n".join(lines) + "\n"


def _write_csv(path: str, header: list[str], rows: list[list[Any]]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)

    write_atomic(path, write)


@holds_run_lock
def run_mil(config: MilConfig, *, tracking: bool = True) -> MilResult:
    """Cross-validate ABMIL on the labelled slides of ``config`` (module docstring).

    Raises:
        ValueError: Missing inputs, a bad labels CSV (`read_bags`), or too few patients.
    """
    from histokd.cli import config_to_dict, save_config
    from histokd.finetune.evaluation import summarize_splits
    from histokd.finetune.splits import group_k_folds
    from histokd.metrics import confusion_matrix

    if not config.features or not config.labels:
        raise ValueError("features and labels are needed: give --features DIR --labels CSV")
    bags = read_bags(config.features, config.labels)
    folds = group_k_folds(
        bags.labels, bags.patients, config.num_folds, config.val_fraction, config.seed
    )
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    print(
        f"ABMIL on {len(bags.slides)} slides of {len(set(bags.patients))} patients, "
        f"{len(bags.classes)} classes, D = {bags.dim}; {config.num_folds} folds by patient",
        flush=True,
    )
    run = None
    if tracking:
        from histokd.run import open_mlflow_run

        run = open_mlflow_run(
            config, "train_mil", params={**config_to_dict(config), "num_slides": len(bags.slides)}
        )
    c = len(bags.classes)
    probabilities = np.zeros((len(bags.slides), c))
    fold_of = np.zeros(len(bags.slides), np.int64)
    results = []
    threads = torch.get_num_threads()
    # a bag is a few hundred rows: one thread is fastest, and leaves the other cores alone
    torch.set_num_threads(1)
    try:
        for fold in folds:
            model, record = train_fold(
                bags.features,
                bags.labels,
                fold.train,
                fold.val,
                c,
                config,
                config.seed + fold.index,
            )
            probs = predict_bags(model, [bags.features[i] for i in fold.test])
            probabilities[fold.test], fold_of[fold.test] = probs, fold.index
            target, prediction = bags.labels[fold.test], probs.argmax(1)
            results.append({
                "split": fold.index, "task": "classification", **record,
                "test_confusion": confusion_matrix(prediction, target, c).tolist(),
                "test_records": {"target": target.tolist(), "prediction": prediction.tolist(),
                                 "probability": probs.tolist()},
            })  # fmt: skip
            print(
                f"fold {fold.index}: {len(fold.train)}/{len(fold.val)}/{len(fold.test)} slides "
                f"(train/val/test), best epoch {record['best_epoch']}, test accuracy "
                f"{float(np.mean(prediction == target)):.3f}",
                flush=True,
            )
    except Exception:
        if run is not None:
            run.finish("FAILED")
        raise
    finally:
        torch.set_num_threads(threads)
    folds_summary = summarize_splits(
        results,
        n_resamples=config.bootstrap_resamples,
        seed=config.seed,
        metrics=list(METRIC_NAMES),
    )
    pooled = _pooled_metrics(bags.labels, probabilities, config.bootstrap_resamples, config.seed)
    summary = {
        "features": str(_h5_dir(config.features)), "labels": config.labels, "classes": bags.classes,
        "num_slides": len(bags.slides), "num_patients": len(set(bags.patients)), "num_folds": len(folds),
        "feature_dim": bags.dim, "pooled": pooled, "folds_summary": folds_summary,
    }  # fmt: skip
    files = {name: str(run_dir / name) for name in
             ("summary.json", "summary.md", "folds.csv", "predictions.csv")}  # fmt: skip
    write_text_atomic(files["summary.json"], json.dumps(summary, indent=2, default=float) + "\n")
    write_text_atomic(files["summary.md"], _markdown(summary))
    _write_csv(files["folds.csv"], ["fold", "part", "slide", "patient", "label"], [
        [f.index, part, bags.slides[i], bags.patients[i], bags.classes[bags.labels[i]]]
        for f in folds for part in ("train", "val", "test") for i in getattr(f, part)
    ])  # fmt: skip
    _write_csv(
        files["predictions.csv"],
        ["slide", "patient", "label", "fold", "prediction"] + [f"prob_{n}" for n in bags.classes],
        [
            [slide, bags.patients[i], bags.classes[bags.labels[i]], int(fold_of[i]),
             bags.classes[int(probabilities[i].argmax())], *(f"{p:.6f}" for p in probabilities[i])]
            for i, slide in enumerate(bags.slides)
        ],
    )  # fmt: skip
    if run is not None:
        metrics = {f"pooled_{n}": pooled[n]["value"] for n in METRIC_NAMES}
        metrics.update({f"pooled_{n}_ci_low": pooled[n]["ci_low"] for n in METRIC_NAMES})
        metrics.update({f"pooled_{n}_ci_high": pooled[n]["ci_high"] for n in METRIC_NAMES})
        metrics.update(
            {f"fold_mean_{n}": folds_summary["metrics"][n]["mean"] for n in METRIC_NAMES}
        )
        metrics.update(num_slides=len(bags.slides), num_patients=summary["num_patients"])
        run.log_metrics({k: float(v) for k, v in metrics.items() if math.isfinite(float(v))})
        for path in files.values():
            run.log_artifact(path)
        run.finish("FINISHED")
    return MilResult(summary, folds, probabilities, bags, files, run.run_id if run else None)
