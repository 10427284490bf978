"""Positional encodings: the freeze switch of RCKD Sec. 3.1 over every backbone."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from histokd.models import SegmentationModel, set_positional_encoding_trainable
from histokd.models.peg import PositionalEncodingGenerator


def test_peg_is_a_residual_depthwise_3x3() -> None:
    peg = PositionalEncodingGenerator(4)
    assert sum(p.numel() for p in peg.parameters()) == 4 * 9 + 4
    with torch.no_grad():
        peg.proj.weight.zero_()
        peg.proj.bias.fill_(0.5)
    x = torch.randn(1, 4, 5, 5)
    assert torch.allclose(peg(x), x + 0.5)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("histokd_csat", 5_580),
        ("histokd_csat_nosat", 5_440),
        ("histokd_resnet18_sat", 80),
        ("resnet18", 0),
    ],
)
def test_switch_counts_every_peg(name: str, expected: int) -> None:
    model = timm.create_model(name)
    assert set_positional_encoding_trainable(model, False) == expected
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == expected
    assert set_positional_encoding_trainable(model, True) == expected
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_peg_unchanged_after_an_optimizer_step() -> None:
    model = SegmentationModel("csat", num_classes=2)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 2, (2, 64, 64))
    # a first step with everything trainable leaves gradients on the PEGs ...
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    # ... which freezing must drop, or the next step would still move them
    assert set_positional_encoding_trainable(model, False) == 5_580
    pegs = {n: p.detach().clone() for n, p in model.named_parameters() if ".pos_embed." in n}
    others = {n: p.detach().clone() for n, p in model.named_parameters() if ".pos_embed." not in n}
    assert len(pegs) == 2 * 18
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    params = dict(model.named_parameters())
    for name, before in pegs.items():
        assert params[name].grad is None
        assert torch.equal(params[name], before), name
    moved = sum(not torch.equal(params[n], before) for n, before in others.items())
    assert moved > 0.9 * len(others)
