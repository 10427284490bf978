"""U-Net decoder for any multi-scale backbone.

Paper: `U-Net: Convolutional Networks for Biomedical Image Segmentation` (Ronneberger et al.,
MICCAI 2015). RCKD (Kim et al. 2023) Sec. 2.2.1 pretrains the backbone with a U-Net decoder as
segmentation head, and Sec. 2.2.2 builds the fine-tuning segmentation heads the same way.

Starting from the deepest feature map, each decoder block doubles the resolution, concatenates
the backbone feature at that stride when there is one (skip connection), and applies two 3x3
convolutions with batch norm and ReLU. There is one block per factor of two between the
deepest stride and the input, so the decoder ends at full resolution whether the backbone's
finest level is at stride 2 (ResNet, EfficientNet) or 4 (CSAT, ConvNeXt).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct
from torch import nn

__all__ = ["DEFAULT_DECODER_CHANNELS", "DecoderBlock", "UNetDecoder"]

#: Output channels of the decoder blocks from stride 16 down to stride 1. One width for every
#: backbone, so a benchmark compares backbones, not decoders; about half of the common U-Net
#: (256, 128, 64, 32, 16), to suit 3-4 M-parameter backbones.
DEFAULT_DECODER_CHANNELS: tuple[int, ...] = (128, 64, 32, 16, 16)


class DecoderBlock(nn.Module):
    """Upsample, concatenate the skip feature (if any), two 3x3 conv + BN + ReLU.

    Args:
        in_chs: Channels of the incoming (coarser) map.
        skip_chs: Channels of the skip feature (0 when there is none).
        out_chs: Output channels.
    """

    def __init__(self, in_chs: int, skip_chs: int, out_chs: int) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(in_chs + skip_chs, out_chs, kernel_size=3)
        self.conv2 = ConvNormAct(out_chs, out_chs, kernel_size=3)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """Decode ``x`` to twice its resolution, or to the resolution of ``skip``."""
        if skip is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class UNetDecoder(nn.Module):
    """U-Net decoder over the feature levels of a backbone.

    Args:
        encoder_channels: Channels of each backbone level, finest first
            (``backbone.feature_info.channels()``).
        encoder_reductions: Stride of each level, finest first, powers of two
            (``backbone.feature_info.reduction()``).
        decoder_channels: Output channels of each decoder block, coarsest first; one block per
            halving of the stride from the deepest level down to 1 (5 for stride 32).
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        encoder_reductions: Sequence[int],
        decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS,
    ) -> None:
        super().__init__()
        channels, reductions = list(encoder_channels), list(encoder_reductions)
        if not channels or len(channels) != len(reductions):
            raise ValueError(
                f"UNetDecoder: encoder_channels {channels} and encoder_reductions {reductions} "
                "must be non-empty and of equal length"
            )
        if any(r < 1 or r & (r - 1) for r in reductions) or reductions != sorted(set(reductions)):
            raise ValueError(
                f"UNetDecoder: encoder_reductions {reductions} must be increasing powers of two"
            )
        num_blocks = reductions[-1].bit_length() - 1
        if len(decoder_channels) != num_blocks or min(decoder_channels, default=1) < 1:
            raise ValueError(
                f"UNetDecoder: decoder_channels {tuple(decoder_channels)} must hold {num_blocks} "
                f"positive widths, one per halving of the deepest stride {reductions[-1]} down to 1"
            )
        self.encoder_reductions = tuple(reductions)
        self.out_channels = decoder_channels[-1]
        # index of the backbone level that each block takes as skip (-1: none)
        self.skip_index: list[int] = []
        blocks = []
        in_chs = channels[-1]
        for i, out_chs in enumerate(decoder_channels):
            stride = reductions[-1] >> (i + 1)
            skip = reductions.index(stride) if stride in reductions else -1
            self.skip_index.append(skip)
            blocks.append(DecoderBlock(in_chs, channels[skip] if skip >= 0 else 0, out_chs))
            in_chs = out_chs
        self.blocks = nn.ModuleList(blocks)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Decode the backbone's levels (finest first) to a stride-1 map."""
        if len(features) != len(self.encoder_reductions):
            raise ValueError(
                f"UNetDecoder: got {len(features)} feature levels; built for "
                f"{len(self.encoder_reductions)} (strides {self.encoder_reductions})"
            )
        x = features[-1]
        for block, skip in zip(self.blocks, self.skip_index, strict=True):
            x = block(x, features[skip] if skip >= 0 else None)
        return x
