"""histokd's backbones in timm: ``histokd_`` names, registered lazily, backbone files load."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from histokd.models import (
    BACKBONES,
    TIMM_NAMES,
    backbone_state_dict,
    create_backbone,
    save_backbone,
    timm_name,
)

OURS = ["histokd_csat", "histokd_csat_nosat", "histokd_resnet18_sat"]
COMPAT = Path(__file__).resolve().parents[2] / "platform" / "histokd" / "compat.py"

# After the imports each case sets up: histokd's models in timm, timm's own loader kept.
_CHECK_TIMM = f"""
assert timm.list_models("histokd_*") == {OURS!r}, timm.list_models("histokd_*")
assert type(timm.__loader__).__name__ == "SourceFileLoader", timm.__loader__
model = timm.create_model("histokd_csat", num_classes=3).eval()
print(tuple(model(torch.zeros(1, 3, 64, 64)).shape))
"""
IMPORT_CASES = {
    "histokd first": """
import sys
import histokd
heavy = [m for m in ("torch", "timm", "torchvision", "histokd.models") if m in sys.modules]
assert not heavy, f"import histokd loaded {heavy}"
import timm, torch
""",
    # timm needs the torchvision fix beside the CPU torch wheel: apply it from compat.py
    # loaded by path, without importing histokd
    "timm first": f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("standalone_compat", {str(COMPAT)!r})
compat = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compat)
compat.ensure_torchvision()
import timm, torch
assert "histokd" not in sys.modules and timm.list_models("histokd_*") == []
import histokd
""",
}


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_import_histokd_registers_the_models_with_timm(case: str) -> None:
    out = _run(IMPORT_CASES[case] + _CHECK_TIMM)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == "(1, 3)", out.stdout


def test_a_failed_registration_warns_and_timm_still_imports() -> None:
    code = """
import sys, warnings

class Broken:  # histokd.models cannot import, as in a broken install
    def find_spec(self, name, path=None, target=None):
        if name == "histokd.models":
            raise ImportError("broken on purpose")

import histokd
sys.meta_path.insert(0, Broken())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import timm
assert timm.list_models("histokd_*") == []
print([str(w.message) for w in caught if w.category is RuntimeWarning])
"""
    out = _run(code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "could not register its backbones with timm (ImportError: broken on purpose)" in (
        out.stdout
    )


def test_list_models_finds_exactly_ours() -> None:
    assert timm.list_models("histokd_*") == OURS
    assert sorted(TIMM_NAMES.values()) == OURS
    # timm's own csatv2 (another group's model) is all that a csat glob finds
    assert not set(timm.list_models("csat*")) & {*OURS, "csat", "csat_nosat"}
    assert not timm.is_model("csat") and not timm.is_model("resnet18_sat")


def test_histokd_names_map_to_timm_names() -> None:
    assert [timm_name(b) for b in BACKBONES] == [
        "histokd_csat",
        "histokd_csat_nosat",
        "resnet18",
        "histokd_resnet18_sat",
        "efficientnet_b0",
        "convnextv2_atto",
    ]
    backbone = create_backbone("csat")
    assert backbone.backbone_name == "csat"
    assert backbone.pretrained_cfg["architecture"] == "histokd_csat"


@pytest.mark.parametrize("name", OURS)
def test_pretrained_cfg_is_rckd_pretraining_input(name: str) -> None:
    cfg = timm.create_model(name).pretrained_cfg
    assert cfg["input_size"] == (3, 512, 512) and cfg["crop_pct"] == 1.0
    assert cfg["interpolation"] == "bilinear"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert cfg["num_classes"] == 1000 and cfg["url"] == ""


@pytest.mark.parametrize("name", ["csat", "resnet18_sat"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_backbone_file_loads_through_timm(tmp_path: Path, name: str, suffix: str) -> None:
    source = create_backbone(name).eval()
    path = save_backbone(source, tmp_path / f"backbone{suffix}")
    mine = create_backbone(name, backbone_file=path).eval()
    torch.manual_seed(1)  # another initialisation: only the file can make the outputs agree
    overlay = dict(file=str(path))
    model = timm.create_model(
        timm_name(name), pretrained=True, pretrained_cfg_overlay=overlay
    ).eval()
    features = timm.create_model(
        timm_name(name), pretrained=True, pretrained_cfg_overlay=overlay, features_only=True
    ).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = mine(x)
        final = model.forward_features(x)
        levels = features(x)
        unloaded = timm.create_model(timm_name(name)).eval().forward_features(x)
    assert final.shape == expected[-1].shape
    torch.testing.assert_close(final, expected[-1], rtol=1e-5, atol=1e-5)
    assert len(levels) == len(expected)
    for level, want in zip(levels, expected, strict=True):
        torch.testing.assert_close(level, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unloaded, expected[-1], atol=1e-3)
    assert model(x).shape == (2, 1000)  # the head keeps its initialisation


def test_timm_load_of_a_backbone_file_stays_strict(tmp_path: Path) -> None:
    state = backbone_state_dict(create_backbone("csat"))
    del state["stages.2.blocks.6.attn.qkv.weight"]
    torch.save(state, tmp_path / "truncated.pt")
    with pytest.raises(RuntimeError, match=r"Missing key.*stages\.2\.blocks\.6\.attn\.qkv\.weight"):
        timm.create_model(
            "histokd_csat",
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(tmp_path / "truncated.pt")),
        )


def test_a_checkpoint_with_a_head_loads_its_head(tmp_path: Path) -> None:
    full = timm.create_model("histokd_csat", num_classes=1000)
    torch.save(full.state_dict(), tmp_path / "full.pt")
    torch.manual_seed(1)
    loaded = timm.create_model(
        "histokd_csat", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "full.pt"))
    )
    assert torch.equal(loaded.head.fc.weight, full.head.fc.weight)
