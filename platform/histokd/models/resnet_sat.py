"""ResNet18 with a SAT module in each basic block, for the ablation of RCKD Table 6.

Paper: `RCKD: Response-Based Cross-Task Knowledge Distillation for Pathological Image
Analysis` (Kim et al., Bioengineering 2023, 10, 1279), Sec. 3.5, Table 6.

The SAT module goes after the second batch norm of each of the 8 basic blocks, where CBAM or
SE would go (../shared/CSAT.md). timm's ``BasicBlock`` already has that hook (``attn_layer``,
stored as ``se``), so the variant is timm's ResNet with a keyword argument:
11,689,512 + 8 x 129 = 11,690,544 parameters with a 1000-class head. A plain ``resnet18``
checkpoint loads into it with only the ``*.se.*`` keys missing.

Registered with timm as ``histokd_resnet18_sat``; histokd's jobs call it ``resnet18_sat``.
"""

from __future__ import annotations

from functools import partial

from timm.models import build_model_with_cfg, register_model
from timm.models._registry import generate_default_cfgs
from timm.models.resnet import BasicBlock, ResNet

from histokd.models.sat import SpatialAttentionTransformer
from histokd.models.timm_weights import keep_head_init, rckd_cfg

__all__: list[str] = []  # register_model appends the entry points


default_cfgs = generate_default_cfgs({"histokd_resnet18_sat": rckd_cfg("conv1", "fc")})


@register_model
def histokd_resnet18_sat(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet18 with a SAT module after ``bn2`` of each basic block (RCKD Table 6)."""
    model_args = dict(
        block=BasicBlock,
        layers=(2, 2, 2, 2),
        block_args=dict(attn_layer=SpatialAttentionTransformer),
    )
    return build_model_with_cfg(
        ResNet,
        "histokd_resnet18_sat",
        pretrained,
        pretrained_filter_fn=partial(keep_head_init, head_prefix="fc."),  # backbone files
        **dict(model_args, **kwargs),
    )
