"""Task models: a backbone from `create_backbone` plus a task head.

RCKD (Kim et al. 2023) Sec. 2.2: the student is pretrained as backbone + U-Net decoder on the
teacher's pseudo labels; for each downstream task the segmentation head is replaced by a new
head (Sec. 2.2.2): linear + softmax for classification, a U-Net decoder for segmentation.

Both models hold the backbone as ``.backbone`` with the same modules and keys, so
``SegmentationModel.save_backbone(path)`` writes a file that ``ClassificationModel(...,
backbone_file=path)`` or ``SegmentationModel(..., backbone_file=path)`` loads strictly.
Both take images as they come, ``B x 3 x H x W`` uint8 or floats in [0, 1], and normalise them
with their backbone's own mean and std (its timm ``pretrained_cfg``): a model owns its input
normalisation, so training, evaluation and whole-slide inference cannot disagree about it.
Both return logits; the softmax belongs in the loss and the metrics.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead
from torch import nn

from histokd.models.factory import backbone_state_dict, create_backbone, save_backbone
from histokd.models.unet import DEFAULT_DECODER_CHANNELS, UNetDecoder

__all__ = [
    "BackboneFeatures",
    "ClassificationModel",
    "InputNormalization",
    "NormalizedModel",
    "SegmentationModel",
]


class InputNormalization(nn.Module):
    """uint8 or [0, 1] images -> ``(x - mean) / std`` per channel (the memory format kept).

    ``mean`` and ``std`` are buffers outside the state dict: the model's config defines them.
    """

    def __init__(
        self,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class NormalizedModel(nn.Module):
    """A network trained on normalised inputs that takes images as they come (uint8 or [0, 1]),
    as every task model does: for networks that keep their statistics in their file."""

    def __init__(
        self, model: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None
    ) -> None:
        super().__init__()
        self.input_norm = InputNormalization(
            mean or IMAGENET_DEFAULT_MEAN, std or IMAGENET_DEFAULT_STD
        )
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.input_norm(x))


class _BackboneTaskModel(nn.Module):
    """What every task model shares: the backbone, its file and its input normalisation."""

    def __init__(
        self,
        backbone_name: str,
        num_classes: int,
        backbone_file: str | os.PathLike | None,
        **backbone_kwargs,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"{type(self).__name__}: num_classes is {num_classes}; must be >= 1")
        self.backbone_name = backbone_name
        self.num_classes = num_classes
        self.backbone = create_backbone(
            backbone_name, backbone_file=backbone_file, **backbone_kwargs
        )

    def _set_normalization(self) -> None:
        cfg = getattr(self.backbone, "pretrained_cfg", None) or {}
        self.input_norm = InputNormalization(
            cfg.get("mean", IMAGENET_DEFAULT_MEAN), cfg.get("std", IMAGENET_DEFAULT_STD)
        )

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] images -> the backbone's normalised input."""
        return self.input_norm(x)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone weights with ``timm.create_model(name)`` key names."""
        return backbone_state_dict(self.backbone)

    def save_backbone(self, path: str | os.PathLike) -> Path:
        """Write the backbone alone (no decoder or head) to ``path``; see `save_backbone`."""
        return save_backbone(self.backbone, path)


class SegmentationModel(_BackboneTaskModel):
    """Backbone + U-Net decoder + 1x1 convolution; logits at the input resolution.

    Args:
        backbone_name: One of `histokd.models.BACKBONES`.
        num_classes: Output channels (2 for RCKD's binary nuclei pseudo labels).
        decoder_channels: Widths of the decoder blocks, coarsest first.
        backbone_file: Optional backbone file to load strictly.
        **backbone_kwargs: Passed to `create_backbone` (e.g. ``drop_path_rate``).
    """

    def __init__(
        self,
        backbone_name: str,
        num_classes: int,
        decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS,
        backbone_file: str | os.PathLike | None = None,
        **backbone_kwargs,
    ) -> None:
        super().__init__(backbone_name, num_classes, backbone_file, **backbone_kwargs)
        info = self.backbone.feature_info
        self.decoder = UNetDecoder(info.channels(), info.reduction(), decoder_channels)
        self.head = nn.Conv2d(self.decoder.out_channels, num_classes, kernel_size=1)
        self._set_normalization()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel class logits, ``B x num_classes x H x W`` for ``B x 3 x H x W`` images."""
        logits = self.head(self.decoder(self.backbone(self.normalize(x))))
        if logits.shape[-2:] != x.shape[-2:]:  # input side not a multiple of the deepest stride
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits


class ClassificationModel(_BackboneTaskModel):
    """Backbone + global average pool + linear classifier (RCKD Sec. 2.2.2, Eq. 4).

    The paper's head is a linear layer and a softmax; ``forward`` returns the logits, and
    ``predict_proba`` applies the softmax.

    Args:
        backbone_name: One of `histokd.models.BACKBONES`.
        num_classes: Number of classes.
        drop_rate: Dropout before the linear layer.
        backbone_file: Optional backbone file to load strictly (e.g. written by
            ``SegmentationModel.save_backbone`` after RCKD pretraining).
        **backbone_kwargs: Passed to `create_backbone`.
    """

    def __init__(
        self,
        backbone_name: str,
        num_classes: int,
        drop_rate: float = 0.0,
        backbone_file: str | os.PathLike | None = None,
        **backbone_kwargs,
    ) -> None:
        super().__init__(backbone_name, num_classes, backbone_file, **backbone_kwargs)
        self.num_features = self.backbone.feature_info.channels()[-1]
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type="avg", drop_rate=drop_rate
        )
        self._set_normalization()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The deepest backbone feature map."""
        return self.backbone(self.normalize(x))[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, ``B x num_classes``."""
        return self.head(self.forward_features(x))

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities: the softmax of the logits (RCKD Eq. 4)."""
        return self(x).softmax(dim=-1)


class BackboneFeatures(_BackboneTaskModel):
    """A backbone as a feature extractor: images -> the global average pool of its deepest
    feature map, ``B x D``; what pretraining logs as its MLflow model.

    Args:
        backbone_name: One of `histokd.models.BACKBONES`.
        backbone_file: Backbone file to load strictly (e.g. pretraining's ``backbone.pth``).
        **backbone_kwargs: Passed to `create_backbone`.
    """

    def __init__(
        self,
        backbone_name: str,
        backbone_file: str | os.PathLike | None = None,
        **backbone_kwargs,
    ) -> None:
        super().__init__(backbone_name, 1, backbone_file, **backbone_kwargs)
        self.num_features = self.backbone.feature_info.channels()[-1]
        self._set_normalization()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features, ``B x num_features``."""
        return self.backbone(self.normalize(x))[-1].mean(dim=(2, 3))
