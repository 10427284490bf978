"""CSAT: exact parameter counts, stage shapes, timm registration (../shared/CSAT.md)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from histokd.models import SegmentationModel
from histokd.models.csat import Csat, SatBlock, TransformerBlock
from histokd.models.peg import PositionalEncodingGenerator
from histokd.models.sat import SpatialAttentionTransformer

# ../shared/CSAT.md, "Shapes (channels x height x width)"
STAGE_SHAPES = {
    224: [(32, 56, 56), (48, 28, 28), (96, 14, 14), (176, 7, 7)],
    512: [(32, 128, 128), (48, 64, 64), (96, 32, 32), (176, 16, 16)],
    1024: [(32, 256, 256), (48, 128, 128), (96, 64, 64), (176, 32, 32)],
}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("name", "expected"),
    [("histokd_csat", 3_065_078), ("histokd_csat_nosat", 3_063_272)],  # RCKD Table 6
)
def test_param_count_with_1000_class_head(name: str, expected: int) -> None:
    assert n_params(timm.create_model(name, num_classes=1000)) == expected


def test_sat_modules_add_the_papers_1_8k() -> None:
    model = timm.create_model("histokd_csat")
    sat = [m for m in model.modules() if isinstance(m, SpatialAttentionTransformer)]
    assert len(sat) == 14  # one per SAT block: 2 + 2 + 6 + 4
    assert sum(n_params(m) for m in sat) == 1_806


def test_block_formulas_of_csat_md() -> None:
    for d in (32, 48, 96, 176):
        assert n_params(SatBlock(d, use_sat=False)) == 8 * d * d + 65 * d
        assert n_params(TransformerBlock(d)) == 8 * d * d + 1044 * d


def test_structure_of_table_2() -> None:
    model = timm.create_model("histokd_csat")
    sat_blocks = [sum(isinstance(b, SatBlock) for b in stage.blocks) for stage in model.stages]
    vit_blocks = [
        sum(isinstance(b, TransformerBlock) for b in stage.blocks) for stage in model.stages
    ]
    assert sat_blocks == [2, 2, 6, 4]
    assert vit_blocks == [0, 0, 2, 2]
    assert [info["num_chs"] for info in model.feature_info] == [32, 48, 96, 176]
    assert [info["reduction"] for info in model.feature_info] == [4, 8, 16, 32]
    # every Transformer block's MHSA has 8 heads of width 32 and no QKV bias
    for block in model.stages[2].blocks[6:]:
        assert block.attn.qkv.out_features == 3 * 256 and block.attn.qkv.bias is None
    # the head of CSAT.md: global average pool, LayerNorm(176), Linear(176, classes)
    assert model.head.norm.weight.shape == (176,)
    assert model.head.fc.weight.shape == (1000, 176)


def test_backbone_without_head_is_table_3s_2_8m() -> None:
    model = timm.create_model("histokd_csat", num_classes=0)
    # num_classes=0 keeps the head norm: 3,065,078 - 176 * 1000 - 1000
    assert n_params(model) == 2_888_078
    assert n_params(timm.create_model("histokd_csat", features_only=True)) == 2_887_726


def test_positional_encodings_are_5580_params() -> None:
    model = timm.create_model("histokd_csat")
    pegs = [m for m in model.modules() if isinstance(m, PositionalEncodingGenerator)]
    assert len(pegs) == 14 + 4
    assert sum(n_params(m) for m in pegs) == 5_580


@pytest.mark.parametrize("size", [224, 512])
def test_stage_shapes(size: int) -> None:
    model = timm.create_model("histokd_csat", features_only=True).eval()
    with torch.no_grad():
        features = model(torch.randn(1, 3, size, size))
    assert [tuple(f.shape[1:]) for f in features] == STAGE_SHAPES[size]
    assert model.feature_info.channels() == [32, 48, 96, 176]
    assert model.feature_info.reduction() == [4, 8, 16, 32]


def test_csat_1024_forward_backward_batch_1() -> None:
    # backbone + U-Net decoder at 1024x1024; fused SDPA keeps the global attention over the
    # 4,096 stage-3 tokens affordable
    model = SegmentationModel("csat", num_classes=2)
    features = model.backbone(torch.randn(1, 3, 1024, 1024))
    assert [tuple(f.shape[1:]) for f in features] == STAGE_SHAPES[1024]
    logits = model.head(model.decoder(features))
    assert logits.shape == (1, 2, 1024, 1024)
    F.cross_entropy(logits, torch.randint(0, 2, (1, 1024, 1024))).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_features_only_out_indices_and_num_classes() -> None:
    model = timm.create_model("histokd_csat", num_classes=7, features_only=True, out_indices=(1, 3))
    features = model(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(2, 48, 8, 8), (2, 176, 2, 2)]
    assert model.feature_info.channels() == [48, 176]
    logits = timm.create_model("histokd_csat", num_classes=7)(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 7)


def test_forward_intermediates_match_forward_features() -> None:
    model = timm.create_model("histokd_csat").eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        assert torch.allclose(final, model.forward_features(x))
        assert torch.allclose(intermediates[-1], final)
        pooled = model.forward_head(final, pre_logits=True)
    assert pooled.shape == (1, 176)


def test_prune_keeps_only_needed_stages() -> None:
    model = timm.create_model("histokd_csat")
    kept = model.prune_intermediate_layers([0, 1])
    assert kept == [0, 1]
    assert len(model.stages) == 2
    out = model.forward_intermediates(
        torch.randn(1, 3, 64, 64), indices=[0, 1], intermediates_only=True
    )
    assert [o.shape[1] for o in out] == [32, 48]


def test_drop_path_rates_increase_linearly() -> None:
    model = Csat(drop_path_rate=0.1)
    rates = [
        b.drop_path.drop_prob if isinstance(b, SatBlock) else b.drop_path1.drop_prob
        for stage in model.stages
        for b in stage.blocks
        if not isinstance(
            getattr(b, "drop_path", getattr(b, "drop_path1", None)), torch.nn.Identity
        )
    ]
    assert len(rates) == 17  # 18 blocks, the first at rate 0 has no DropPath
    assert rates == sorted(rates) and rates[-1] == pytest.approx(0.1)


def test_bad_stage_lists_are_rejected() -> None:
    with pytest.raises(ValueError, match="one entry per stage"):
        Csat(dims=(32, 48), depths=(2, 2, 6), num_vit=(0, 0))
