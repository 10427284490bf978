"""Pretraining's MLflow model (`histokd.pretrain.job.log_backbone_model`): the backbone file as a
feature extractor that ``mlflow.pytorch.load_model`` gives back, on a real SQLite store."""

from __future__ import annotations

import pytest
import torch

from histokd.models import SegmentationModel, create_backbone
from histokd.pretrain.config import PretrainConfig
from histokd.pretrain.job import log_backbone_model
from histokd.run import open_mlflow_run


def test_the_backbone_logs_and_loads_back_as_pooled_features(tmp_path, capsys):
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    config = PretrainConfig(storage_path=str(tmp_path), backbone="resnet18", input_size=64,
                            register_model="rckd-resnet18")  # fmt: skip
    torch.manual_seed(0)
    backbone_path = SegmentationModel("resnet18", 2).save_backbone(tmp_path / "backbone.pth")
    run = open_mlflow_run(config, "rckd_pretrain")
    logged = log_backbone_model(config, run, backbone_path)
    assert logged.run_uri == f"runs:/{run.run_id}/backbone"
    assert "registered rckd-resnet18 version 1" in capsys.readouterr().out.splitlines()
    client = mlflow.MlflowClient(config.tracking_uri)
    assert client.get_model_version("rckd-resnet18", "1").source.startswith("models:/m-")

    with _use_tracking_uri(config.tracking_uri):
        loaded = mlflow.pytorch.load_model("models:/rckd-resnet18/1")
        info = mlflow.models.get_model_info("models:/rckd-resnet18/1")
    backbone = create_backbone("resnet18", backbone_file=backbone_path).eval()
    x = torch.rand(2, 3, 64, 64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = backbone((x - mean) / std)[-1].mean(dim=(2, 3))
        assert torch.allclose(loaded(x), expected, atol=1e-6)
    assert expected.shape == (2, 512)
    meta = info.metadata
    assert (meta["task"], meta["backbone"], meta["input_size"], meta["num_features"]) == (
        "features", "resnet18", 64, 512,
    )  # fmt: skip
    assert (meta["mpp"], meta["magnification"], meta["patch_size"]) == (0.5, 20.0, 1024)
    assert meta["histokd_model_file"] == "extra_files/backbone.pth"
    assert info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 512)
    assert meta["normalization"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
