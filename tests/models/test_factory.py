"""Backbone factory: names, multi-scale features, timm-named backbone files."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from histokd.models import (
    BACKBONES,
    backbone_state_dict,
    create_backbone,
    load_backbone_file,
    save_backbone,
    timm_name,
)

FEATURES = {  # channels and strides of each level, finest first
    "csat": ([32, 48, 96, 176], [4, 8, 16, 32]),
    "csat_nosat": ([32, 48, 96, 176], [4, 8, 16, 32]),
    "resnet18": ([64, 64, 128, 256, 512], [2, 4, 8, 16, 32]),
    "resnet18_sat": ([64, 64, 128, 256, 512], [2, 4, 8, 16, 32]),
    "efficientnet_b0": ([16, 24, 40, 112, 320], [2, 4, 8, 16, 32]),
    "convnextv2_atto": ([40, 80, 160, 320], [4, 8, 16, 32]),
}
HEAD_PREFIXES = {  # what a timm classifier has beyond the feature extractor
    "csat": ("head.",),
    "csat_nosat": ("head.",),
    "resnet18": ("fc.",),
    "resnet18_sat": ("fc.",),
    "efficientnet_b0": ("conv_head.", "bn2.", "classifier."),
    "convnextv2_atto": ("head.",),
}


def test_names() -> None:
    assert set(BACKBONES) == set(FEATURES)


def test_unknown_name_names_the_value_and_the_choices() -> None:
    with pytest.raises(ValueError, match=r"'resnet50'.*csat, csat_nosat, resnet18, resnet18_sat"):
        create_backbone("resnet50")


@pytest.mark.parametrize("name", BACKBONES)
def test_multi_scale_features(name: str) -> None:
    backbone = create_backbone(name).eval()
    channels, reductions = FEATURES[name]
    assert backbone.feature_info.channels() == channels
    assert backbone.feature_info.reduction() == reductions
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in features] == [
        (c, 64 // r, 64 // r) for c, r in zip(channels, reductions, strict=True)
    ]


@pytest.mark.parametrize("name", BACKBONES)
def test_state_dict_keys_are_timms(name: str) -> None:
    keys = set(backbone_state_dict(create_backbone(name)))
    full = set(timm.create_model(timm_name(name)).state_dict())
    assert keys <= full
    assert all(k.startswith(HEAD_PREFIXES[name]) for k in full - keys), sorted(full - keys)[:5]


def test_out_indices() -> None:
    backbone = create_backbone("resnet18", out_indices=(2, 4))
    assert backbone.feature_info.channels() == [128, 512]
    assert len(backbone(torch.randn(1, 3, 64, 64))) == 2


def _equal_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_save_and_load_strictly(tmp_path: Path, suffix: str) -> None:
    source = create_backbone("csat")
    path = save_backbone(source, tmp_path / f"backbone{suffix}")
    target = create_backbone("csat", backbone_file=path)
    assert _equal_weights(backbone_state_dict(target), backbone_state_dict(source))
    assert not _equal_weights(
        backbone_state_dict(create_backbone("csat")), backbone_state_dict(source)
    )


@pytest.mark.parametrize("name", ["csat", "convnextv2_atto", "resnet18_sat"])
def test_file_loads_through_timms_pretrained_overlay(tmp_path: Path, name: str) -> None:
    source = create_backbone(name)
    path = save_backbone(source, tmp_path / "backbone.pth")
    saved = backbone_state_dict(source)
    overlay = dict(file=str(path))
    # features_only (FeatureListNet, flattened names for csat and convnext) ...
    listnet = timm.create_model(
        timm_name(name), features_only=True, pretrained=True, pretrained_cfg_overlay=overlay
    )
    first = next(iter(saved))
    assert torch.equal(next(iter(listnet.state_dict().values())), saved[first])
    # ... the factory ...
    getter = create_backbone(name, pretrained=True, pretrained_cfg_overlay=overlay)
    assert _equal_weights(backbone_state_dict(getter), saved)
    # ... and a classifier with a new head
    classifier = timm.create_model(
        timm_name(name), num_classes=5, pretrained=True, pretrained_cfg_overlay=overlay
    )
    loaded = classifier.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())


def test_wrong_file_is_one_clear_error(tmp_path: Path) -> None:
    path = save_backbone(create_backbone("csat"), tmp_path / "csat.pth")
    with pytest.raises(ValueError, match=r"csat\.pth.*backbone keys are missing.*'conv1\.weight'"):
        create_backbone("resnet18", backbone_file=path)
    # a whole task-model checkpoint is not a backbone file
    prefixed = tmp_path / "prefixed.pth"
    torch.save({"backbone.model." + k: v for k, v in torch.load(path).items()}, prefixed)
    with pytest.raises(ValueError, match=r"prefixed\.pth.*keys like 'backbone\.model\."):
        create_backbone("csat", backbone_file=prefixed)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        create_backbone("csat", backbone_file=tmp_path / "nowhere.pth")


def test_shape_mismatch_names_the_key(tmp_path: Path) -> None:
    backbone = create_backbone("csat")
    state = backbone_state_dict(backbone)
    state["stem.0.weight"] = torch.zeros(8, 3, 4, 4)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(
        ValueError, match=r"'stem\.0\.weight' has shape \(8, 3, 4, 4\).*\(32, 3, 4, 4\)"
    ):
        load_backbone_file(backbone, path)


def test_extra_head_keys_are_ignored(tmp_path: Path) -> None:
    full = timm.create_model("histokd_csat", num_classes=3)
    path = tmp_path / "classifier.pth"
    torch.save(full.state_dict(), path)
    backbone = create_backbone("csat", backbone_file=path)
    assert torch.equal(backbone_state_dict(backbone)["stem.0.weight"], full.stem[0].weight)
