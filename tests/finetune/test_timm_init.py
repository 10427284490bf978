"""Fine-tuning from timm weights: ``init=timm:FILE`` (a local file) and ``init=imagenet`` (the Hub
checkpoint, here from an offline Hugging Face cache), every backbone key checked."""

from __future__ import annotations

import pytest
import torch

from histokd.finetune.loop import build_task_model
from histokd.models import backbone_state_dict  # before timm: fixes up torchvision


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory):
    """A timm resnet18 (no classifier) state dict saved as timm weights, its keys timm's own."""
    import timm

    torch.manual_seed(7)
    model = timm.create_model("resnet18", num_classes=0, pretrained=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("timm") / "resnet18.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_task_model_backbone_holds_the_timm_file(timm_file, task):
    path, state = timm_file
    torch.manual_seed(0)
    model = build_task_model(task, "resnet18", 3, f"timm:{path}")
    torch.manual_seed(0)
    random = build_task_model(task, "resnet18", 3)  # the same seed without the file
    loaded = backbone_state_dict(model.backbone)
    assert len(loaded) == 120 and set(loaded) <= set(
        state
    )  # every backbone tensor, named as in timm
    assert all(torch.equal(v, state[k]) for k, v in loaded.items())
    differs = [
        k for k, v in backbone_state_dict(random.backbone).items() if not torch.equal(v, state[k])
    ]
    assert (
        "conv1.weight" in differs and len(differs) >= 20
    )  # the file, not the seed, set the weights
    out = model.eval()(torch.rand(2, 3, 64, 64))
    assert out.shape == ((2, 3) if task == "classification" else (2, 3, 64, 64))


def test_timm_file_that_leaves_weights_random_is_an_error(timm_file, tmp_path):
    path, state = timm_file
    truncated = dict(state)
    del truncated["layer1.0.conv1.weight"]
    torch.save(truncated, tmp_path / "truncated.pth")
    # timm itself loads a feature extractor non-strictly: the missing weight would stay random
    with pytest.raises(
        ValueError,
        match=r"truncated\.pth: 1 of 120 backbone keys are missing \('layer1.0.conv1.weight'\)",
    ):
        build_task_model("classification", "resnet18", 3, f"timm:{tmp_path / 'truncated.pth'}")
    with pytest.raises(
        ValueError,
        match=r"resnet18\.pth: 390 of 390 backbone keys are missing .* that the csat backbone lacks",
    ):  # another model's weights
        build_task_model("segmentation", "csat", 3, f"timm:{path}")


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_task_model_backbone_holds_the_imagenet_weights(hub_cache, task):
    hub, _ = hub_cache("resnet18", seed=4)
    torch.manual_seed(0)
    model = build_task_model(task, "resnet18", 3, "imagenet")
    loaded = backbone_state_dict(model.backbone)
    assert len(loaded) == 120 and all(torch.equal(v, hub[k]) for k, v in loaded.items())


def test_finetune_job_from_imagenet_records_the_init(
    ray_cluster, hub_cache, tmp_path, demo_tasks_small
):
    import mlflow

    from histokd.finetune import FinetuneConfig, run_finetune
    from histokd.finetune.compare import CompareConfig

    hub_cache("resnet18")
    config = FinetuneConfig(
        data=str(demo_tasks_small.classification_dir), storage_path=str(tmp_path / "runs"),
        run_name="imagenet", backbone="resnet18", init="imagenet", input_size=32, batch_size=16,
        epochs=1, num_splits=1, num_workers=0, bootstrap_resamples=100,
    )  # fmt: skip
    assert (config.init, config.init_name) == ("imagenet", "SPT on ImageNet")
    result = run_finetune(config)
    run = mlflow.MlflowClient(tracking_uri=config.tracking_uri).get_run(result.mlflow_run_id)
    assert run.data.params["init"] == "imagenet" and run.data.params["backbone"] == "resnet18"
    assert run.data.tags["histokd.init"] == "SPT on ImageNet"
    # a comparison takes ImageNet weights as timm weights of a backbone
    compare = CompareConfig(storage_path=str(tmp_path / "runs"), timm_weights=["resnet18=imagenet"])
    assert compare.initialisations() == [
        ("Random Weight", "csat", "random"),
        ("SPT on ImageNet", "resnet18", "imagenet"),
    ]
