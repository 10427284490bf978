"""The GroupNorm ResNet of resolution-based distillation, and any zoo backbone in its place.

Paper: `Resolution-based distillation for efficient histology image classification`
(DiPalma et al., Artificial Intelligence in Medicine 2021, 102136), Sec. 3.2, 3.5, 4.5.

Teacher and student share one architecture (Sec. 3.3): a small ResNet whose size the paper
leaves out; the authors' public code (see ``../shared/RESOLUTION_KD.md``) has one BasicBlock per
stage with stage widths (32, 64, 128, 256), a 7x7 stride-2 stem convolution and a 3x3 stride-2
max-pool, convolutions without bias, GroupNorm with 32 groups wherever BatchNorm would be
(Sec. 3.5: inputs are single variable-size images, gradients are accumulated over them, and
BatchNorm cannot work on a batch of one), Kaiming-normal initialisation (Sec. 4.5.1, fan_out,
relu) and norm weights 1 / biases 0. Its forward pass returns two things (Sec. 4.5.3, Fig. 2):
the last stage's feature map (the hint for the pixel loss, Eq. 3) and the logits after global
average pooling and the linear layer (for the soft loss, Eq. 2).

Beyond the paper, any timm model (the histokd zoo: ``resnet18``, ``csat``, ...) can stand in
for the student through :class:`DistillationNet`, which returns the same pair from timm's
``forward_features`` / ``forward_head``; its BatchNorms are swapped for GroupNorms
(:func:`replace_batchnorm`), and a 1x1 convolution maps its feature map to the teacher's
channels when they differ (FitNets' regressor, Romero et al. 2015, which the paper builds on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import timm
import torch
from timm.layers import GroupNorm, GroupNormAct, create_classifier
from timm.layers.norm_act import BatchNormAct2d
from timm.models import build_model_with_cfg, register_model
from timm.models._registry import generate_default_cfgs
from timm.models.resnet import BasicBlock
from torch import nn

__all__ = [
    "DistillationNet",
    "ResolutionResNet",
    "create_resdist_model",
    "group_count",
    "replace_batchnorm",
]

# RESOLUTION_KD.md "Network": one BasicBlock per stage, widths 32-256, GroupNorm with 32 groups.
DEFAULT_WIDTHS: tuple[int, ...] = (32, 64, 128, 256)
DEFAULT_DEPTHS: tuple[int, ...] = (1, 1, 1, 1)
DEFAULT_GROUPS = 32


def group_count(channels: int, num_groups: int = DEFAULT_GROUPS) -> int:
    """The largest number of groups at most ``num_groups`` that divides ``channels``."""
    return math.gcd(channels, num_groups)


def _group_norm(num_groups: int):
    """A norm layer factory ``f(channels)`` for timm blocks: GroupNorm with fitting groups."""

    def make(channels: int, **kwargs) -> nn.Module:
        return GroupNorm(channels, num_groups=group_count(channels, num_groups), **kwargs)

    return make


class ResolutionResNet(nn.Module):
    """The teacher and student network of DiPalma et al. (Sec. 3.2, 3.5; public code's sizes).

    Args:
        num_classes: Classes of the linear layer.
        in_chans: Input channels.
        widths: Channels of each stage.
        depths: BasicBlocks per stage.
        num_groups: GroupNorm groups (fewer where a layer's channels are not a multiple).
        global_pool: timm pooling type before the linear layer (the paper: average).
        drop_rate: Dropout before the linear layer.
    """

    def __init__(
        self,
        num_classes: int = 3,
        in_chans: int = 3,
        widths: Sequence[int] = DEFAULT_WIDTHS,
        depths: Sequence[int] = DEFAULT_DEPTHS,
        num_groups: int = DEFAULT_GROUPS,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(widths) != len(depths) or not widths:
            raise ValueError(
                f"widths={tuple(widths)} and depths={tuple(depths)}: need the same, non-zero length"
            )
        norm = _group_norm(num_groups)
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        stem = widths[0]
        self.conv1 = nn.Conv2d(in_chans, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm(stem)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.feature_info = [dict(num_chs=stem, reduction=2, module="act1")]
        stages: list[nn.Module] = []
        inplanes, reduction = stem, 4
        for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = []
            for j in range(depth):
                block_stride = stride if j == 0 else 1
                downsample = None
                if block_stride != 1 or inplanes != width:
                    downsample = nn.Sequential(
                        nn.Conv2d(inplanes, width, kernel_size=1, stride=block_stride, bias=False),
                        norm(width),
                    )
                blocks.append(
                    BasicBlock(
                        inplanes, width, stride=block_stride, downsample=downsample, norm_layer=norm
                    )
                )
                inplanes = width
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = inplanes
        self.global_pool, self.fc = create_classifier(inplanes, num_classes, pool_type=global_pool)
        self.init_weights()

    def init_weights(self) -> None:
        """He initialisation (DiPalma Sec. 4.5.1; fan_out, relu as in the public code); norms 1/0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        """The linear layer."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        """A new linear layer for ``num_classes`` classes."""
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(
            self.num_features, num_classes, pool_type=global_pool
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (DiPalma Eq. 3's F_fe)."""
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pooling and the linear layer (DiPalma Eq. 2's F_class)."""
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature map, logits): the hint and the class scores (DiPalma Fig. 2)."""
        features = self.forward_features(x)
        return features, self.forward_head(features)


def replace_batchnorm(module: nn.Module, num_groups: int = DEFAULT_GROUPS) -> int:
    """Swap every BatchNorm2d for a GroupNorm in place (DiPalma Sec. 3.5).

    timm's ``BatchNormAct2d`` (norm + activation in one module) becomes a ``GroupNormAct``
    with the same activation. The GroupNorms start as identity maps with learnable scale and
    shift (weight 1, bias 0): BatchNorm statistics are not transferable to them.

    Returns:
        The number of layers replaced.
    """
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, BatchNormAct2d):
            channels = child.num_features
            replacement = GroupNormAct(
                channels,
                num_groups=group_count(channels, num_groups),
                eps=child.eps,
                affine=child.affine,
            )
            replacement.act = child.act
            replacement.drop = child.drop
            setattr(module, name, replacement)
            count += 1
        elif isinstance(child, nn.BatchNorm2d):
            channels = child.num_features
            setattr(
                module,
                name,
                GroupNorm(
                    channels,
                    num_groups=group_count(channels, num_groups),
                    eps=child.eps,
                    affine=child.affine,
                ),
            )
            count += 1
        else:
            count += replace_batchnorm(child, num_groups)
    return count


class DistillationNet(nn.Module):
    """Any timm classifier as a (feature map, logits) network (beyond the paper).

    Args:
        model: A timm model with ``forward_features`` (NCHW map) and ``forward_head``.
        hint_channels: Channels the feature map must have for the pixel loss (the teacher's);
            a 1x1 convolution maps the model's map to them when they differ.
    """

    def __init__(self, model: nn.Module, hint_channels: int | None = None) -> None:
        super().__init__()
        self.model = model
        channels = int(model.num_features)
        self.adapter: nn.Module = nn.Identity()
        if hint_channels is not None and hint_channels != channels:
            # FitNets' regressor: the student's hint layer is mapped to the teacher's width.
            self.adapter = nn.Conv2d(channels, hint_channels, kernel_size=1, bias=False)
            nn.init.kaiming_normal_(self.adapter.weight, mode="fan_out", nonlinearity="relu")

    def get_classifier(self) -> nn.Module:
        """The final (classifier) layer, the only one trained in the fine-tuning phase."""
        return self.model.get_classifier()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature map mapped to the hint channels, logits)."""
        features = self.model.forward_features(x)
        if features.dim() != 4:
            raise ValueError(
                f"{type(self.model).__name__}.forward_features gave shape {tuple(features.shape)}; need N x C x H x W"
            )
        return self.adapter(features), self.model.forward_head(features)


#: The paper's network, registered with timm.
RESDIST_ARCH = "resdist_resnet"


def create_resdist_model(
    arch: str = RESDIST_ARCH,
    num_classes: int = 3,
    *,
    hint_channels: int | None = None,
    num_groups: int = DEFAULT_GROUPS,
    group_norm: bool = True,
) -> nn.Module:
    """A network whose forward pass returns (feature map, logits).

    Args:
        arch: ``resdist_resnet`` (the paper's network) or any timm model name, e.g. one of
            ``histokd.models.BACKBONES`` (an option beyond the paper).
        num_classes: Classes.
        hint_channels: Feature-map channels the pixel loss needs (the teacher's); for a zoo
            model with other widths a 1x1 convolution is added.
        num_groups: GroupNorm groups.
        group_norm: Swap a zoo model's BatchNorms for GroupNorms (DiPalma Sec. 3.5).

    Raises:
        ValueError: ``arch`` is not a timm model.
    """
    if arch == RESDIST_ARCH:
        model = timm.create_model(RESDIST_ARCH, num_classes=num_classes, num_groups=num_groups)
        if hint_channels is not None and hint_channels != model.num_features:
            return DistillationNet(model, hint_channels)
        return model
    import histokd.models  # noqa: F401  (registers the zoo's own models with timm)

    if not timm.is_model(arch):
        raise ValueError(
            f"arch={arch!r}: not a timm model; use {RESDIST_ARCH} (the paper's) or e.g. resnet18, csat"
        )
    model = timm.create_model(arch, num_classes=num_classes, pretrained=False)
    if group_norm:
        replace_batchnorm(model, num_groups)
    return DistillationNet(model, hint_channels)


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 3,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "interpolation": "lanczos",
        "mean": (0.5, 0.5, 0.5),  # replaced by the training set's own statistics (Sec. 3.2)
        "std": (0.25, 0.25, 0.25),
        "first_conv": "conv1",
        "classifier": "fc",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({RESDIST_ARCH: _cfg()})


@register_model
def resdist_resnet(pretrained: bool = False, **kwargs) -> ResolutionResNet:
    """DiPalma et al.'s GroupNorm ResNet: 1 BasicBlock per stage, widths 32-256 (public code)."""
    return build_model_with_cfg(ResolutionResNet, RESDIST_ARCH, pretrained, **kwargs)
