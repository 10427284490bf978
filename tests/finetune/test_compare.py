"""Comparing initialisations (RCKD Tables 3/4, Fig. 10), on Ray Train's local mode."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histokd.finetune.compare import CompareConfig, parse_init_entry, run_comparison


def test_init_entries(tmp_path, backbone_file):
    assert parse_init_entry(f"csat={backbone_file}", "inits", "RCKD") == (
        "RCKD",
        "csat",
        str(backbone_file),
    )
    assert (
        parse_init_entry(f"SPT on ImageNet@csat={backbone_file}", "timm_weights", "x")[0]
        == "SPT on ImageNet"
    )
    with pytest.raises(ValueError, match="backbone 'vit' unknown"):
        parse_init_entry(f"vit={backbone_file}", "inits", "RCKD")
    with pytest.raises(ValueError, match="expected \\[LABEL@\\]BACKBONE=PATH"):
        parse_init_entry(str(backbone_file), "inits", "RCKD")
    with pytest.raises(ValueError, match="no such file"):
        CompareConfig(storage_path=str(tmp_path), inits=["csat=/nope.pth"])


def test_random_against_backbone_file(ray_cluster, tmp_path, demo_tasks_small, backbone_file):
    config = CompareConfig(
        storage_path=str(tmp_path / "runs"), run_name="cmp", datasets=[f"Demo={demo_tasks_small.classification_dir}"],
        backbones=["csat"], inits=[f"csat={backbone_file}"],
        finetune=dict(input_size=32, batch_size=16, epochs=1, num_splits=1, bootstrap_resamples=100, num_workers=0),
    )  # fmt: skip
    result = run_comparison(config)
    assert [(r["model"], r["init"]) for r in result.rows] == [
        ("csat", "Random Weight"),
        ("csat", "RCKD"),
    ]
    assert all(0 <= r["mean"] <= 1 and r["metric"] == "accuracy" for r in result.rows)
    assert result.rows[0]["params"] == result.rows[1]["params"] > 2e6  # CSAT backbone, ~2.8 M
    raw = pd.read_csv(result.files["csv"])
    assert len(raw) == 2
    text = Path(result.files["markdown"]).read_text()
    assert (
        "| csat |" in text and "Demo (acc %)" in text and "Random Weight" in text and "RCKD" in text
    )
    assert Path(result.files["chart"]).stat().st_size > 10_000
    # balanced accuracy, macro-F1 and AUROC beside accuracy; one split: its interval, no "± 0.0"
    for column in ("Demo (bal. acc %)", "Demo (macro-F1 %)", "Demo (AUROC %)"):
        assert column in text
    assert "± 0.0" not in text
    assert all(
        0 <= r[f"{m}_mean"] <= 1 for r in result.rows for m in ("balanced_accuracy", "auroc")
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--data", "."],
            r"data='\.': a comparison sets it for every cell .* --datasets NAME=PATH",
        ),
        (["--task", "segmentation"], r"task='segmentation': .* --segmentation-datasets NAME=PATH"),
        (["--backbone", "resnet18"], r"backbone='resnet18': .* --backbones"),
        (
            ["--init", "random-weights.pth"],
            r"init='random-weights.pth': .* --inits .* --timm-weights",
        ),
        (["--init-label", "Mine"], r"init_label='Mine': .* LABEL@ in --inits"),
    ],
)
def test_fields_set_per_cell_are_refused(tmp_path, flags, message):
    # run_comparison overwrites data, task, backbone, init and init_label in every cell, so a value
    # given for them would be silently ignored (--data X ran the demo): refused, naming the way
    from histokd.cli import parse_config

    with pytest.raises(SystemExit, match=message):
        parse_config(CompareConfig, ["--storage-path", str(tmp_path), *flags])
    with pytest.raises(ValueError, match=message):
        CompareConfig(
            storage_path=str(tmp_path), finetune={flags[0][2:].replace("-", "_"): flags[1]}
        )


def test_per_cell_values_come_from_the_lists(tmp_path, demo_tasks_small, backbone_file):
    from histokd.cli import parse_config

    config = parse_config(CompareConfig, [
        "--storage-path", str(tmp_path), "--datasets", f"Demo={demo_tasks_small.classification_dir}",
        "--segmentation-datasets", f"Glands={demo_tasks_small.segmentation_dir}", "--backbones", "resnet18",
        "--inits", f"Mine@csat={backbone_file}",
    ])  # fmt: skip
    job = config.finetune
    assert (job.data, job.task, job.backbone, job.init, job.init_label) == (
        "",
        "classification",
        "csat",
        "random",
        None,
    )
    assert [(n, t) for n, _, t in config.dataset_list()] == [
        ("Demo", "classification"),
        ("Glands", "segmentation"),
    ]
    assert config.initialisations() == [
        ("Random Weight", "resnet18", "random"),
        ("Mine", "csat", str(backbone_file)),
    ]


def test_protocols_and_label_fractions(
    ray_cluster, tmp_path, demo_tasks_small, backbone_file, capsys
):
    # fine-tuning, a linear probe and kNN at 10 % and all labels, random against a backbone file
    finetune = dict(input_size=32, batch_size=16, epochs=1, num_splits=1, bootstrap_resamples=100,
                    num_workers=0, protocols=["finetune", "linear", "knn"], label_fractions=[0.1, 1.0])  # fmt: skip
    config = CompareConfig(
        storage_path=str(tmp_path / "runs"), run_name="arms", datasets=[f"Demo={demo_tasks_small.classification_dir}"],
        backbones=["csat"], inits=[f"csat={backbone_file}"], finetune=finetune,
    )  # fmt: skip
    result = run_comparison(config)
    keys = [(r["init"], r["protocol"], r["label_fraction"]) for r in result.rows]
    assert keys == [(init, p, f) for init in ("Random Weight", "RCKD")
                    for p in ("finetune", "linear", "knn") for f in (0.1, 1.0)]  # fmt: skip
    assert all(0 <= r["mean"] <= 1 and 0 <= r["auroc_mean"] <= 1 for r in result.rows)
    text = Path(result.files["markdown"]).read_text()
    assert "| csat | " in text and "| linear | 10 % |" in text and "| knn | 100 % |" in text
    assert Path(result.files["fraction_chart"]).stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "linear @ 10 %: accuracy " in out and ", balanced " in out
    assert "knn @ 100 %: accuracy" in out
    # each arm's training rows: 10 % of each class's (at least one), the same for every init
    from histokd.finetune.datasets import load_task_dataset

    labels = load_task_dataset(str(demo_tasks_small.classification_dir), "classification").labels
    splits = {}
    for r in result.rows[::6]:
        summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        arms = {(a["protocol"], a["label_fraction"]): a for a in summary["arms"]}
        full = arms[("finetune", 1.0)]["train_samples"][0]
        tenth = arms[("finetune", 0.1)]["train_samples"][0]
        run_dir = Path(r["run_dir"])
        train = json.loads((run_dir / "splits.json").read_text())["splits"][0]["train"]
        per_class = np.bincount(np.asarray(labels)[train])
        assert full == len(train) == per_class.sum() and len(per_class) == 3
        assert tenth == sum(max(1, round(0.1 * n)) for n in per_class) < 0.2 * full
        assert {a["train_samples"][0] for (p, f), a in arms.items() if f == 0.1} == {tenth}
        finetuned = json.loads((run_dir / "split_0" / "finetune@0.1" / "result.json").read_text())
        assert finetuned["sizes"]["train"] == tenth and finetuned["label_fraction"] == 0.1
        full_run = json.loads((run_dir / "split_0" / "result.json").read_text())
        assert finetuned["sizes"]["val"] == full_run["sizes"]["val"]  # never subsampled
        assert finetuned["sizes"]["test"] == full_run["sizes"]["test"]
        probe = json.loads((run_dir / "split_0" / "linear@0.1.json").read_text())
        assert set(probe["train_rows"]) < set(train) and len(probe["train_rows"]) == tenth
        assert np.bincount(np.asarray(labels)[probe["train_rows"]]).min() >= 1
        assert probe["C"] in (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
        splits[r["init"]] = probe["train_rows"]
    assert splits["Random Weight"] == splits["RCKD"]
    # a rerun with one more fraction computes only that: earlier results and features are reused
    features = Path(result.rows[0]["run_dir"]) / "split_0" / "features.npz"
    before = features.stat().st_mtime_ns
    config.finetune.label_fractions = [0.1, 0.5, 1.0]
    again = run_comparison(config)
    assert len(again.rows) == 18 and features.stat().st_mtime_ns == before
    out = capsys.readouterr().out
    assert "split 0 linear @ 10 %: finished before" in out
    assert "split 0 at 10 % labels: finished before" in out
    kept = [r["mean"] for r in again.rows if r["label_fraction"] != 0.5]
    assert kept == [r["mean"] for r in result.rows]
