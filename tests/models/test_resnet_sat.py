"""ResNet18 with SAT modules: counts of RCKD Table 6 and placement after bn2."""

from __future__ import annotations

import pytest
import timm
import torch

import histokd.models  # noqa: F401  (registers histokd_resnet18_sat with timm)
from histokd.models.sat import SpatialAttentionTransformer


@pytest.mark.parametrize(
    ("name", "expected"), [("resnet18", 11_689_512), ("histokd_resnet18_sat", 11_690_544)]
)
def test_param_count_with_1000_class_head(name: str, expected: int) -> None:
    assert sum(p.numel() for p in timm.create_model(name).parameters()) == expected


def test_one_sat_module_after_bn2_of_each_basic_block() -> None:
    model = timm.create_model("histokd_resnet18_sat")
    blocks = [
        b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer
    ]
    assert len(blocks) == 8
    assert all(isinstance(b.se, SpatialAttentionTransformer) for b in blocks)
    # timm's BasicBlock applies `se` right after bn2, before the residual sum: check by hooks
    order: list[str] = []
    block = blocks[0]
    block.bn2.register_forward_hook(lambda *_: order.append("bn2"))
    block.se.register_forward_hook(lambda *_: order.append("sat"))
    block(torch.randn(1, 64, 16, 16))
    assert order == ["bn2", "sat"]


def test_resnet18_weights_load_with_only_sat_keys_missing() -> None:
    plain = timm.create_model("resnet18")
    model = timm.create_model("histokd_resnet18_sat")
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(".se." in k for k in result.missing_keys)
    assert len({k.split(".se.")[0] for k in result.missing_keys}) == 8


def test_features_only() -> None:
    model = timm.create_model("histokd_resnet18_sat", features_only=True)
    features = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == [64, 64, 128, 256, 512]
    assert model.feature_info.reduction() == [2, 4, 8, 16, 32]
