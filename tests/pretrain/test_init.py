"""Pretraining's ``--init``: the student from ImageNet weights as RCKD does (Sec. 2.2.1), checked
before any Ray work; offline and CSAT errors in one line."""

from __future__ import annotations

import pytest
import torch

from histokd.cli import parse_config
from histokd.models import backbone_state_dict
from histokd.pretrain.config import PretrainConfig
from histokd.pretrain.loop import build_student


def test_student_starts_from_the_imagenet_weights(hub_cache, tmp_path):
    hub, _ = hub_cache("resnet18", seed=3)
    config = parse_config(
        PretrainConfig,
        ["--storage-path", str(tmp_path), "--backbone", "resnet18", "--init", "imagenet"],
    )
    assert config.init == "imagenet"
    assert PretrainConfig(storage_path=str(tmp_path)).init == "random"  # the default
    torch.manual_seed(0)
    student = build_student(config.backbone, config.init)
    loaded = backbone_state_dict(student.backbone)
    assert len(loaded) == 120 and all(torch.equal(v, hub[k]) for k, v in loaded.items())
    torch.manual_seed(0)
    random = backbone_state_dict(build_student("resnet18").backbone)
    assert not torch.equal(random["layer1.0.bn1.weight"], hub["layer1.0.bn1.weight"])
    assert student(torch.rand(1, 3, 64, 64)).shape == (1, 2, 64, 64)  # + the U-Net decoder


@pytest.mark.parametrize(
    "backbone, message",
    [
        ("csat", r"init='imagenet': CSAT has no ImageNet weights \(backbone='csat'\); it stays random"),
        ("convnextv2_atto", r"init='imagenet': the ImageNet weights of convnextv2_atto \(timm/convnextv2_atto.fcmae_ft_in1k on the Hugging Face Hub\) are not in the cache .*\(HF_HUB_OFFLINE=1\)"),
    ],
)  # fmt: skip
def test_imagenet_that_cannot_load_fails_in_the_config(hub_cache, tmp_path, backbone, message):
    hub_cache("resnet18")  # an offline cache without convnextv2_atto's weights
    with pytest.raises(ValueError, match=message):
        PretrainConfig(storage_path=str(tmp_path), backbone=backbone, init="imagenet")
