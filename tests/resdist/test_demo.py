"""The resolution-distillation demo (jobs/resdist_demo.py): every phase, at the smallest sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from histokd.demos.resdist import DemoConfig, run_demo

STUDENTS = {"2.5x": 2.5, "1.25x": 1.25}
METHODS = {"baseline": "baseline", "kd": "KD", "kd-aux": "KD (AD)"}


@pytest.mark.slow
def test_demo_runs_teacher_distillation_and_evaluation(tmp_path):
    # some 10 s on 2 CPUs: 6 + 2 slides of 1024 px, one epoch of every run, Ray Train's local mode
    config = DemoConfig(
        storage_path=str(tmp_path / "runs"), demo_dir=str(tmp_path / "slides"), labelled_slides=6, aux_slides=2,
        val_slides=1, test_slides=2, slide_size=1024, student_magnifications=list(STUDENTS.values()), teacher_epochs=1,
        epochs=1, finetune_epochs=1, accumulation_steps=2, bootstrap_resamples=200, min_purity=0.0,
    )  # fmt: skip
    result = run_demo(config)
    storage = Path(config.storage_path)

    # the data: a table of regions per split, the auxiliary set unlabelled
    regions = result.data_summary["regions"]
    assert {"train", "val", "test", "aux"} <= set(regions) and set(regions["aux"]) == {"unlabelled"}
    n_test = sum(regions["test"].values())
    assert n_test >= 1 and len(pd.read_csv(result.data_summary["table"])) == sum(
        sum(c.values()) for c in regions.values()
    )

    # one model per run: the teacher, then baseline, KD and KD (AD) at each student magnification
    expected = ["teacher"] + [f"{m}-{tag}" for tag in STUDENTS for m in METHODS]
    assert sorted(result.models) == sorted(expected)
    for key, path in result.models.items():
        assert Path(path) == storage / key / "model.pt" and Path(path).is_file()
    phases = {
        key: json.loads((storage / key / "result.json").read_text())["phase"]
        for key in result.models
    }
    for tag in (
        STUDENTS
    ):  # KD on the labelled regions keeps the distilled student; KD (AD) is fine-tuned after
        assert (phases["teacher"], phases[f"baseline-{tag}"], phases[f"kd-{tag}"], phases[f"kd-aux-{tag}"]) == (
            "supervised", "supervised", "distill", "finetune")  # fmt: skip

    # the evaluation: Tables 5-8 (csv, markdown), Fig. 3 (chart), the evaluations (json)
    assert set(result.files) == {"csv", "markdown", "chart", "json"}
    assert all(
        Path(p).is_file() and Path(p).parent == storage / "evaluation"
        for p in result.files.values()
    )
    assert Path(result.files["chart"]).stat().st_size > 10_000
    table = pd.read_csv(result.files["csv"])
    assert len(table) == 7 * 5  # 7 models x accuracy, F1, precision, recall, top-1 accuracy
    assert set(table["metric"]) == {"accuracy", "f1", "precision", "recall", "top1_accuracy"}
    runs = table.drop_duplicates("run_name").set_index("run_name")
    assert sorted(runs.index) == sorted(expected)
    assert (runs.loc["teacher", "method"], runs.loc["teacher", "magnification"]) == (
        "teacher",
        10.0,
    )
    for tag, mag in STUDENTS.items():
        for key, method in METHODS.items():
            assert (
                runs.loc[f"{key}-{tag}", "method"],
                runs.loc[f"{key}-{tag}", "magnification"],
            ) == (method, mag)
    assert (
        table["estimate"].between(0, 1).all()
        and table["ci_low"].between(0, 1).all()
        and table["ci_high"].between(0, 1).all()
    )
    assert (table["ci_low"] <= table["estimate"] + 1e-12).all() and (
        table["estimate"] <= table["ci_high"] + 1e-12
    ).all()
    assert (table["num_images"] == n_test).all() and (table["n_resamples"] == 200).all()
    # a lower magnification has fewer pixels: fewer GFLOPs (teacher 10x > 2.5x > 1.25x)
    gflops = runs["gflops_median"]
    assert gflops["teacher"] > gflops["baseline-2.5x"] == gflops["kd-2.5x"] > gflops["kd-1.25x"] > 0
    markdown = Path(result.files["markdown"]).read_text()
    assert markdown == result.table_markdown
    assert "## Teacher (Table 5)" in markdown and "| | baseline | KD | KD (AD) |" in markdown
    assert "mag = 2.5x" in markdown and "mag = 1.25x" in markdown
    summary = json.loads((storage / "demo_summary.json").read_text())
    assert summary["models"] == result.models and summary["files"] == result.files
    assert set(result.seconds) == {"data", "regions", "evaluation", "total", *expected}

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{storage}/mlflow.db")
    experiment = client.get_experiment_by_name("histokd-resdist")
    (parent,) = client.search_runs(
        [experiment.experiment_id], "tags.`histokd.job` = 'resdist_demo'"
    )
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {Path(p).name for p in result.files.values()} | {"demo_summary.json"} <= artifacts

    # rerunning reuses the slides and every finished model
    stamps = {key: Path(path).stat().st_mtime_ns for key, path in result.models.items()}
    again = run_demo(config)
    assert again.models == result.models
    assert {key: Path(path).stat().st_mtime_ns for key, path in again.models.items()} == stamps
    assert pd.read_csv(again.files["csv"])["estimate"].tolist() == table["estimate"].tolist()


def test_slide_level_labels_give_every_region_of_a_slide_its_label(tmp_path):
    """--label-level slide: the paper's setting, one label per slide on all its regions."""
    from histokd.demos.resdist import make_demo_data

    common = dict(demo_dir=str(tmp_path / "slides"), storage_path=str(tmp_path / "runs"), labelled_slides=6, aux_slides=1,
                  val_slides=1, test_slides=2, slide_size=1024)  # fmt: skip
    table, _ = make_demo_data(DemoConfig(label_level="slide", **common))
    slide_rows = pd.read_csv(table)
    labelled = slide_rows[slide_rows["split"] != "aux"]
    assert (labelled.groupby("slide")["label"].nunique() == 1).all()  # one label per slide
    assert slide_rows.loc[slide_rows["split"] == "aux", "label"].isna().all()  # still unlabelled
    assert (labelled["label"] != labelled["reference_label"]).any()  # noisy, as slide labels are
    # each labelled slide is drawn with a dominant class, and that class is its label
    dominant = labelled["slide"].str.extract(r"labelled-dominant-(\d)/")[0].astype(int) - 1
    names = ["stroma", "tumor", "lymphocyte"]
    assert (labelled["label"] == dominant.map(names.__getitem__)).all()
    # region level (the default) labels each region by its own class, pure regions only
    table, _ = make_demo_data(DemoConfig(**common))
    region_rows = pd.read_csv(table)
    kept = region_rows[region_rows["split"] != "aux"]
    assert (kept["label"] == kept["reference_label"]).all() and (kept["purity"] >= 0.75).all()
    assert len(kept) < len(labelled)  # impure regions are left out only at region level
    with pytest.raises(ValueError, match="label_level='patient': allowed: region, slide"):
        DemoConfig(label_level="patient", **common)
