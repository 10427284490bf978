"""``predict_slides --model`` as an MLflow model URI: the fine-tuning job's logged model
(`histokd.finetune.job.log_task_model`), resolved from ``runs:/`` and ``models:/`` against a real
SQLite store and registry, is the model file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from histokd.finetune import FinetuneConfig
from histokd.finetune.job import log_task_model
from histokd.inference.config import PredictConfig
from histokd.inference.job import resolve_model
from histokd.inference.model_file import load_checkpoint
from histokd.run import open_mlflow_run


@pytest.fixture(scope="module")
def logged(tmp_path_factory, save_task_model):
    """A fine-tuning run folder with two splits, its MLflow run, and its model logged and
    registered as ``grader`` (version 1)."""
    tmp_path = tmp_path_factory.mktemp("finetune")
    config = FinetuneConfig(
        storage_path=str(tmp_path / "runs"), run_name="ft", register_model="grader"
    )
    for split, loss in ((0, 0.9), (1, 0.4)):  # split 1 has the lower validation loss
        path = save_task_model(config.work_dir / f"split_{split}" / "best_model.pt", seed=split,
                               magnification=20.0, patch_size=128)  # fmt: skip
        payload = torch.load(path, weights_only=True)
        payload["config"]["split_index"] = split  # as the loop writes it
        torch.save(payload, path)
        (path.parent / "result.json").write_text(
            json.dumps({"best_model": str(path), "best_val_loss": loss})
        )
    run = open_mlflow_run(config, "finetune")
    return config, run, log_task_model(config, run, config.work_dir)


def test_the_best_splits_model_is_logged_with_its_metadata(logged):
    import mlflow

    config, run, model = logged
    assert model.run_uri == f"runs:/{run.run_id}/model" and model.registered_version == 1
    meta = mlflow.MlflowClient(config.tracking_uri).get_logged_model(model.model_uri.split("/")[-1])
    with_meta = mlflow.models.Model.load(mlflow.artifacts.download_artifacts(
        f"{meta.artifact_location}/MLmodel", tracking_uri=config.tracking_uri)).metadata  # fmt: skip
    assert (with_meta["split"], with_meta["task"], with_meta["class_names"]) == (
        1,
        "classification",
        ["a", "b", "c"],
    )
    assert (with_meta["mpp"], with_meta["magnification"], with_meta["patch_size"]) == (
        0.5,
        20.0,
        128,
    )
    assert with_meta["histokd_model_file"] == "extra_files/best_model.pt"


@pytest.mark.parametrize("form", ["runs", "models", "alias"])
def test_predict_resolves_mlflow_uris_to_the_model_file(logged, tmp_path, form):
    import mlflow

    config, run, _ = logged
    mlflow.MlflowClient(config.tracking_uri).set_registered_model_alias("grader", "prod", "1")
    uri = {
        "runs": f"runs:/{run.run_id}/model",
        "models": "models:/grader/1",
        "alias": "models:/grader@prod",
    }[form]
    predict = PredictConfig(
        model=uri, storage_path=str(tmp_path / "predict"), mlflow_tracking_uri=config.tracking_uri
    )
    checkpoint, info = resolve_model(predict)
    expected = load_checkpoint(config.work_dir / "split_1" / "best_model.pt")
    assert info.path.endswith("best_model.pt") and info.path.startswith(str(predict.work_dir))
    assert (info.class_names, info.magnification, info.patch_size) == (("a", "b", "c"), 20.0, 128)
    assert checkpoint["config"]["split_index"] == 1
    assert checkpoint["model"].keys() == expected["model"].keys()
    assert all(torch.equal(checkpoint["model"][k], expected["model"][k]) for k in expected["model"])


def test_a_uri_that_does_not_resolve_is_one_line(logged, tmp_path):
    config, _, _ = logged
    predict = PredictConfig(model="models:/grader/2", storage_path=str(tmp_path / "predict"),
                            mlflow_tracking_uri=config.tracking_uri)  # fmt: skip
    with pytest.raises(ValueError) as error:
        resolve_model(predict)
    message = str(error.value)
    assert message.startswith("model='models:/grader/2': ") and "\n" not in message
    assert "allowed: runs:/RUN_ID/PATH, models:/NAME/VERSION or models:/NAME@ALIAS" in message
    shutil.rmtree(predict.work_dir, ignore_errors=True)


@pytest.mark.parametrize(
    "uri", ["runs:/abc", "models:/", "models:/a/b/c", "runs:abc/model", "models:/a@"]
)
def test_malformed_model_uris_are_refused_by_the_config(tmp_path, uri):
    with pytest.raises(
        ValueError, match=rf"^model={uri!r}: not an MLflow model URI; allowed: runs:/RUN_ID/PATH"
    ):
        PredictConfig(model=uri, storage_path=str(tmp_path))
    assert (
        PredictConfig(model="models:/x@champion", storage_path=str(tmp_path)).model
        == "models:/x@champion"
    )
