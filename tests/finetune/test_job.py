"""The fine-tuning job on a real local Ray: each split a Ray Train run, in parallel, MLflow,
and a rerun that reuses finished splits."""

import json
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from histokd.finetune import FinetuneConfig, run_finetune


@pytest.mark.slow
def test_two_splits_as_parallel_ray_train_runs(
    ray_cluster, tmp_path, demo_tasks_small, backbone_file
):
    import mlflow

    config = FinetuneConfig(
        data=str(demo_tasks_small.classification_dir), storage_path=str(tmp_path / "runs"), run_name="job",
        init=str(backbone_file), input_size=32, batch_size=16, epochs=2, patience=5, lr=0.05,
        num_splits=2, bootstrap_resamples=500, stain_norm="macenko", augment_device="device",
    )  # fmt: skip
    seen = []
    result = run_finetune(config, on_split_done=lambda r, done: seen.append(len(done)))
    assert seen == [1, 2]
    storage = Path(config.storage_path)
    for i in range(2):  # one Ray Train run per split, named by the run and the split
        assert (storage / f"job-split{i}").is_dir()
        assert Path(result.split_results[i]["best_model"]).name == "best_model.pt"
        assert result.split_results[i]["sizes"] == {
            "train": 22,
            "val": 7,
            "test": 7,
        }  # 36 x 6:2:2, stratified
        # the model file records the images' scale (the demo's dataset.json: 64 px at 20x) for inference
        saved = torch.load(result.split_results[i]["best_model"], weights_only=True)["config"]
        assert (saved["magnification"], saved["patch_size"]) == (20.0, 64)
        # and the stain normalisation the images had, which inference applies (test_stream.py)
        from histokd.stain import DEFAULT_REFERENCE

        assert saved["stain_normalization"] == DEFAULT_REFERENCE.as_dict()
    summary = result.summary
    acc = summary["metrics"]["accuracy"]
    assert acc["mean"] == pytest.approx(sum(acc["values"]) / 2)
    assert acc["ci_low"] <= acc["mean"] <= acc["ci_high"]
    for name in ("summary_json", "splits_csv", "summary_md"):
        assert Path(result.files[name]).is_file()
    assert "Accuracy" in Path(result.files["summary_md"]).read_text()
    # the metrics people report, each with its interval, the confusion matrix and the flag
    saved = json.loads(Path(result.files["summary_json"]).read_text())
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"):
        entry = saved["metrics"][name]
        values = (entry["mean"], entry["ci_low"], entry["ci_high"])
        assert all(0 <= v <= 1 for v in values) and entry["ci_low"] <= entry["ci_high"], name
        assert all(0 <= row[name] <= 1 for row in saved["splits"]), name
    assert isinstance(saved["single_class_predictions"], bool)
    assert sum(map(sum, saved["confusion_matrix"])) == 14  # 2 splits x 7 test images
    for split in result.split_results:  # each split's result keeps its probabilities and AUROC
        probability = split["test_records"]["probability"]
        assert len(probability) == 7 and all(
            sum(p) == pytest.approx(1, abs=1e-5) for p in probability
        )
        assert 0 <= split["test"]["auroc"] <= 1 and 0 <= split["test"]["balanced_accuracy"] <= 1

    client = mlflow.MlflowClient(tracking_uri=config.tracking_uri)
    parent = client.get_run(result.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["test_accuracy_mean"] == pytest.approx(acc["mean"])
    assert parent.data.tags["histokd.init"] == "RCKD"
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    assert sorted(c.info.run_name for c in children) == ["job-split0", "job-split1"]
    assert all(
        "val_loss" in client.get_metric_history(c.info.run_id, "val_loss")[0].key for c in children
    )
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.md", "splits.csv", "summary.json", "augmentation_examples.png"} <= artifacts
    # the pictures of the test predictions, and the best split's model as an MLflow model
    figures = {"test_confusion_matrix.png", "test_roc_curve.png", "test_per_class_metrics.png"}
    assert figures <= artifacts
    numbers = json.loads(Path(result.files["numbers"]).read_text())
    assert numbers["confusion_matrix"] == saved["confusion_matrix"]
    source = f"source_run_id = '{parent.info.run_id}'"
    (model,) = client.search_logged_models([parent.info.experiment_id], filter_string=source)
    assert model.name == "model" and str(model.status).endswith("READY")
    logged = mlflow.models.Model.load(mlflow.artifacts.download_artifacts(
        f"{model.artifact_location}/MLmodel", tracking_uri=config.tracking_uri)).metadata  # fmt: skip
    assert logged["split"] == min(result.split_results, key=lambda r: r["best_val_loss"])["split"]
    assert (logged["magnification"], logged["patch_size"], logged["input_size"]) == (20.0, 64, 32)
    examples = Image.open(Path(result.run_dir) / "augmentation_examples.png")
    assert examples.height > 4 * 32 and examples.width >= 2 * 32  # 4 images, before | after

    started = time.monotonic()
    again = run_finetune(config)  # same run name: both splits reused, no training
    assert time.monotonic() - started < 30
    assert again.summary["metrics"]["accuracy"]["values"] == acc["values"]


@pytest.mark.slow
def test_a_failed_split_worker_resumes_from_its_last_epoch(ray_cluster, tmp_path, demo_tasks_small):
    """A worker fault in epoch 3 restarts the split from epoch 2's checkpoint, not from scratch."""
    import mlflow

    config = FinetuneConfig(
        data=str(demo_tasks_small.classification_dir), storage_path=str(tmp_path / "runs"), run_name="faulty",
        input_size=32, batch_size=16, epochs=4, patience=10, lr=0.05, num_splits=1, bootstrap_resamples=200,
        fail_at_epoch=3, max_failures=1,
    )  # fmt: skip
    result = run_finetune(config)
    split_dir = tmp_path / "runs" / "faulty" / "split_0"
    assert (split_dir / ".fault_injected").exists()  # the fault did happen
    split = result.split_results[0]
    assert split["stopped_epoch"] == 4 and [h["epoch"] for h in split["history"]] == [1, 2, 3, 4]
    client = mlflow.MlflowClient(tracking_uri=config.tracking_uri)
    child = client.search_runs(
        [client.get_experiment_by_name(config.mlflow_experiment).experiment_id],
        filter_string="tags.`histokd.split` = '0'",
    )[0]
    # epochs 1 and 2 were trained once: a restart from scratch would log them twice
    assert [m.step for m in client.get_metric_history(child.info.run_id, "val_loss")] == [
        1,
        2,
        3,
        4,
    ]
