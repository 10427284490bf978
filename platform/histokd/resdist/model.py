"""The GroupNorm ResNet of resolution-based distillation, timm models in its place, model files.

DiPalma et al. 2021, Sec. 3.2-3.5; its size is the authors' public code's (``RESOLUTION_KD.md``).
``forward`` returns the logits, as every timm model; ``forward_distill`` the hint (the last feature
map, Eq. 3) and the logits (Eq. 2). Beyond the paper, any timm model can be the student
(:class:`DistillationNet`). Trained networks are task-model files (:mod:`histokd.inference.model_file`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import GroupNorm, GroupNormAct, create_classifier
from timm.layers.norm_act import BatchNormAct2d
from timm.models import build_model_with_cfg, register_model
from timm.models._registry import generate_default_cfgs
from timm.models.resnet import BasicBlock
from torch import nn

__all__ = ["DistillationNet", "ResolutionResNet", "create_resdist_model", "load_model_file",
           "replace_batchnorm", "save_model_file"]  # fmt: skip

RESDIST_ARCH = "resdist_resnet"


def _group_norm(channels: int, num_groups: int, **kwargs) -> GroupNorm:
    # the most groups up to num_groups that divide the channels
    return GroupNorm(channels, num_groups=math.gcd(channels, num_groups), **kwargs)


class ResolutionResNet(nn.Module):
    """The teacher and student network of DiPalma et al.: one BasicBlock per stage of ``widths``;
    ``num_groups`` GroupNorm groups (fewer where a layer's channels are not a multiple)."""

    def __init__(self, num_classes: int = 3, in_chans: int = 3, widths: Sequence[int] = (32, 64, 128, 256),
                 num_groups: int = 32) -> None:  # fmt: skip
        super().__init__()
        norm = lambda c, **kw: _group_norm(c, num_groups, **kw)  # noqa: E731
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm(widths[0])
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.feature_info = [dict(num_chs=widths[0], reduction=2, module="act1")]
        stages, inplanes = [], widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or inplanes != width:
                downsample = nn.Sequential(nn.Conv2d(inplanes, width, 1, stride=stride, bias=False), norm(width))  # fmt: skip
            stages.append(nn.Sequential(BasicBlock(inplanes, width, stride, downsample, norm_layer=norm)))  # fmt: skip
            self.feature_info.append(dict(num_chs=width, reduction=4 * 2**i, module=f"stages.{i}"))
            inplanes = width
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = self.hint_channels = inplanes
        self.global_pool, self.fc = create_classifier(inplanes, num_classes, pool_type="avg")
        for m in self.modules():  # DiPalma Sec. 4.5.1: He initialisation (fan_out, relu); norms 1/0
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (DiPalma Eq. 3's F_fe)."""
        return self.stages(self.maxpool(self.act1(self.bn1(self.conv1(x)))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pooling and the linear layer (DiPalma Eq. 2's F_class)."""
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_distill(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hint feature map, logits) (DiPalma Fig. 2)."""
        features = self.forward_features(x)
        return features, self.forward_head(features)


def replace_batchnorm(module: nn.Module, num_groups: int = 32) -> int:
    """Swap every BatchNorm2d (timm's fused ``BatchNormAct2d`` too) for a GroupNorm in place;
    the number swapped. The GroupNorms start as identity maps: statistics do not transfer."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            kwargs = dict(eps=child.eps, affine=child.affine)
            if isinstance(child, BatchNormAct2d):
                c = child.num_features
                new = GroupNormAct(c, num_groups=math.gcd(c, num_groups), **kwargs)
                new.act, new.drop = child.act, child.drop
            else:
                new = _group_norm(child.num_features, num_groups, **kwargs)
            setattr(module, name, new)
            count += 1
        else:
            count += replace_batchnorm(child, num_groups)
    return count


class DistillationNet(nn.Module):
    """A timm classifier (``forward_features`` gives an NCHW map) as a resolution-distillation
    network; a 1x1 convolution maps its map to ``hint_channels`` (the teacher's) if they differ."""

    def __init__(self, model: nn.Module, hint_channels: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.hint_channels = hint_channels or int(model.num_features)
        self.adapter: nn.Module = nn.Identity()
        if self.hint_channels != model.num_features:
            self.adapter = nn.Conv2d(model.num_features, self.hint_channels, 1, bias=False)
            nn.init.kaiming_normal_(self.adapter.weight, mode="fan_out", nonlinearity="relu")

    def get_classifier(self) -> nn.Module:
        return self.model.get_classifier()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward_distill(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature map mapped to the hint channels, logits)."""
        features = self.model.forward_features(x)
        return self.adapter(features), self.model.forward_head(features)


def create_resdist_model(backbone: str = RESDIST_ARCH, num_classes: int = 3, *, hint_channels: int | None = None,
                         num_groups: int = 32) -> nn.Module:  # fmt: skip
    """The paper's network, or a timm model with GroupNorms (beyond the paper), with a hint
    adapter where ``hint_channels`` (the teacher's) differ from its own."""
    from histokd.models import timm_name  # histokd's short names: csat is histokd_csat

    if not timm.is_model(timm_name(backbone)):
        raise ValueError(f"backbone={backbone!r}: not a timm model; e.g. {RESDIST_ARCH}, resnet18, csat")  # fmt: skip
    if backbone == RESDIST_ARCH:
        model = timm.create_model(RESDIST_ARCH, num_classes=num_classes, num_groups=num_groups)
        if hint_channels in (None, model.num_features):
            return model
    else:
        model = timm.create_model(timm_name(backbone), num_classes=num_classes)
        replace_batchnorm(model, num_groups)  # DiPalma Sec. 3.5
    return DistillationNet(model, hint_channels)


def save_model_file(path: str | os.PathLike, model: nn.Module, config: Mapping[str, Any], best_epoch: int = 0) -> Path:  # fmt: skip
    """Write a task-model file (:mod:`histokd.inference.model_file`): ``config`` has at least
    ``backbone``, ``num_classes``, ``magnification``, ``input_size``, ``mean`` and ``std``, and
    ``resdist`` (``num_groups``, ``hint_channels``) to rebuild the network."""
    for key in ("backbone", "num_classes", "magnification", "mean", "std", "input_size"):
        if key not in config:
            raise ValueError(f"save_model_file: config lacks {key!r}")
    config = {"task": "classification", "patch_size": config["input_size"], **config}
    config.setdefault("resdist", {"num_groups": 32, "hint_channels": None})
    config.setdefault("class_names", [f"class_{k}" for k in range(config["num_classes"])])
    from histokd.resume import write_atomic

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"model": state, "best_epoch": int(best_epoch), "config": config}
    return write_atomic(path, lambda f: torch.save(payload, f))


def load_model_file(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:  # fmt: skip
    """The network of a model file (eval mode, on ``device``) and the file's config; a
    ``ModelFileError`` (a ``ValueError``) for a missing or unusable file."""
    from histokd.inference.model_file import build_model, describe_checkpoint, load_checkpoint

    payload = load_checkpoint(path)
    model = build_model(describe_checkpoint(str(path), payload), payload["model"], bare=True)
    return model.to(device), dict(payload["config"])


default_cfgs = generate_default_cfgs({
    RESDIST_ARCH: {
        "url": "", "num_classes": 3, "input_size": (3, 224, 224), "pool_size": (7, 7), "interpolation": "lanczos",
        "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),  # the training set's own are used (Sec. 3.2)
        "first_conv": "conv1", "classifier": "fc",
    }
})  # fmt: skip


@register_model
def resdist_resnet(pretrained: bool = False, **kwargs) -> ResolutionResNet:
    """DiPalma et al.'s GroupNorm ResNet: one BasicBlock per stage, widths 32-256 (public code)."""
    return build_model_with_cfg(ResolutionResNet, RESDIST_ARCH, pretrained, **kwargs)
