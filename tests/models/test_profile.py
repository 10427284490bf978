"""Profiling: parameters and MACs in the paper's protocol (THOP) and the full one."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from histokd.models.profile import (
    ProfileConfig,
    count_params,
    format_table,
    macs_full,
    macs_paper,
    profile_backbones,
    run_profile,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("name", "gmac"), [("histokd_csat", 1.08), ("resnet18", 5.35)])
def test_macs_at_384_as_in_the_paper(name: str, gmac: float) -> None:
    # RCKD Tables 3 and 6, counted with THOP at 384x384
    assert macs_paper(timm.create_model(name), 384) / 1e9 == pytest.approx(gmac, abs=0.01)


def test_full_count_adds_the_attention_matmuls() -> None:
    model = timm.create_model("histokd_csat")
    paper, full = macs_paper(model, 384), macs_full(model, 384)
    assert full / 1e9 == pytest.approx(1.427, abs=0.005)  # CSAT.md: "about 1.44" with norms
    # the fused CPU kernel is counted exactly as the unfused matmuls of the math backend
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model.eval()(torch.randn(1, 3, 384, 384))
    assert full == counter.get_total_flops() // 2
    assert full > paper
    # attention is quadratic in the tokens: the full count grows faster than the image area
    assert macs_full(model, 768) > 4.5 * full


def test_count_params() -> None:
    model = timm.create_model("histokd_csat")
    assert count_params(model) == 3_065_078
    model.stem.requires_grad_(False)
    assert count_params(model, trainable_only=True) == 3_065_078 - (3 * 16 * 32 + 32) - 64


def test_profile_rows_and_table() -> None:
    rows = profile_backbones(["csat_nosat"], input_sizes=(224,))
    (row,) = rows
    assert (row.params, row.params_backbone) == (3_063_272, 2_885_920)
    assert row.gmac_paper == pytest.approx(0.366, abs=0.001)
    table = format_table(rows)
    assert "| csat_nosat | 224 | 3,063,272 | 2,885,920 | 0.366 |" in table


def test_config_rejects_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"backbones: \['vit_base'\] not in csat"):
        ProfileConfig(tmp_path, backbones=("vit_base",))
    with pytest.raises(ValueError, match=r"input_sizes: \[100\]; sides must be multiples of 32"):
        ProfileConfig(tmp_path, input_sizes=(224, 100))
    with pytest.raises(ValueError, match="num_classes: 0"):
        ProfileConfig(tmp_path, num_classes=0)


def test_run_profile_writes_json_and_markdown(tmp_path: Path) -> None:
    rows = run_profile(ProfileConfig(tmp_path, backbones=("resnet18",), input_sizes=(64,)))
    payload = json.loads((tmp_path / "profile.json").read_text())
    assert payload["config"]["backbones"] == ["resnet18"]
    assert payload["rows"][0]["params"] == 11_689_512
    assert (tmp_path / "profile.md").read_text().strip() == format_table(rows)


def test_job_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = runpy.run_path(str(REPO / "jobs" / "profile_models.py"), run_name="profile_models")
    args = ["--storage-path", str(tmp_path), "--backbones", "csat", "--input-sizes", "384"]
    assert job["main"](args) == 0
    assert "| csat | 384 | 3,065,078 | 2,887,726 | 1.076 | 1.427 |" in capsys.readouterr().out
    assert (tmp_path / "profile" / "profile.json").is_file()
    with pytest.raises(SystemExit):
        job["main"](["--storage-path", str(tmp_path), "--input-sizes", "abc"])
    # the old --output-dir DIR still works for one release: STORAGE is its parent, RUN its name
    assert (
        job["main"](
            ["--output-dir", str(tmp_path / "old"), "--backbones", "csat", "--input-sizes", "224"]
        )
        == 0
    )
    assert (tmp_path / "old" / "profile.json").is_file()
    assert "notice: --output-dir is deprecated" in capsys.readouterr().err
