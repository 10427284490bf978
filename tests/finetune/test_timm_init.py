"""Fine-tuning from timm weights (``init=timm:FILE``): timm's own loader on a local file, offline."""

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
        ValueError, match=r"1 of 120 weights of the resnet18 backbone .* 'layer1.0.conv1.weight'"
    ):
        build_task_model("classification", "resnet18", 3, f"timm:{tmp_path / 'truncated.pth'}")
    with pytest.raises(
        ValueError, match=r"weights of the csat backbone are not in the file"
    ):  # another model's weights
        build_task_model("segmentation", "csat", 3, f"timm:{path}")
