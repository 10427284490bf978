"""U-Net decoder: one block per halving of the stride, skips where the backbone has a level."""

from __future__ import annotations

import pytest
import torch

from histokd.models.unet import UNetDecoder


def _features(channels: list[int], reductions: list[int], size: int = 64) -> list[torch.Tensor]:
    return [
        torch.randn(1, c, size // r, size // r) for c, r in zip(channels, reductions, strict=True)
    ]


@pytest.mark.parametrize(
    ("channels", "reductions", "skips"),
    [
        ([32, 48, 96, 176], [4, 8, 16, 32], [2, 1, 0, -1, -1]),  # CSAT, ConvNeXt: no stride-2 level
        ([64, 64, 128, 256, 512], [2, 4, 8, 16, 32], [3, 2, 1, 0, -1]),  # ResNet, EfficientNet
    ],
)
def test_blocks_and_skips(channels: list[int], reductions: list[int], skips: list[int]) -> None:
    decoder = UNetDecoder(channels, reductions, decoder_channels=(40, 30, 20, 10, 5))
    assert decoder.skip_index == skips
    out = decoder(_features(channels, reductions))
    assert out.shape == (1, 5, 64, 64)
    # the first block sees the deepest level plus the stride-16 skip
    assert decoder.blocks[0].conv1.conv.in_channels == channels[-1] + channels[-2]


def test_skip_sizes_win_over_doubling() -> None:
    # a 100-pixel input gives levels of 25, 13, 7, 4 (ceil): the decoder follows the skips
    channels, reductions = [8, 8, 8, 8], [4, 8, 16, 32]
    features = [torch.randn(1, 8, s, s) for s in (25, 13, 7, 4)]
    out = UNetDecoder(channels, reductions, (8, 8, 8, 8, 8))(features)
    assert out.shape[-2:] == (100, 100)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"decoder_channels \(64, 32\) must hold 5"):
        UNetDecoder([8, 16], [16, 32], (64, 32))
    with pytest.raises(ValueError, match="increasing powers of two"):
        UNetDecoder([8, 16], [32, 16])
    with pytest.raises(ValueError, match="increasing powers of two"):
        UNetDecoder([8, 16], [12, 24], (4, 4, 4, 4))
    with pytest.raises(ValueError, match="equal length"):
        UNetDecoder([8, 16, 32], [16, 32])
    decoder = UNetDecoder([8, 16], [16, 32])
    with pytest.raises(ValueError, match="got 1 feature levels; built for 2"):
        decoder([torch.randn(1, 16, 2, 2)])
