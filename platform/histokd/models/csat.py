"""CSAT: Convolutional neural network with Spatial Attention by Transformer.

Paper: `RCKD: Response-Based Cross-Task Knowledge Distillation for Pathological Image
Analysis` (Kim et al., Bioengineering 2023, 10, 1279), Sec. 2.3, Table 2, Fig. 4, Table 6.

A patchify stem and four stages at strides 4, 8, 16 and 32, as in EfficientFormerV2 (same
depths, widths and heads). Every stage stacks SAT blocks (a ConvNeXt-V2 block whose residual
branch ends in a SAT module, RCKD Eq. 8); stages 3 and 4 end with two Transformer blocks with
a conditional positional encoding (PEG) and global fused multi-head attention.

The paper leaves several details open; ../shared/CSAT.md pins them so that the model has
exactly the paper's parameter counts (Table 6: 3,065,078 with SAT modules, 3,063,272 without,
1000-class head) and 1.08 GMAC at 384x384 under THOP counting. Each stage's output is taken
before the next down-sampling layer (ConvNeXt's convention), so stage ``i`` is at stride
``4 * 2**i``.

Variants, registered with timm under a ``histokd_`` prefix (timm has an unrelated ``csatv2``):
``histokd_csat`` (with SAT modules) and ``histokd_csat_nosat`` (the ablation of RCKD Table 6).
histokd's own jobs call them ``csat`` and ``csat_nosat`` (`histokd.models.factory`).

Speed (issue 14, item 8): SAT blocks fold the GRN into the linear layer after it
(`FusedGrnMlp`) and add ``x * attention`` to the shortcut in one pass. Parameters, state-dict
keys and MAC counts are unchanged; ``tests/models/test_csat_speed.py`` checks the model
against a plain transcription of the paper's formulas.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import (
    DropPath,
    GlobalResponseNormMlp,
    LayerNorm,
    LayerNorm2d,
    Mlp,
    NormMlpClassifierHead,
    calculate_drop_path_rates,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, checkpoint_seq
from timm.models._features import feature_take_indices
from timm.models._registry import generate_default_cfgs, register_model
from torch import nn

from histokd.models.peg import PositionalEncodingGenerator
from histokd.models.sat import SpatialAttentionTransformer
from histokd.models.timm_weights import keep_head_init, rckd_cfg

__all__ = ["Csat", "SatBlock", "TransformerBlock", "GlobalAttention", "FusedGrnMlp"]

# RCKD Table 2: channels D, SAT blocks L and Transformer blocks per stage.
CSAT_DIMS = (32, 48, 96, 176)
CSAT_DEPTHS = (2, 2, 6, 4)
CSAT_NUM_VIT = (0, 0, 2, 2)


class GlobalAttention(nn.Module):
    """Multi-head self-attention over all tokens, with fused scaled dot-product attention.

    Q, K and V have no bias; the output projection has one (../shared/CSAT.md). The inner width
    is ``num_heads * head_dim`` whatever ``dim`` is, as in EfficientFormerV2.

    Args:
        dim: Token width.
        num_heads: Number of attention heads.
        head_dim: Width of each head.
        attn_drop: Dropout on the attention weights (training only).
        proj_drop: Dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        head_dim: int = 32,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, inner * 3, bias=False, **dd)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(inner, dim, bias=True, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over the ``N`` tokens of ``x`` (``B x N x dim``)."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0
        )
        x = x.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(x))


class TransformerBlock(nn.Module):
    """``x + PEG``; ``x + MHSA(LN(x))``; ``x + MLP(LN(x))`` on an NCHW map (8D^2 + 1044D params).

    Args:
        dim: Channels D.
        num_heads: Attention heads.
        head_dim: Width of each head.
        mlp_ratio: MLP expansion.
        drop_path: Stochastic depth rate.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        head_dim: int = 32,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.pos_embed = PositionalEncodingGenerator(dim, **dd)
        self.norm1 = LayerNorm(dim, eps=norm_eps, **dd)
        self.attn = GlobalAttention(dim, num_heads=num_heads, head_dim=head_dim, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=norm_eps, **dd)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the block on ``x`` (NCHW)."""
        x = self.pos_embed(x)
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.transpose(1, 2).reshape(b, c, h, w)


def _hooked(*modules: nn.Module) -> bool:
    """Whether a hook watches any of ``modules`` (or every module).

    A fused path computes what some modules would without calling them, so their hooks would
    not fire: THOP counts RCKD's MACs with forward hooks on leaf modules, and feature hooks
    read module outputs. The fused paths run only where nothing watches.
    """
    if torch.nn.modules.module._has_any_global_hook():
        return True
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        for m in modules
    )


def _spatial_norm(x: torch.Tensor, dtype: torch.dtype, rows: int = 1024) -> torch.Tensor:
    """L2 norm over dim 1 of ``B x N x K``, in ``dtype``, summed over blocks of ``rows`` pixels.

    About six times faster on CPU than ``torch.linalg.vector_norm(x, dim=1)`` (stage 1 of a
    batch of four 512 px images, one thread), whose reduction over a non-innermost dim is slow
    there; each block's squares stay in cache.
    """
    if x.device.type != "cpu":
        return torch.linalg.vector_norm(x, dim=1, dtype=dtype)
    total = None
    for block in x.split(rows, dim=1):
        squares = block.to(dtype).square().sum(dim=1)
        total = squares if total is None else total.add_(squares)
    return total.sqrt()


class _GrnLinear(torch.autograd.Function):
    """``Linear(GRN(x))`` on an NHWC map as one batched matrix product, hand-written backward.

    GRN (ConvNeXt-V2 Eqs. 1-3) is ``x * (1 + gamma * N(x)) + beta`` with ``N(x)`` one factor per
    image and channel, ``N = ||x||_HW / (mean_C ||x||_HW + eps)``. The factor moves into the
    weight of the linear layer that follows, ``W_b = W^T * (1 + gamma * N_b)`` per image ``b``,
    and ``beta`` into its bias, ``b + W beta``. The GRN then costs one reduction over the
    4x-expanded tensor instead of a reduction and three element-wise passes, and its backward
    one element-wise pass besides the products, where autograd of timm's ``GlobalResponseNorm``
    makes several (that backward was the largest element-wise cost in CSAT's CPU profile).

    Inputs: ``x`` (``B x H x W x K``), GRN ``gamma`` and ``beta`` (``K``), linear ``weight``
    (``D x K``) and ``bias`` (``D``), ``eps``. The per-image statistics are kept in float32 (or
    float64); the big products run in ``x``'s dtype (bf16 under autocast, as the linear layer
    would).
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        grn_weight: torch.Tensor,
        grn_bias: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        eps: float,
    ) -> torch.Tensor:
        batch, k = x.shape[0], x.shape[-1]
        acc = torch.promote_types(x.dtype, torch.float32)  # dtype of the statistics
        x_flat = x.reshape(batch, -1, k)  # B x HW x K
        norm = _spatial_norm(x_flat, acc)  # B x K
        denom = norm.mean(dim=-1, keepdim=True) + eps
        scale = torch.addcmul(torch.ones_like(norm), norm / denom, grn_weight.to(acc))
        weight_t = weight.to(acc).t()  # K x D
        weight_b = (weight_t.unsqueeze(0) * scale.unsqueeze(-1)).to(x.dtype)  # B x K x D
        bias_eff = torch.addmv(bias.to(acc), weight.to(acc), grn_bias.to(acc))
        out = torch.baddbmm(bias_eff.to(x.dtype), x_flat, weight_b)
        ctx.save_for_backward(x_flat, grn_weight, grn_bias, weight, norm, denom, scale, weight_b)
        ctx.x_shape = x.shape
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_flat, grn_weight, grn_bias, weight, norm, denom, scale, weight_b = ctx.saved_tensors
        batch, pixels, k = x_flat.shape
        acc = norm.dtype
        grad_flat = grad_out.reshape(batch, pixels, -1).to(x_flat.dtype)
        grad_weight_b = torch.bmm(x_flat.transpose(1, 2), grad_flat).to(acc)  # B x K x D
        grad_bias = grad_flat.sum(dim=(0, 1), dtype=acc)
        weight_t = weight.to(acc).t()
        grad_scale = (grad_weight_b * weight_t.unsqueeze(0)).sum(dim=-1)  # B x K
        grad_weight = torch.einsum("bkd,bk->dk", grad_weight_b, scale)
        grad_weight = grad_weight + torch.outer(grad_bias, grn_bias.to(acc))
        grad_grn_bias = weight_t @ grad_bias
        grad_grn_weight = (grad_scale * (norm / denom)).sum(dim=0)
        # through N = norm / (mean_K(norm) + eps) to the norms
        grad_n = grad_scale * grn_weight.to(acc)
        grad_norm = grad_n / denom - (grad_n * norm).sum(dim=-1, keepdim=True) / (denom * denom * k)
        # d||x|| / dx = x / ||x||; an all-zero channel gets none, as in autograd of vector_norm
        coef = torch.where(norm > 0, grad_norm / norm.clamp_min(1e-30), 0.0)
        grad_x = torch.bmm(grad_flat, weight_b.transpose(1, 2))
        grad_x.addcmul_(x_flat, coef.unsqueeze(1).to(x_flat.dtype))
        return (
            grad_x.reshape(ctx.x_shape),
            grad_grn_weight.to(grn_weight.dtype),
            grad_grn_bias.to(grn_bias.dtype),
            grad_weight.to(weight.dtype),
            grad_bias.to(weight.dtype),
            None,
        )


class FusedGrnMlp(GlobalResponseNormMlp):
    """timm's ``GlobalResponseNormMlp`` (NHWC, linear layers) with the GRN fused into ``fc2``.

    Same parameters and state-dict keys as the timm module; the output equals it within float
    rounding. Falls back to the timm forward pass where the fusion does not apply (1x1
    convolutions, no ``fc2`` bias, active dropout) and where a hook watches the GRN, ``fc2`` or
    the dropouts (THOP's MAC count, for one).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``fc2(GRN(GELU(fc1(x))))`` on NHWC ``x``."""
        dropout = self.training and (self.drop1.p > 0 or self.drop2.p > 0)
        if (
            not isinstance(self.fc2, nn.Linear)
            or self.fc2.bias is None
            or dropout
            or _hooked(self.drop1, self.grn, self.fc2, self.drop2)
        ):
            return super().forward(x)
        x = self.act(self.fc1(x))
        # _GrnLinear chooses its own dtypes (float32 statistics, products in x's dtype)
        with torch.autocast(x.device.type, enabled=False):
            return _GrnLinear.apply(
                x, self.grn.weight, self.grn.bias, self.fc2.weight, self.fc2.bias, self.grn.eps
            )


class SatBlock(nn.Module):
    """SAT block, RCKD Eq. 8: ``x + SAT(Linear(GRN(GELU(Linear(LN(DWConv7x7(x)))))))``.

    A ConvNeXt-V2 block (expansion 4, GRN, no layer scale) with the SAT module at the end of
    the residual branch: 8D^2 + 65D parameters, plus 129 for the SAT module.

    Args:
        dim: Channels D.
        mlp_ratio: Expansion of the pointwise MLP.
        kernel_size: Depthwise convolution kernel.
        use_sat: Whether the SAT module is present (RCKD Table 6 ablation).
        drop_path: Stochastic depth rate.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 4.0,
        kernel_size: int = 7,
        use_sat: bool = True,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv_dw = nn.Conv2d(
            dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=True, **dd
        )
        self.norm = LayerNorm(dim, eps=norm_eps, **dd)
        self.mlp = FusedGrnMlp(dim, int(mlp_ratio * dim), act_layer=nn.GELU, use_conv=False, **dd)
        self.sat_module = SpatialAttentionTransformer(dim, **dd) if use_sat else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the block on ``x`` (NCHW)."""
        shortcut = x
        x = self.conv_dw(x)
        x = x.permute(0, 2, 3, 1)  # channels-last for LayerNorm and the pointwise MLP
        x = self.mlp(self.norm(x))
        x = x.permute(0, 3, 1, 2)
        no_drop_path = isinstance(self.drop_path, nn.Identity) or not self.training
        sat = self.sat_module
        if isinstance(sat, SpatialAttentionTransformer) and no_drop_path and not _hooked(sat):
            # shortcut + x * attention in one pass (RCKD Eqs. 8 and 11)
            return torch.addcmul(shortcut, x, sat.attention(x))
        x = self.sat_module(x)
        return shortcut + self.drop_path(x)


class CsatStage(nn.Module):
    """Optional down-sampling (LayerNorm, Conv 2x2 stride 2), SAT blocks, Transformer blocks.

    Args:
        in_chs: Input channels.
        out_chs: Output channels D.
        depth: Number of SAT blocks.
        num_vit: Number of Transformer blocks after them.
        downsample: Whether the stage starts by halving the resolution.
        use_sat: Whether the SAT blocks carry SAT modules.
        num_heads: Attention heads of the Transformer blocks.
        head_dim: Width of each head.
        mlp_ratio: Expansion of all MLPs.
        drop_path_rates: Stochastic depth rate per block (SAT blocks first).
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        depth: int,
        num_vit: int = 0,
        downsample: bool = True,
        use_sat: bool = True,
        num_heads: int = 8,
        head_dim: int = 32,
        mlp_ratio: float = 4.0,
        drop_path_rates: list[float] | None = None,
        norm_eps: float = 1e-6,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grad_checkpointing = False
        if downsample:
            self.downsample = nn.Sequential(
                LayerNorm2d(in_chs, eps=norm_eps, **dd),
                nn.Conv2d(in_chs, out_chs, kernel_size=2, stride=2, bias=True, **dd),
            )
        else:
            if in_chs != out_chs:
                raise ValueError(
                    f"CsatStage: in_chs ({in_chs}) must equal out_chs ({out_chs}) without downsample"
                )
            self.downsample = nn.Identity()
        rates = drop_path_rates or [0.0] * (depth + num_vit)
        blocks: list[nn.Module] = [
            SatBlock(
                out_chs, mlp_ratio, use_sat=use_sat, drop_path=rates[i], norm_eps=norm_eps, **dd
            )
            for i in range(depth)
        ]
        blocks += [
            TransformerBlock(
                out_chs,
                num_heads=num_heads,
                head_dim=head_dim,
                mlp_ratio=mlp_ratio,
                drop_path=rates[depth + i],
                norm_eps=norm_eps,
                **dd,
            )
            for i in range(num_vit)
        ]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the stage on ``x`` (NCHW)."""
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class Csat(nn.Module):
    """CSAT (RCKD Sec. 2.3, Table 2).

    Args:
        in_chans: Input image channels.
        num_classes: Classes of the ImageNet-style head (0 for no classifier).
        global_pool: Global pooling type of the head.
        dims: Channels per stage (RCKD Table 2: 32, 48, 96, 176).
        depths: SAT blocks per stage (RCKD Table 2: 2, 2, 6, 4).
        num_vit: Transformer blocks at the end of each stage (RCKD Table 2: 0, 0, 2, 2).
        use_sat: Whether SAT blocks carry SAT modules (RCKD Table 6 ablation).
        num_heads: Attention heads (EfficientFormerV2-S0: 8).
        head_dim: Width of each head (EfficientFormerV2-S0: 32).
        mlp_ratio: Expansion of all MLPs (ConvNeXt-V2: 4).
        patch_size: Stem patch size (stride 4).
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth rate of the last block (linear from 0).
        norm_eps: LayerNorm epsilon (ConvNeXt-V2: 1e-6).
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        dims: tuple[int, ...] = CSAT_DIMS,
        depths: tuple[int, ...] = CSAT_DEPTHS,
        num_vit: tuple[int, ...] = CSAT_NUM_VIT,
        use_sat: bool = True,
        num_heads: int = 8,
        head_dim: int = 32,
        mlp_ratio: float = 4.0,
        patch_size: int = 4,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if not len(dims) == len(depths) == len(num_vit):
            raise ValueError(
                f"Csat: dims {dims}, depths {depths} and num_vit {num_vit} must have one entry per stage"
            )
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.feature_info: list[dict] = []

        self.stem = nn.Sequential(
            nn.Conv2d(
                in_chans, dims[0], kernel_size=patch_size, stride=patch_size, bias=True, **dd
            ),
            LayerNorm2d(dims[0], eps=norm_eps, **dd),
        )
        rates = calculate_drop_path_rates(
            drop_path_rate, [d + v for d, v in zip(depths, num_vit, strict=True)], stagewise=True
        )
        stages = []
        prev_chs = dims[0]
        stride = patch_size
        for i, (dim, depth, vit) in enumerate(zip(dims, depths, num_vit, strict=True)):
            if i > 0:
                stride *= 2
            stages.append(
                CsatStage(
                    prev_chs,
                    dim,
                    depth=depth,
                    num_vit=vit,
                    downsample=i > 0,
                    use_sat=use_sat,
                    num_heads=num_heads,
                    head_dim=head_dim,
                    mlp_ratio=mlp_ratio,
                    drop_path_rates=rates[i],
                    norm_eps=norm_eps,
                    **dd,
                )
            )
            prev_chs = dim
            self.feature_info.append(dict(num_chs=dim, reduction=stride, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = prev_chs

        # ../shared/CSAT.md: global average pool, LayerNorm(176), Linear(176, classes)
        self.head = NormMlpClassifierHead(
            self.num_features,
            num_classes,
            pool_type=global_pool,
            drop_rate=drop_rate,
            norm_layer=partial(LayerNorm2d, eps=norm_eps),
            **dd,
        )
        self.apply(_init_weights)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Regex groups of parameters, for layer-wise learning-rate decay."""
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Enable or disable gradient checkpointing in every stage."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final linear classifier."""
        return self.head.fc

    def reset_classifier(
        self, num_classes: int, global_pool: str | None = None, reset_other: bool = False
    ) -> None:
        """Replace the classifier with one for ``num_classes`` classes (0 removes it)."""
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, reset_other=reset_other)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward pass that also returns the outputs of the selected stages.

        Args:
            x: Input images, NCHW.
            indices: Stage indices to return (last n if an int, all if None).
            norm: Unused: CSAT has no norm between the stages and the head.
            stop_early: Stop after the last selected stage.
            output_fmt: Layout of the returned features; only NCHW.
            intermediates_only: Return only the stage outputs.

        Returns:
            The stage outputs, or the final features and the stage outputs.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"Csat.forward_intermediates: output_fmt {output_fmt!r}; only 'NCHW'")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        x = self.stem(x)
        stages = (
            self.stages
            if torch.jit.is_scripting() or not stop_early
            else self.stages[: max_index + 1]
        )
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages after the last selected one and, optionally, the head.

        Returns:
            The absolute indices of the stages kept as outputs.
        """
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.head.reset(0, "", reset_other=True, in_features=self.num_features)
            self.num_classes = 0
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and stages: the stride-32 feature map."""
        x = self.stem(x)
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, LayerNorm and classifier."""
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for images ``x`` (NCHW)."""
        return self.forward_head(self.forward_features(x))


def _init_weights(module: nn.Module) -> None:
    """Truncated-normal weights and zero biases for convolutions and linear layers (ConvNeXt)."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _create_csat(variant: str, pretrained: bool = False, **kwargs) -> Csat:
    return build_model_with_cfg(
        Csat,
        variant,
        pretrained,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        pretrained_filter_fn=partial(keep_head_init, head_prefix="head."),  # backbone files
        **kwargs,
    )


_CFG = rckd_cfg(
    "stem.0", "head.fc", paper_ids="doi:10.3390/bioengineering10111279",
    paper_name="RCKD: Response-Based Cross-Task Knowledge Distillation for Pathological Image Analysis",
)  # fmt: skip


# No public weights: load a histokd backbone file with pretrained_cfg_overlay=dict(file=...).
default_cfgs = generate_default_cfgs(
    {
        "histokd_csat": _CFG,
        "histokd_csat_nosat": dict(_CFG),
    }
)


@register_model
def histokd_csat(pretrained: bool = False, **kwargs) -> Csat:
    """CSAT with SAT modules: 3,065,078 parameters with a 1000-class head (RCKD Table 6)."""
    model_args: dict[str, object] = dict(use_sat=True)
    return _create_csat("histokd_csat", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def histokd_csat_nosat(pretrained: bool = False, **kwargs) -> Csat:
    """CSAT without SAT modules: 3,063,272 parameters with a 1000-class head (RCKD Table 6)."""
    model_args: dict[str, object] = dict(use_sat=False)
    return _create_csat("histokd_csat_nosat", pretrained=pretrained, **dict(model_args, **kwargs))
