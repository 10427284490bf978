"""MLflow models of histokd (`histokd.tracking.log_pytorch_model`, `fetch_model_file`) on a real
SQLite tracking store and registry: logged, loaded back in a fresh process, registered, resolved."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from histokd.tracking import (
    MLflowRun,
    check_registered_model_name,
    fetch_model_file,
    log_pytorch_model,
)

INPUT = 64


@pytest.fixture
def run(tmp_path):
    """A run in a fresh SQLite store, which MLflow's own calls in the test use too."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with _use_tracking_uri(uri):
        yield MLflowRun(uri, "models", "job", artifact_location=str(tmp_path / "art"))


def _model_file(path: Path, seed: int = 0):
    """A classification task model and its file, as the fine-tuning loop writes best_model.pt."""
    from histokd.cli import config_to_dict
    from histokd.finetune import FinetuneConfig
    from histokd.finetune.loop import build_task_model
    from histokd.inference.model_file import load_task_model

    config = config_to_dict(FinetuneConfig(backbone="resnet18", input_size=INPUT))
    config.update(num_classes=3, class_names=["a", "b", "c"], magnification=20.0, patch_size=128)
    torch.manual_seed(seed)
    state = build_task_model("classification", "resnet18", 3).state_dict()
    torch.save({"model": state, "best_epoch": 2, "config": config}, path)
    return load_task_model(path)


def _log(run, tmp_path, register=None, seed=0):
    model, info = _model_file(tmp_path / f"best_model_{seed}.pt", seed)
    metadata = {k: v for k, v in info.as_dict().items() if k != "path"}
    return model, log_pytorch_model(
        run, model, input_size=INPUT, metadata=metadata, model_file=info.path, register=register
    )


def test_a_logged_model_loads_back_in_a_fresh_process_with_the_files_outputs(run, tmp_path):
    model, logged = _log(run, tmp_path)
    assert logged.run_uri == f"runs:/{run.run_id}/model"
    x = np.random.default_rng(3).random((2, 3, INPUT, INPUT), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    script = (
        "import sys, mlflow, numpy as np, torch\n"
        f"mlflow.set_tracking_uri({run.tracking_uri!r})\n"
        "m = mlflow.pytorch.load_model(sys.argv[1])\n"
        "x = torch.from_numpy(np.load(sys.argv[2]))\n"
        "with torch.no_grad(): np.save(sys.argv[3], m(x).numpy())\n"
        "print(type(m).__name__, m.training)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, logged.run_uri, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["ClassificationModel", "False"]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), expected)


def test_the_model_records_signature_metadata_requirements_and_its_file(run, tmp_path):
    import mlflow

    _, logged = _log(run, tmp_path)
    info = mlflow.models.get_model_info(logged.model_uri)
    assert info.signature.inputs.to_dict()[0]["tensor-spec"] == {
        "dtype": "float32", "shape": (-1, 3, INPUT, INPUT)
    }  # fmt: skip
    assert info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 3)
    meta = info.metadata
    assert (meta["task"], meta["backbone"], meta["class_names"], meta["input_size"]) == (
        "classification", "resnet18", ["a", "b", "c"], INPUT,
    )  # fmt: skip
    assert (meta["magnification"], meta["patch_size"]) == (20.0, 128)
    assert meta["normalization"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert meta["normalization"]["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert meta["histokd_model_file"] == "extra_files/best_model_0.pt"
    local = Path(
        mlflow.artifacts.download_artifacts(logged.model_uri, dst_path=str(tmp_path / "dl"))
    )
    requirements = (local / "requirements.txt").read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    assert any(r.startswith("timm==") for r in requirements)
    assert not any(r.startswith(("ray", "pandas", "scipy")) for r in requirements)  # not a freeze
    example = json.loads((local / "input_example.json").read_text())
    assert np.asarray(example).shape == (1, 3, INPUT, INPUT)
    assert (local / meta["histokd_model_file"]).read_bytes() == (
        tmp_path / "best_model_0.pt"
    ).read_bytes()


def test_register_model_gives_version_1_then_2(run, tmp_path, capsys):
    _, first = _log(run, tmp_path, register="tumour-grader")
    _, second = _log(run, tmp_path, register="tumour-grader", seed=1)
    assert (first.registered_name, first.registered_version) == ("tumour-grader", 1)
    assert second.registered_version == 2
    lines = capsys.readouterr().out.splitlines()
    assert "registered tumour-grader version 1" in lines
    assert "registered tumour-grader version 2" in lines


def test_model_uris_resolve_to_the_same_model_file(run, tmp_path):
    import mlflow

    _, logged = _log(run, tmp_path, register="grader")
    mlflow.MlflowClient(run.tracking_uri).set_registered_model_alias("grader", "champion", "1")
    original = (tmp_path / "best_model_0.pt").read_bytes()
    for i, uri in enumerate([logged.run_uri, "models:/grader/1", "models:/grader@champion"]):
        path = fetch_model_file(uri, run.tracking_uri, tmp_path / f"fetched{i}")
        assert path.read_bytes() == original, uri
        assert path.is_relative_to(tmp_path / f"fetched{i}")
    for uri in ["models:/grader/7", "models:/nothing/1", f"runs:/{run.run_id}/other"]:
        with pytest.raises(ValueError) as error:
            fetch_model_file(uri, run.tracking_uri, tmp_path / "missing")
        message = str(error.value)
        assert message.startswith(f"model={uri!r}: ") and "\n" not in message
        assert "allowed: runs:/RUN_ID/PATH, models:/NAME/VERSION or models:/NAME@ALIAS" in message


def test_an_mlflow_failure_is_one_warning_and_no_model(tmp_path, caplog):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the artifacts should go")
    run = MLflowRun(
        f"sqlite:///{tmp_path}/mlflow.db", "models", "job", artifact_location=str(blocker)
    )
    with caplog.at_level(logging.WARNING, logger="histokd.tracking"):
        _, logged = _log(run, tmp_path, register="never")
    assert logged is None
    warnings = [r.getMessage() for r in caplog.records if r.name == "histokd.tracking"]
    assert len(warnings) == 1 and "MLflow model 'model' of run" in warnings[0]
    assert "\n" not in warnings[0]
    assert run.client.get_run(run.run_id).info.status == "RUNNING"  # the run itself goes on


@pytest.mark.parametrize("name", ["", "  ", "a/b", "a@b", "a:b"])
def test_registered_model_names_are_checked(name):
    with pytest.raises(ValueError, match=rf"^register_model={name!r}: give a model registry name"):
        check_registered_model_name(name)
    check_registered_model_name("rckd-csat_v2")
    check_registered_model_name(None)


def test_register_model_is_checked_by_both_jobs_configs(tmp_path):
    from histokd.finetune import FinetuneConfig
    from histokd.pretrain.config import PretrainConfig

    for cls in (FinetuneConfig, PretrainConfig):
        with pytest.raises(ValueError, match=r"register_model='x/y'"):
            cls(storage_path=str(tmp_path), register_model="x/y")
        assert cls(storage_path=str(tmp_path), register_model="ok").register_model == "ok"
    assert os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR") is None


def test_a_search_or_comparison_refuses_register_model(tmp_path):
    """Each of their many fine-tunings would register a new version of one name."""
    from histokd.finetune.compare import CompareConfig
    from histokd.finetune.search import SearchConfig

    for cls, job in ((CompareConfig, "comparison"), (SearchConfig, "search")):
        with pytest.raises(ValueError, match=rf"^register_model='rckd': a {job} would register"):
            cls(storage_path=str(tmp_path), finetune={"register_model": "rckd"})
        assert cls(storage_path=str(tmp_path)).finetune.register_model is None
