"""CSAT's fast path (issue 14, item 8) computes what the plain transcription of the paper does.

`reference_forward` below is CSAT as it was before the speed work, written out with plain
``torch.nn.functional`` calls on the model's own parameters: timm's GlobalResponseNorm formula,
an explicit ``softmax(QK^T / sqrt(d)) V`` for every attention, ``shortcut + SAT(x)``. The model
must match it (features, logits and every gradient) in fp32 on random weights, GRN included
(its gamma and beta start at zero, which would hide a wrong GRN).
"""

from __future__ import annotations

from collections import Counter

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import GlobalResponseNormMlp

from histokd.models.csat import Csat, FusedGrnMlp, SatBlock, TransformerBlock
from histokd.models.profile import macs_full, macs_paper
from histokd.models.sat import SpatialAttentionTransformer

ATOL, RTOL = 1e-5, 1e-4  # fp32


def _layer_norm_2d(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    x = F.layer_norm(x.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return x.permute(0, 3, 1, 2)


def _layer_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _peg(x: torch.Tensor, peg: torch.nn.Module) -> torch.Tensor:
    return x + F.conv2d(x, peg.proj.weight, peg.proj.bias, padding=1, groups=x.shape[1])


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    return scores.softmax(dim=-1) @ v


def _mlp(x: torch.Tensor, mlp: torch.nn.Module) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)


def _grn_mlp(x: torch.Tensor, mlp: torch.nn.Module) -> torch.Tensor:
    """timm 1.0's GlobalResponseNormMlp (NHWC): fc1, GELU, GRN, fc2."""
    x = F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias))
    x_g = x.norm(p=2, dim=(1, 2), keepdim=True)
    x_n = x_g / (x_g.mean(dim=-1, keepdim=True) + mlp.grn.eps)
    x = x + torch.addcmul(mlp.grn.bias, mlp.grn.weight, x * x_n)
    return F.linear(x, mlp.fc2.weight, mlp.fc2.bias)


def _sat(x: torch.Tensor, sat: SpatialAttentionTransformer) -> torch.Tensor:
    """RCKD Eqs. 9-11 as sat.py wrote them before the speed work."""
    pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
    m_s = F.conv2d(
        F.adaptive_avg_pool2d(pooled, 7), sat.spatial.weight, sat.spatial.bias, padding=3
    )
    m_s = _peg(m_s, sat.pos_embed)
    b, _, h, w = m_s.shape
    tokens = m_s.flatten(2).transpose(1, 2)
    q, k, v = F.linear(_layer_norm(tokens, sat.norm1), sat.qkv.weight).chunk(3, dim=-1)
    tokens = tokens + _softmax_attention(q, k, v)
    tokens = tokens + _mlp(_layer_norm(tokens, sat.norm2), sat.mlp)
    attn = tokens.transpose(1, 2).reshape(b, 1, h, w)
    attn = F.interpolate(attn, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return x * attn.sigmoid()


def _sat_block(x: torch.Tensor, block: SatBlock) -> torch.Tensor:
    y = F.conv2d(x, block.conv_dw.weight, block.conv_dw.bias, padding=3, groups=x.shape[1])
    y = _grn_mlp(_layer_norm(y.permute(0, 2, 3, 1), block.norm), block.mlp).permute(0, 3, 1, 2)
    if isinstance(block.sat_module, SpatialAttentionTransformer):
        y = _sat(y, block.sat_module)
    return x + y


def _transformer_block(x: torch.Tensor, block: TransformerBlock) -> torch.Tensor:
    x = _peg(x, block.pos_embed)
    b, c, h, w = x.shape
    tokens = x.flatten(2).transpose(1, 2)
    attn = block.attn
    qkv = F.linear(_layer_norm(tokens, block.norm1), attn.qkv.weight)
    q, k, v = qkv.reshape(b, h * w, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    heads = _softmax_attention(q, k, v).transpose(1, 2).reshape(b, h * w, -1)
    tokens = tokens + F.linear(heads, attn.proj.weight, attn.proj.bias)
    tokens = tokens + _mlp(_layer_norm(tokens, block.norm2), block.mlp)
    return tokens.transpose(1, 2).reshape(b, c, h, w)


def reference_forward(model: Csat, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stride-32 features and logits of ``model``, computed the plain way."""
    stem_conv, stem_norm = model.stem
    x = _layer_norm_2d(F.conv2d(x, stem_conv.weight, stem_conv.bias, stride=4), stem_norm)
    for stage in model.stages:
        if not isinstance(stage.downsample, torch.nn.Identity):
            norm, conv = stage.downsample
            x = F.conv2d(_layer_norm_2d(x, norm), conv.weight, conv.bias, stride=2)
        for block in stage.blocks:
            x = (
                _sat_block(x, block)
                if isinstance(block, SatBlock)
                else _transformer_block(x, block)
            )
    head = model.head
    pooled = _layer_norm(x.mean(dim=(2, 3)), head.norm)
    return x, F.linear(pooled, head.fc.weight, head.fc.bias)


def _randomize(model: torch.nn.Module) -> None:
    """Random weights everywhere, GRN gamma and beta included (they start at zero)."""
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    # absolute tolerance relative to the tensor's largest value: fp32 rounding grows with it
    scale = max(expected.abs().max().item(), 1e-12)
    torch.testing.assert_close(
        actual, expected, atol=ATOL * scale, rtol=RTOL, msg=lambda m: f"{name}: {m}"
    )


def _backward_nodes(tensor: torch.Tensor) -> Counter:
    """How often each autograd node type occurs in the graph that produced ``tensor``."""
    counts, seen, stack = Counter(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        counts[type(node).__name__] += 1
        stack.extend(next_node for next_node, _ in node.next_functions)
    return counts


def _model(name: str) -> Csat:
    model = timm.create_model(name, num_classes=5, drop_path_rate=0.0)
    _randomize(model)
    return model


# 160 x 128 px: stage 1 has 1,280 pixels per image, more than one block of the GRN norm
INPUT_SHAPE = (2, 3, 160, 128)


@pytest.mark.parametrize("name", ["histokd_csat", "histokd_csat_nosat"])
@pytest.mark.parametrize("train", [False, True])
def test_forward_matches_the_plain_transcription_fp32(name: str, train: bool) -> None:
    model = _model(name).train(train)
    x = torch.randn(INPUT_SHAPE)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model.forward_head(features)
        ref_features, ref_logits = reference_forward(model, x)
        assert torch.equal(model(x), logits)
    assert features.shape == ref_features.shape == (2, 176, 5, 4)
    assert 0.1 < ref_logits.abs().max() < 1e3  # weights that matter, nothing exploded
    _assert_close(features, ref_features, "features")  # |features| reaches ~20 here
    _assert_close(logits, ref_logits, "logits")


@pytest.mark.parametrize("name", ["histokd_csat", "histokd_csat_nosat"])
def test_gradients_match_the_plain_transcription_float64(name: str) -> None:
    # float64, so that the hand-written GRN backward is checked far below fp32 rounding
    model = _model(name).double().train()
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64, requires_grad=True)
    logits = model(x)
    _, ref_logits = reference_forward(model, x)
    # the fast paths ran: the fused GRN + fc2 in all 14 SAT blocks, addcmul for the SAT residual
    nodes = _backward_nodes(logits)
    assert nodes["_GrnLinearBackward"] == 14
    assert nodes["AddcmulBackward0"] == (14 if name == "histokd_csat" else 0)
    torch.testing.assert_close(logits, ref_logits, atol=1e-12, rtol=1e-10)
    weights = torch.randn(logits.shape, dtype=torch.float64)
    params = [x, *model.parameters()]
    grads = torch.autograd.grad((logits * weights).sum(), params)
    ref_grads = torch.autograd.grad((ref_logits * weights).sum(), params)
    names = ["input", *(n for n, _ in model.named_parameters())]
    largest = max(g.abs().max().item() for g in ref_grads)
    for param_name, grad, ref_grad in zip(names, grads, ref_grads, strict=True):
        if param_name.endswith(("sat_module.norm1.weight", "sat_module.norm2.weight")):
            # a LayerNorm over one feature passes no gradient to its weight (sat.py's note):
            # both sides hold rounding noise only
            assert grad.abs().max() < 1e-12 * largest and ref_grad.abs().max() < 1e-12 * largest
            continue
        scale = ref_grad.abs().max().item()
        assert scale > 0, param_name
        torch.testing.assert_close(
            grad, ref_grad, atol=1e-9 * scale, rtol=1e-9, msg=lambda m, n=param_name: f"{n}: {m}"
        )


def test_fused_grn_mlp_is_timms_module() -> None:
    fused = FusedGrnMlp(24, 96, use_conv=False)
    plain = GlobalResponseNormMlp(24, 96, use_conv=False)
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in plain.parameters())
    _randomize(fused)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(3, 40, 32, 24)  # 1,280 pixels: two blocks of the GRN norm
    x[1] = -10.0  # GELU(-10) rounds to zero in fp32: an image whose GRN norms are all zero
    _assert_close(fused(x), plain(x), "output")
    grad_out = torch.randn(3, 40, 32, 24)
    for (n, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
        (g,) = torch.autograd.grad(fused(x), p, grad_out)
        (ref,) = torch.autograd.grad(plain(x), q, grad_out)
        _assert_close(g, ref, n)


def test_fused_grn_mlp_gradcheck_float64() -> None:
    mlp = FusedGrnMlp(5, 12, use_conv=False).double()
    _randomize(mlp)
    names = [n for n, _ in mlp.named_parameters()]
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    x[0, :, :, 2] = 0.0  # a channel whose input is zero everywhere in one image

    def run(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(mlp, dict(zip(names, params, strict=True)), (x,))

    inputs = (x.requires_grad_(), *(p.detach().requires_grad_() for p in mlp.parameters()))
    assert torch.autograd.gradcheck(run, inputs)


def test_fused_grn_mlp_under_bf16_autocast() -> None:
    fused = FusedGrnMlp(32, 128, use_conv=False)
    _randomize(fused)
    plain = GlobalResponseNormMlp(32, 128, use_conv=False)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 8, 8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = fused(x), plain(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=0.05, rtol=0.05)
    out.float().square().sum().backward()
    assert all(
        p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in fused.parameters()
    )


def test_dropout_and_drop_path_fall_back_to_the_plain_path() -> None:
    # active dropout or stochastic depth: the same random draws as the timm forward pass
    fused = FusedGrnMlp(8, 32, use_conv=False, drop=0.5).train()
    plain = GlobalResponseNormMlp(8, 32, use_conv=False, drop=0.5).train()
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 5, 5, 8)
    torch.manual_seed(7)
    out = fused(x)
    torch.manual_seed(7)
    assert torch.equal(out, plain(x))

    block = SatBlock(16, drop_path=0.5).train()
    x = torch.randn(4, 16, 8, 8)
    torch.manual_seed(3)
    out = block(x)
    torch.manual_seed(3)
    branch = block.mlp(block.norm(block.conv_dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
    expected = x + block.drop_path(block.sat_module(branch))
    torch.testing.assert_close(out, expected)


def test_mac_counts_are_unchanged() -> None:
    # the counts of csat.py before the speed work, at 224 px: THOP's (RCKD's) and flop_counter's
    model = timm.create_model("histokd_csat")
    assert macs_paper(model, 224) == 366_189_240
    assert macs_full(model, 224) == 404_857_200


def test_hooks_on_fused_modules_still_fire() -> None:
    # with a hook on fc2 or on the SAT module, the block calls them; the output is the same
    block = SatBlock(16).eval()
    _randomize(block)
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        fused = block(x)
        seen = []
        handles = [
            m.register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
            for m in (block.mlp.fc2, block.sat_module)
        ]
        hooked = block(x)
        for handle in handles:
            handle.remove()
    assert seen == ["Linear", "SpatialAttentionTransformer"]
    _assert_close(hooked, fused, "output")
