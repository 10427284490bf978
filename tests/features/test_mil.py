"""ABMIL: learns a label carried by a few positive instances, is at chance on shuffled labels,
keeps each patient in one part of every fold, and rejects bad label files in one line."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("h5py")

D = 16


def _write_bags(folder: Path, n_slides: int = 40, seed: int = 0) -> tuple[Path, list[dict]]:
    """Bags of 20-40 Gaussian instances; a positive bag holds 2-4 instances shifted along 3 dims.
    Two slides per patient, both of the patient's label."""
    from histokd.features.extract import write_features_h5

    rng = np.random.default_rng(seed)
    h5_dir = folder / "features_synthetic" / "h5_files"
    rows = []
    for i in range(n_slides):
        patient = f"p{i // 2:02d}"
        label = (i // 2) % 2
        n = int(rng.integers(20, 41))
        bag = rng.normal(size=(n, D)).astype(np.float32)
        if label:
            k = int(rng.integers(2, 5))
            bag[rng.choice(n, k, replace=False), :3] += 4.0
        coords = np.stack([np.arange(n) * 256, np.zeros(n)], 1)
        write_features_h5(h5_dir / f"s{i:03d}.h5", bag, coords, {"patch_size": 256})
        rows.append({"slide": f"s{i:03d}", "label": ["benign", "tumor"][label], "patient": patient})
    return folder / "features_synthetic", rows


def _write_labels(path: Path, rows: list[dict], columns=("slide", "label", "patient")) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _config(tmp_path, features, labels, **kw):
    from histokd.features import MilConfig

    settings = dict(features=str(features), labels=str(labels), storage_path=str(tmp_path / "runs"),
                    epochs=15, patience=5, bootstrap_resamples=500)  # fmt: skip
    settings.update(kw)
    return MilConfig(**settings)


def test_abmil_learns_positive_instances_and_shuffled_labels_are_chance(tmp_path):
    from histokd.features import run_mil

    features, rows = _write_bags(tmp_path)
    result = run_mil(_config(tmp_path, features, _write_labels(tmp_path / "labels.csv", rows)))
    pooled = result.summary["pooled"]
    assert pooled["auroc"]["value"] >= 0.9
    assert pooled["balanced_accuracy"]["value"] >= 0.8
    assert pooled["auroc"]["ci_low"] <= pooled["auroc"]["value"] <= pooled["auroc"]["ci_high"]
    assert result.summary["folds_summary"]["num_splits"] == 5
    assert np.allclose(result.probabilities.sum(1), 1.0)
    for name in ("summary.json", "summary.md", "folds.csv", "predictions.csv"):
        assert Path(result.files[name]).is_file()

    # the same bags with the patients' labels shuffled: nothing to learn
    rng = np.random.default_rng(5)
    patients = sorted({r["patient"] for r in rows})
    shuffled = dict(
        zip(
            patients,
            rng.permutation([["benign", "tumor"][i % 2] for i in range(len(patients))]),
            strict=True,
        )
    )
    noise = [{**r, "label": shuffled[r["patient"]]} for r in rows]
    chance = run_mil(
        _config(
            tmp_path, features, _write_labels(tmp_path / "shuffled.csv", noise), run_name="shuffled"
        )
    )
    assert 0.25 <= chance.summary["pooled"]["auroc"]["value"] <= 0.75


def test_folds_keep_each_patient_in_one_part():
    from histokd.finetune.splits import group_k_folds

    rng = np.random.default_rng(0)
    groups = np.array([f"p{i}" for i in rng.integers(0, 23, size=70)])
    labels = np.array([int(g[1:]) % 3 for g in groups])
    folds = group_k_folds(labels, groups, num_folds=5, val_fraction=0.2, seed=3)
    tested = np.concatenate([f.test for f in folds])
    assert sorted(tested.tolist()) == list(range(70))  # every slide tested exactly once
    for fold in folds:
        parts = [set(groups[fold.train]), set(groups[fold.val]), set(groups[fold.test])]
        assert all(len(p) for p in parts)
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert sorted(np.concatenate([fold.train, fold.val, fold.test]).tolist()) == list(range(70))
        # stratified as whole patients allow: every class in every test part
        assert set(labels[fold.test]) == {0, 1, 2}
    # four patients in two folds: the two left for training still give one for validation
    few = group_k_folds([0, 1, 0, 1], ["a", "b", "c", "d"], num_folds=2, seed=1)
    assert [f.sizes for f in few] == [(1, 1, 2), (1, 1, 2)]
    with pytest.raises(ValueError, match=r"num_folds=30: must be an integer in \[2, 2\d\]"):
        group_k_folds(labels, groups, num_folds=30)


def test_bad_labels_are_one_line_naming_file_and_value(tmp_path):
    from histokd.features.mil import read_bags

    features, rows = _write_bags(tmp_path, n_slides=6)
    missing = _write_labels(tmp_path / "missing.csv", rows + [{"slide": "ghost", "label": "tumor"}])
    with pytest.raises(
        ValueError,
        match=r"missing.csv, line 8: slide 'ghost' has no features file ghost.h5 .*the 6 slides there",
    ):
        read_bags(features, missing)
    no_label = _write_labels(tmp_path / "nolabel.csv", rows, columns=("slide", "patient"))
    with pytest.raises(
        ValueError, match=r"nolabel.csv: no 'label' column .*allowed: slide,label\[,patient\]"
    ):
        read_bags(features, no_label)
    one = _write_labels(tmp_path / "one.csv", [{**r, "label": "tumor"} for r in rows])
    with pytest.raises(
        ValueError,
        match=r"one.csv: label has one class only \(\['tumor'\]\); allowed: at least two",
    ):
        read_bags(features, one)
    # no patient column: each slide is its own patient; the h5_files folder itself works too
    bags = read_bags(
        features / "h5_files", _write_labels(tmp_path / "plain.csv", rows, ("slide", "label"))
    )
    assert bags.patients == bags.slides and bags.classes == ["benign", "tumor"] and bags.dim == D


def test_attention_points_at_the_positive_instances(tmp_path):
    """Gated attention (Ilse et al. Eq. 9) puts its weight on the few instances that make a bag
    positive: in every held-out positive bag they are the top-attended ones."""
    import torch

    from histokd.features import MilConfig
    from histokd.features.mil import train_fold

    rng = np.random.default_rng(0)
    bags, labels, positives = [], [], []
    for i in range(40):
        n = int(rng.integers(20, 41))
        bag = rng.normal(size=(n, D)).astype(np.float32)
        where = rng.choice(n, int(rng.integers(2, 5)), replace=False) if i % 2 else np.empty(0, int)
        bag[where, :3] += 4.0
        bags.append(bag), labels.append(i % 2), positives.append(where)
    config = MilConfig(storage_path=str(tmp_path), epochs=15, patience=5)
    torch.set_num_threads(1)
    model, record = train_fold(
        bags, np.array(labels), np.arange(30), np.arange(30, 40), 2, config, 0
    )
    assert 1 <= record["best_epoch"] <= record["stopped_epoch"] <= 15
    for i in range(31, 40, 2):  # the held-out positive bags
        with torch.no_grad():
            _, attention = model(torch.from_numpy((bags[i] - model.mean) / model.std))
        attention = attention.numpy()
        assert attention.sum() == pytest.approx(1.0, abs=1e-5)
        k = len(positives[i])
        assert sorted(np.argsort(-attention)[:k]) == sorted(positives[i])
        others = np.delete(attention, positives[i])
        assert attention[positives[i]].mean() > 10 * others.mean()
