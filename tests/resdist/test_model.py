"""The GroupNorm ResNet (DiPalma Sec. 3.5; public code's sizes), zoo students, model files."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from histokd.resdist.model import (
    DistillationNet,
    ResolutionResNet,
    create_resdist_model,
    load_model_file,
    replace_batchnorm,
    save_model_file,
)


def _norms(model: nn.Module) -> list[nn.Module]:
    return [
        m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm))
    ]


def test_groupnorm_everywhere_and_no_batchnorm():
    model = create_resdist_model(num_classes=3)
    assert isinstance(model, ResolutionResNet)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    norms = _norms(model)
    # stem + 4 blocks x 2 norms + 3 downsample shortcuts (stages 2-4 change width and stride)
    assert len(norms) == 1 + 4 * 2 + 3
    assert all(isinstance(m, nn.GroupNorm) and m.num_groups == 32 for m in norms)
    # the 32-channel stage has one channel per group (RESOLUTION_KD.md)
    assert model.bn1.num_channels == 32 and model.bn1.num_groups == 32


def test_architecture_sizes_and_outputs():
    model = create_resdist_model(num_classes=3).eval()
    widths = [s[0].conv2.out_channels for s in model.stages]
    assert widths == [32, 64, 128, 256]
    assert [len(s) for s in model.stages] == [1, 1, 1, 1]  # one BasicBlock per stage
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert sum(p.numel() for p in model.parameters()) == 1_231_011
    x = torch.randn(1, 3, 250, 200)
    features, logits = model.forward_distill(x)
    assert features.shape == (1, 256, 8, 7)  # stride 32, ceil-rounded
    assert logits.shape == (1, 3) and model.hint_channels == 256
    assert torch.allclose(model.forward_head(features), logits)
    assert torch.equal(model(x), logits) and torch.equal(model.forward_features(x), features)


def test_he_initialisation():
    torch.manual_seed(0)
    model = create_resdist_model(num_classes=3)
    conv = model.stages[3][0].conv2  # 256 x 256 x 3 x 3: many weights, a tight estimate
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    weight = conv.weight.detach()
    assert float(weight.std()) == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.02)
    assert float(weight.mean()) == pytest.approx(0.0, abs=1e-3)
    gn = model.stages[0][0].bn1
    assert torch.all(gn.weight == 1) and torch.all(gn.bias == 0)


def test_trains_with_batch_size_one_where_batchnorm_cannot():
    torch.manual_seed(0)
    image = torch.randn(1, 3, 40, 56)  # the last map is 2 x 2: BatchNorm sees too few values
    target = torch.tensor([2])
    model = create_resdist_model(num_classes=3).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        logits = model(image)
        loss = nn.functional.cross_entropy(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] * 0.5
    # the same network with BatchNorm fails on a single small image in training mode
    bn_model = ResolutionResNet(num_classes=3)
    replaced = 0
    for module in list(bn_model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(module, name, nn.BatchNorm2d(child.num_channels))
                replaced += 1
    assert replaced == 12
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn_model.train()(torch.randn(1, 3, 20, 20))


def test_registered_with_timm():
    model = timm.create_model("resdist_resnet", num_classes=5)
    assert isinstance(model, ResolutionResNet)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_b0"])
def test_zoo_backbone_as_student(backbone):
    model = create_resdist_model(backbone, num_classes=3, hint_channels=256)
    assert isinstance(model, DistillationNet)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x = torch.randn(1, 3, 64, 96)
    features, logits = model.forward_distill(x)
    assert features.shape == (1, 256, 2, 3)  # mapped to the teacher's channels for Eq. 3
    assert logits.shape == (1, 3) and torch.equal(model.eval()(x), model.forward_distill(x)[1])
    assert model.get_classifier() is model.model.get_classifier()


def test_replace_batchnorm_keeps_fused_activations():
    from timm.layers import GroupNormAct

    model = timm.create_model("efficientnet_b0", num_classes=2)
    fused = sum(type(m).__name__ == "BatchNormAct2d" for m in model.modules())
    count = replace_batchnorm(model)
    assert count >= fused > 0
    assert sum(isinstance(m, GroupNormAct) for m in model.modules()) == fused
    acts = [type(m.act).__name__ for m in model.modules() if isinstance(m, GroupNormAct)]
    assert "SiLU" in acts  # efficientnet's activation survived the swap
    # the most groups up to 32 that divide the channels: 24 -> 8, 32 -> 32, 1280 -> 32
    groups = {m.num_channels: m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}
    assert (groups[24], groups[32], groups[1280]) == (8, 32, 32)


def test_unknown_backbone_is_named():
    with pytest.raises(ValueError, match="not_a_model"):
        create_resdist_model("not_a_model")


def test_model_file_round_trip(tmp_path):
    torch.manual_seed(0)
    for backbone, hint in (("resdist_resnet", None), ("resnet18", 256)):
        model = create_resdist_model(backbone, num_classes=3, hint_channels=hint).eval()
        config = {"backbone": backbone, "num_classes": 3, "magnification": 2.5, "input_size": 64,
                  "mean": [0.5] * 3, "std": [0.2] * 3, "method": "KD",
                  "resdist": {"num_groups": 32, "hint_channels": hint}}  # fmt: skip
        path = save_model_file(tmp_path / f"{backbone}.pt", model, config, best_epoch=4)
        loaded, loaded_config = load_model_file(path)
        assert loaded_config["method"] == "KD" and loaded_config["magnification"] == 2.5
        assert loaded_config["class_names"] == ["class_0", "class_1", "class_2"]
        assert torch.load(path, weights_only=True)["best_epoch"] == 4 and not loaded.training
        x = torch.randn(1, 3, 64, 64)
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
        assert loaded.hint_channels == 256
    with pytest.raises(ValueError, match="mean"):
        save_model_file(tmp_path / "bad.pt", model, {"backbone": "resnet18", "num_classes": 3,
                                                     "magnification": 1.0, "input_size": 64})  # fmt: skip
    with pytest.raises(ValueError, match="missing.pt: file not found"):
        load_model_file(tmp_path / "missing.pt")
