"""The pretraining job's physical units and sampling flags: mpp first, magnification as alias."""

from __future__ import annotations

import pytest

from histokd.cli import parse_config
from histokd.pretrain.config import PretrainConfig


def test_mpp_flags_and_their_aliases():
    paper = PretrainConfig()
    assert (paper.mpp, paper.magnification, paper.patch_size, paper.sampling) == (
        0.5,
        20,
        1024,
        "uniform",
    )
    assert paper.teacher_kwargs()["patch_mpp"] == 0.5
    c = parse_config(PretrainConfig, ["--magnification", "40", "--patch-size-um", "256",
                                      "--base-magnification", "40", "--max-patches-per-slide", "50"])  # fmt: skip
    assert (c.mpp, c.magnification, c.patch_size) == (0.25, 40, 1024)
    assert (c.assume_mpp, c.sampling, c.max_patches_per_slide) == (0.25, "capped", 50)
    assert c.teacher_kwargs()["patch_mpp"] == 0.25
    c = parse_config(
        PretrainConfig, ["--mpp", "0.3", "--sampling", "proportional", "--assume-mpp", "0.5"]
    )
    assert (c.mpp, round(c.magnification, 4), c.sampling, c.assume_mpp) == (
        0.3,
        33.3333,
        "proportional",
        0.5,
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mpp": 0.25, "magnification": 20}, "mpp=0.25 and magnification=20 disagree"),
        ({"patch_size": 512, "patch_size_um": 512}, "patch_size=512 and patch_size_um=512 disagree"),
        ({"assume_mpp": 0.5, "base_magnification": 40}, "assume_mpp=0.5 and base_magnification=40 disagree"),
        ({"sampling": "capped"}, "sampling='capped' needs max_patches_per_slide"),
        ({"mpp": -1}, "mpp=-1: must be positive"),
    ],
)  # fmt: skip
def test_unit_conflicts_name_the_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PretrainConfig(**kwargs)
