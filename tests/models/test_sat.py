"""SAT module: 129 parameters, RCKD Eqs. 9-11 against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from histokd.models.sat import SpatialAttentionTransformer


def test_129_parameters_whatever_the_width() -> None:
    for channels in (None, 32, 176, 512):
        module = SpatialAttentionTransformer(channels)
        assert sum(p.numel() for p in module.parameters()) == 129
    parts = {n: p.numel() for n, p in SpatialAttentionTransformer().named_parameters()}
    # ../shared/CSAT.md: conv 99, PEG 10, LN 2, QKV 3, LN 2, MLP 13
    assert parts["spatial.weight"] + parts["spatial.bias"] == 99
    assert parts["pos_embed.proj.weight"] + parts["pos_embed.proj.bias"] == 10
    assert parts["qkv.weight"] == 3
    assert sum(v for k, v in parts.items() if k.startswith("mlp.")) == 13


@pytest.mark.parametrize("shape", [(2, 32, 56, 56), (1, 176, 7, 7), (1, 8, 5, 9), (1, 3, 130, 66)])
def test_rescales_without_changing_shape(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    y = SpatialAttentionTransformer()(x)
    assert y.shape == x.shape
    ratio = y / x
    # x * sigmoid(a): every element scaled by a factor in (0, 1), the same across channels
    assert (ratio > 0).all() and (ratio < 1).all()
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-5)


def _zero(module: SpatialAttentionTransformer) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
        module.norm1.weight.fill_(1.0)
        module.norm2.weight.fill_(1.0)


def test_eq_9_to_11_on_a_constant_map() -> None:
    # Only the centre taps of the 7x7 convolution and its bias are set: with PEG, attention
    # value path and MLP at zero, the attention logit is w_avg * mean_c + w_max * max_c + b.
    module = SpatialAttentionTransformer()
    _zero(module)
    w_avg, w_max, b = 0.5, -0.25, 0.3
    with torch.no_grad():
        module.spatial.weight[0, 0, 3, 3] = w_avg
        module.spatial.weight[0, 1, 3, 3] = w_max
        module.spatial.bias.fill_(b)
    x = torch.zeros(1, 4, 14, 21)
    x[:, 0] = 1.0
    x[:, 1] = 3.0  # channel mean 1.0, channel max 3.0 everywhere
    expected = x * torch.sigmoid(torch.tensor(w_avg * 1.0 + w_max * 3.0 + b))
    assert torch.allclose(module(x), expected, atol=1e-6)


def test_attention_follows_the_pooled_grid_and_upsamples_bilinearly() -> None:
    # A 14x14 map whose left half has channel mean 2 and right half 0: adaptive pooling to 7x7
    # keeps the halves apart (columns 0-2 vs 4-6, column 3 straddles), so the attention is
    # larger on the left and the upsampled map is monotone from left to right.
    module = SpatialAttentionTransformer()
    _zero(module)
    with torch.no_grad():
        module.spatial.weight[0, 0, 3, 3] = 1.0
    x = torch.ones(1, 2, 14, 14)
    x[:, :, :, :7] = 2.0
    with torch.no_grad():
        attn = module(x) / x
    row = attn[0, 0, 5]
    assert row[0].item() == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item(), abs=1e-5)
    assert row[-1].item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=1e-5)
    assert (row[:-1] >= row[1:] - 1e-6).all()


def test_positional_encoding_and_mlp_enter_the_logit() -> None:
    # PEG centre tap 1 doubles M_S; the MLP's output bias adds a constant: 2 * M_S + 0.5
    module = SpatialAttentionTransformer()
    _zero(module)
    with torch.no_grad():
        module.spatial.bias.fill_(0.25)
        module.pos_embed.proj.weight[0, 0, 1, 1] = 1.0
        module.mlp.fc2.bias.fill_(0.5)
    x = torch.full((1, 3, 7, 7), 2.0)
    expected = x * torch.sigmoid(torch.tensor(2 * 0.25 + 0.5))
    assert torch.allclose(module(x), expected, atol=1e-6)


def test_cost_of_attention_is_independent_of_input_size() -> None:
    module = SpatialAttentionTransformer()
    small = module.attention_map(torch.randn(1, 8, 16, 16))
    large = module.attention_map(torch.randn(1, 8, 256, 256))
    assert small.shape == large.shape == (1, 1, 7, 7)


def test_gradients_reach_input_and_spatial_conv() -> None:
    module = SpatialAttentionTransformer()
    x = torch.randn(2, 16, 28, 28, requires_grad=True)
    module(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert module.spatial.weight.grad.abs().sum() > 0
    assert module.pos_embed.proj.weight.grad.abs().sum() > 0


def test_width_one_layernorm_makes_the_attention_uniform() -> None:
    # A LayerNorm over one feature outputs its bias whatever the token (../shared/CSAT.md pins
    # LN(2) in the width-1 Transformer), so Q, K and V are the same for all 49 tokens: the
    # attention and MLP add one constant, and the logits are M_S + PEG(M_S) + c.
    module = SpatialAttentionTransformer()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    tokens = torch.randn(2, 49, 1)
    assert torch.allclose(module.norm1(tokens), module.norm1.bias.expand_as(tokens))
    x = torch.randn(2, 8, 21, 21)
    pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
    m_s = module.pos_embed(module.spatial(module.pool(pooled)))
    offset = module.attention_map(x) - m_s
    assert torch.allclose(offset, offset.flatten()[0].expand_as(offset), atol=1e-5)
