"""Frozen-backbone evaluation: a linear probe and kNN on pooled features (eva, kaiko).

The field judges a pretrained backbone without training it: the backbone is frozen, every image
becomes one feature vector (the deepest feature map, global average pooled, after the model's
own input normalisation, in eval mode, without augmentation), and two simple classifiers are
fitted on the training rows' vectors:

* ``linear``: multinomial logistic regression on features standardised with the training rows'
  mean and standard deviation, its inverse regularisation C chosen on the validation part
  (highest validation accuracy, ties to the stronger regularisation) from a log grid;
* ``knn``: the k = 20 nearest training rows by cosine distance (``min(k, n_train)``), each
  voting with weight ``exp(similarity / 0.07)`` as in DINO's kNN evaluation (Caron et al. 2021),
  which eva and kaiko follow; the classes' shares of the vote are the probabilities (AUROC).
  A plain majority vote would give every image the majority class whenever the training rows
  number k or fewer (1 % labels): the weights let the nearest rows decide.

A split's features are extracted once per backbone/initialisation, in one Ray task that asks
for a GPU where the job uses GPUs, and reused for every label fraction and both probes. Each
probe's result has the shape of a fine-tuning split's ``result.json`` (test confusion matrix and
per-image records), so `histokd.finetune.evaluation.summarize_splits` summarises it with the
same metrics and bootstrap intervals.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "C_GRID",
    "KNN_K",
    "KNN_TEMPERATURE",
    "extract_features",
    "fit_linear_probe",
    "knn_probabilities",
    "probe_result",
    "run_probes",
]

#: Inverse regularisation strengths the linear probe chooses from on validation.
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)

#: Neighbours of the kNN probe (eva and kaiko's benchmarks: 20).
KNN_K = 20

#: Temperature of the kNN vote's weights ``exp(similarity / T)`` (DINO: 0.07).
KNN_TEMPERATURE = 0.07


def extract_features(
    images: Sequence[str],
    backbone: str,
    init: str,
    num_classes: int,
    input_size: int,
    seed: int,
    resize: str = "squash",
    stain: dict[str, Any] | None = None,
    batch_size: int = 64,
    threads: int = 1,
) -> np.ndarray:
    """Pooled features of ``images`` from the frozen backbone, ``n x D`` float32.

    The model is built as fine-tuning builds it (same seed, so a random initialisation gives
    the fine-tuning arm's starting weights), in eval mode; images go through the model's own
    input normalisation, unaugmented, in batches on the GPU where there is one.
    """
    import torch
    from torch.utils.data import DataLoader

    from histokd.finetune.loop import build_task_model
    from histokd.finetune.samples import ImageSamples

    torch.set_num_threads(max(1, int(threads)))
    torch.manual_seed(seed)
    model = build_task_model("classification", backbone, num_classes, init).eval()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    samples = ImageSamples(images, input_size, labels=[0] * len(images), stain=stain, resize=resize)
    out = []
    with torch.no_grad():
        for image, _, _ in DataLoader(samples, batch_size=batch_size, shuffle=False):
            feature_map = model.forward_features(image.to(device))
            out.append(feature_map.float().mean(dim=(2, 3)).cpu().numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, model.num_features))


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Features scaled by the training rows' mean and standard deviation (constant ones kept)."""
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 1e-12, std, 1.0)
    return [(x - mean) / std for x in (train, *others)]


def fit_linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    test_x: np.ndarray,
    num_classes: int,
    c_grid: Sequence[float] = C_GRID,
) -> tuple[np.ndarray, float, dict[float, float]]:
    """Logistic regression on standardised features, C chosen on validation accuracy.

    Returns:
        ``n_test x num_classes`` probabilities (classes absent from the training rows get 0),
        the chosen C and the validation accuracy of every C.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    train_x, val_x, test_x = _standardise(train_x, val_x, test_x)
    classes = np.unique(train_y)
    if len(classes) == 1:  # one class to learn: it is every prediction
        prob = np.zeros((len(test_x), num_classes))
        prob[:, classes[0]] = 1.0
        return (
            prob,
            float(c_grid[0]),
            {float(c): float(np.mean(val_y == classes[0])) for c in c_grid},
        )
    scores: dict[float, float] = {}
    models = {}
    for c in c_grid:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = LogisticRegression(C=c, max_iter=5000).fit(train_x, train_y)
        scores[float(c)] = float(np.mean(model.predict(val_x) == val_y)) if len(val_y) else 0.0
        models[float(c)] = model
    best = max(scores, key=lambda c: (scores[c], -c))  # ties: the stronger regularisation
    prob = np.zeros((len(test_x), num_classes))
    prob[:, models[best].classes_] = models[best].predict_proba(test_x)
    return prob, best, scores


def knn_probabilities(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, num_classes: int, k: int = KNN_K
) -> np.ndarray:
    """Each class's share of the similarity-weighted vote of each test row's ``min(k, n_train)``
    nearest training rows by cosine (weights ``exp(similarity / KNN_TEMPERATURE)``)."""

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    k = min(int(k), len(train_x))
    similarity = unit(test_x.astype(np.float64)) @ unit(train_x.astype(np.float64)).T
    nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    near_y = np.asarray(train_y)[nearest]
    near_similarity = np.take_along_axis(similarity, nearest, axis=1)
    # exp((s - 1) / T): the same shares as exp(s / T), without overflow
    weight = np.exp((near_similarity - 1.0) / KNN_TEMPERATURE)
    prob = np.zeros((len(test_x), num_classes))
    for c in range(num_classes):
        prob[:, c] = np.where(near_y == c, weight, 0.0).sum(1)
    return prob / prob.sum(1, keepdims=True)


def probe_result(
    protocol: str,
    fraction: float,
    split_index: int,
    test_indices: np.ndarray,
    test_y: np.ndarray,
    probability: np.ndarray,
    class_names: Sequence[str],
    train_samples: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A probe's test outcome in the shape of a fine-tuning split's ``result.json``."""
    from histokd.finetune.evaluation import single_class_predictions
    from histokd.metrics import auroc, classification_metrics, confusion_matrix

    prediction = probability.argmax(1)
    confusion = np.asarray(
        confusion_matrix(prediction, np.asarray(test_y), len(class_names)), dtype=np.int64
    )
    result = {
        "split": split_index, "task": "classification", "protocol": protocol,
        "label_fraction": fraction, "class_names": list(class_names), "best_epoch": None,
        "stopped_epoch": None, "test": classification_metrics(confusion).as_dict(),
        "test_confusion": confusion.tolist(),
        "test_records": {"index": list(range(len(test_y))), "target": [int(t) for t in test_y],
                         "prediction": prediction.tolist(), "probability": probability.tolist(),
                         "dataset_index": [int(i) for i in test_indices]},
        "sizes": {"train": int(train_samples)}, **(extra or {}),
    }  # fmt: skip
    result["test"]["auroc"] = float(auroc(np.asarray(test_y), probability))
    result["single_class_predictions"] = single_class_predictions(result)
    return result


FEATURES_FILE = "features.npz"


def _load_features(path, indices: np.ndarray) -> np.ndarray | None:
    """A split's saved features when they are whole and of these rows, else None."""
    try:
        with np.load(path) as saved:
            if np.array_equal(saved["indices"], indices):
                return saved["features"]
    except (OSError, KeyError, ValueError):
        pass
    return None


def run_probes(config, dataset, splits, work_dir, use_gpu: bool, stain=None) -> dict:
    """The linear and kNN arms of every split and label fraction (module docstring).

    A probe result already in ``split_{i}/{protocol}@{fraction}.json`` with the same training
    rows is reused; the features of a split are extracted (one Ray task per split, all at once)
    only where some result is missing, and kept in ``split_{i}/features.npz``.

    Args:
        config: The job's `FinetuneConfig`.
        dataset: The checked `TaskDataset`.
        splits: The job's splits.
        work_dir: The run folder.
        use_gpu: Extract on a GPU (the task asks Ray for one).
        stain: The stain normalisation record, or None.

    Returns:
        ``{(protocol, fraction): [result per split]}`` for linear and knn.
    """
    import json
    import os
    from pathlib import Path

    import ray

    from histokd.finetune.splits import subsample_train
    from histokd.resume import write_text_atomic

    protocols = [p for p in config.protocols if p in ("linear", "knn")]
    labels = np.asarray(dataset.labels)
    names = list(dataset.class_names)
    out: dict[tuple[str, float], list[dict[str, Any]]] = {
        (p, f): [] for p in protocols for f in config.label_fractions
    }
    todo: dict[int, list[tuple[str, float, Path, np.ndarray]]] = {}
    for split in splits:
        for f in config.label_fractions:
            train = subsample_train(split, labels, f, config.split_seed)
            for p in protocols:
                path = Path(work_dir) / f"split_{split.index}" / f"{p}@{f:g}.json"
                reused = _reuse(path, p, f, train)
                if reused is not None:
                    print(
                        f"split {split.index} {p} @ {100 * f:g} %: finished before, reusing {path}",
                        flush=True,
                    )
                    out[(p, f)].append(reused)
                else:
                    todo.setdefault(split.index, []).append((p, f, path, train))
    if not todo:
        return out
    extract = ray.remote(extract_features).options(
        num_cpus=config.cpus_per_worker, num_gpus=config.gpus_per_worker if use_gpu else 0
    )
    pending, features = {}, {}
    for split in splits:
        if split.index not in todo:
            continue
        rows = np.sort(np.concatenate([split.train, split.val, split.test]))
        path = Path(work_dir) / f"split_{split.index}" / FEATURES_FILE
        saved = _load_features(path, rows) if path.is_file() else None
        if saved is not None:
            features[split.index] = (rows, saved)
            continue
        pending[split.index] = (rows, extract.remote(
            [dataset.images[i] for i in rows], config.backbone, config.init, dataset.num_classes,
            config.input_size, config.seed + split.index, config.resize, stain,
            config.batch_size, max(1, int(config.cpus_per_worker)),
        ))  # fmt: skip
    for index, (rows, ref) in pending.items():
        values = ray.get(ref)
        path = Path(work_dir) / f"split_{index}" / FEATURES_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial.npz")
        np.savez(partial, indices=rows, features=values)
        os.replace(partial, path)
        features[index] = (rows, values)
    for split in splits:
        if split.index not in todo:
            continue
        rows, values = features[split.index]
        position = {int(r): k for k, r in enumerate(rows)}

        def part(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return values[[position[int(i)] for i in indices]], labels[indices]  # noqa: B023

        val_x, val_y = part(split.val)
        test_x, test_y = part(split.test)
        for p, f, path, train in todo[split.index]:
            train_x, train_y = part(train)
            extra: dict[str, Any] = {"train_rows": [int(i) for i in train]}
            if p == "linear":
                prob, c, scores = fit_linear_probe(
                    train_x, train_y, val_x, val_y, test_x, len(names)
                )
                extra.update(C=c, val_accuracy_by_C={f"{k:g}": v for k, v in scores.items()})
            else:
                prob = knn_probabilities(train_x, train_y, test_x, len(names), config.knn_k)
                extra.update(k=min(config.knn_k, len(train)))
            result = probe_result(
                p, f, split.index, split.test, test_y, prob, names, len(train), extra
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(result))
            out[(p, f)].append(result)
    return out


def _reuse(path, protocol: str, fraction: float, train: np.ndarray) -> dict[str, Any] | None:
    """A probe's earlier result, if it is readable and of the same protocol, fraction and rows."""
    import json

    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same = (result.get("protocol"), result.get("label_fraction")) == (protocol, fraction)
    return result if same and result.get("train_rows") == [int(i) for i in train] else None
