"""Spatial Attention by Transformer (SAT) module.

Paper: `RCKD: Response-Based Cross-Task Knowledge Distillation for Pathological Image
Analysis` (Kim et al., Bioengineering 2023, 10, 1279), Sec. 2.3.3, Eqs. 9-11.

The module estimates a spatial attention map from the global context at a fixed 7x7
resolution and rescales the feature map with it:

1. channel mean-pool and channel max-pool, concatenated: 2 x H x W (as CBAM, Woo et al.);
2. adaptive average pooling to 7 x 7 and a 7x7 convolution, 2 -> 1 channel: M_S (Eq. 9);
3. a Transformer layer of width 1 over the 49 tokens: PEG, LayerNorm, one attention head
   without output projection, LayerNorm, MLP 1 -> 4 -> 1 (Eq. 10);
4. bilinear upsampling to H x W, a sigmoid, and ``x * attention`` (Eq. 11).

129 parameters whatever the width of ``x`` (../shared/CSAT.md): 14 of them in CSAT make the
paper's "+1.8 K". Because the pooling is adaptive, the cost of steps 2-3 does not grow with
the input size.

Note: a LayerNorm over a single feature always outputs its bias (the normalised value of a
one-element vector is 0), so with the paper's width of 1 the attention weights in step 3 are
uniform over the tokens. The pinned design (and the paper's parameter count) keeps it anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from histokd.models.peg import PositionalEncodingGenerator

__all__ = ["SpatialAttentionTransformer"]


class SpatialAttentionTransformer(nn.Module):
    """The SAT module: ``x * sigmoid(Upsample(Transformer(M_S(x))))`` (RCKD Eqs. 9-11).

    Args:
        channels: Channels of the input feature map. Unused (the module is channel-agnostic);
            accepted so timm's ``attn_layer`` hook (``create_attn(layer, channels)``) can build
            it, as it builds CBAM or SE in a ResNet basic block.
        pool_size: Side of the reduced attention grid, h' = w' (RCKD Sec. 2.3.3: 7).
        kernel_size: Kernel of the spatial convolution of Eq. 9 (RCKD Eq. 9: 7x7).
        mlp_ratio: Hidden width of the Transformer MLP relative to its width of 1.
    """

    def __init__(
        self,
        channels: int | None = None,
        pool_size: int = 7,
        kernel_size: int = 7,
        mlp_ratio: int = 4,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=True, **dd)
        self.pos_embed = PositionalEncodingGenerator(1, **dd)
        self.norm1 = nn.LayerNorm(1, eps=1e-6, **dd)
        self.qkv = nn.Linear(1, 3, bias=False, **dd)
        self.norm2 = nn.LayerNorm(1, eps=1e-6, **dd)
        self.mlp = Mlp(1, hidden_features=mlp_ratio, act_layer=nn.GELU, **dd)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Attention logits at the reduced resolution, ``B x 1 x h' x w'`` (RCKD Eqs. 9-10)."""
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        m_s = self.spatial(self.pool(pooled))  # RCKD Eq. 9
        m_s = self.pos_embed(m_s)
        b, _, h, w = m_s.shape
        tokens = m_s.flatten(2).transpose(1, 2)  # B x h'w' x 1
        # one head of width 1: each of q, k, v is B x 1 x h'w' x 1
        q, k, v = self.qkv(self.norm1(tokens)).unsqueeze(1).chunk(3, dim=-1)
        attn = F.scaled_dot_product_attention(q, k, v)
        tokens = tokens + attn.squeeze(1)  # RCKD Eq. 10, one head, no output projection
        tokens = tokens + self.mlp(self.norm2(tokens))
        return tokens.transpose(1, 2).reshape(b, 1, h, w)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial attention of RCKD Eq. 11, ``B x 1 x H x W`` at ``x``'s size, in (0, 1)."""
        attn = F.interpolate(
            self.attention_map(x), size=x.shape[-2:], mode="bilinear", align_corners=False
        )
        return attn.sigmoid().to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rescale ``x`` (NCHW) by the upsampled spatial attention (RCKD Eq. 11)."""
        return x * self.attention(x)
