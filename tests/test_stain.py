"""HED colour deconvolution and jitter (Tellez et al. 2019), Macenko normalisation (Macenko 2009),
on real tiles of ../shared/testdata/tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import rgb2hed

from histokd.stain import (
    DEFAULT_REFERENCE,
    StainReference,
    fit_macenko,
    hed_jitter,
    hed_to_rgb,
    macenko_normalize,
    rgb_to_hed,
    stain_normalization,
    stain_normalizer,
)

TILES = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "tiles"
TISSUE = TILES / "high-nuclei-score-level0.png"  # 779 x 956 H&E, dense nuclei
BACKGROUND = ["almost-white-1.png", "almost-white-2.png", "no-tissue.png", "no-tissue-line.png",
              "no-tissue-green-pen.png", "kidney-ihc-level0-350-530-360-540.png"]  # fmt: skip


def _tile(name: str | Path) -> torch.Tensor:
    """A real tile as a 1 x 3 x H x W uint8 batch."""
    array = np.array(Image.open(TILES / name).convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def _colour_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean Euclidean RGB distance per pixel, in 0-255 units."""
    return float((a.float() - b.float()).norm(dim=1).mean())


def test_hed_space_is_skimages_and_inverts_exactly():
    tile = _tile(TISSUE)
    hed = rgb_to_hed(tile)
    expected = rgb2hed(tile[0].permute(1, 2, 0).numpy())  # skimage clips negatives at 0
    np.testing.assert_allclose(hed[0].permute(1, 2, 0).clamp_min(0).numpy(), expected, atol=1e-5)
    back = hed_to_rgb(hed) * 255
    assert float((back - tile.float()).abs().max()) < 0.01


def test_hed_jitter_with_sigma_zero_is_the_identity():
    tile = _tile(TISSUE)
    same = hed_jitter(tile, torch.ones(1, 3), torch.zeros(1, 3))
    assert same.dtype == torch.uint8 and int((same.int() - tile.int()).abs().max()) <= 1
    floats = tile.float() / 255
    assert (
        float((hed_jitter(floats, torch.ones(1, 3), torch.zeros(1, 3)) - floats).abs().max()) < 1e-4
    )


def test_hed_jitter_moves_each_stain_by_its_scale_and_shift_within_sigma():
    sigma = 0.05
    image = _tile(TISSUE).float() / 255
    scale = torch.tensor([[1 + sigma, 1 - sigma, 1.02]])
    shift = torch.tensor([[-sigma, sigma, 0.01]])
    out = hed_jitter(image, scale, shift)
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    before, after = rgb_to_hed(image)[0], rgb_to_hed(out)[0]
    unclipped = ((out[0] > 1e-4) & (out[0] < 1 - 1e-4)).all(0)  # clipping to [0, 1] bends the rest
    assert float(unclipped.float().mean()) > 0.3
    for c in range(3):
        s, s_new = before[c][unclipped], after[c][unclipped]
        # exactly s * a + b, measured in HED space
        assert float((s_new - (s * scale[0, c] + shift[0, c])).abs().max()) < 1e-3
        # and so within the stated bounds of a ~ U(1 - sigma, 1 + sigma), b ~ U(-sigma, sigma)
        assert float(((s_new - s).abs() - (sigma * s.abs() + sigma)).max()) < 1e-3
    # haematoxylin down by 0.05 (+5 %), eosin up: a visible change, not a no-op
    assert float((after[0][unclipped] - before[0][unclipped]).mean()) < -0.04
    assert float((after[1][unclipped] - before[1][unclipped]).mean()) > 0.04


def test_macenko_maps_a_stain_shifted_tile_back_towards_the_reference():
    tile = _tile(TISSUE)
    reference = fit_macenko(tile[0])
    assert reference is not None
    # H and E 40 % stronger and 30 % weaker: another lab's staining of the same tissue
    shifted = hed_jitter(tile, torch.tensor([[1.4, 0.7, 1.0]]), torch.zeros(1, 3))
    normalised = macenko_normalize(shifted, reference)
    assert normalised.dtype == torch.uint8 and normalised.shape == tile.shape
    before, after = _colour_distance(shifted, tile), _colour_distance(normalised, tile)
    assert before > 15  # measured 21.4 (mean RGB distance)
    assert after < before / 4  # measured 3.6: 5.9x closer


def test_macenko_fit_is_close_to_the_usual_reference_on_hne():
    fitted = fit_macenko(_tile(TISSUE)[0])
    cosine = (torch.tensor(fitted.stain_matrix) * torch.tensor(DEFAULT_REFERENCE.stain_matrix)).sum(
        0
    )
    assert (cosine > 0.98).all()  # H and E found, in that order


@pytest.mark.parametrize("name", BACKGROUND)
def test_macenko_is_stable_on_background_heavy_tiles(name):
    tile = _tile(name)
    out = macenko_normalize(torch.cat([tile, tile]))  # a batch, through the whole path
    assert out.dtype == torch.uint8 and out.shape[1:] == tile.shape[1:]
    floats = macenko_normalize(tile.float() / 255)
    assert torch.isfinite(floats).all() and 0 <= float(floats.min()) and float(floats.max()) <= 1
    if fit_macenko(tile[0]) is None:  # too little tissue to fit: left as it is
        assert torch.equal(out[0], tile[0])


def test_stain_normalization_records_a_reference_tile_or_the_default(tmp_path):
    assert stain_normalization("none") is None
    assert stain_normalization("macenko") == DEFAULT_REFERENCE.as_dict()
    record = stain_normalization("macenko", str(TISSUE))
    assert record["reference"] == str(TISSUE) and record["method"] == "macenko"
    assert StainReference.from_dict(record) == fit_macenko(_tile(TISSUE)[0])
    normalize = stain_normalizer(record)
    tile = _tile("tissue-level0-4302-10273-4814-10785.png")
    assert torch.equal(normalize(tile), macenko_normalize(tile, StainReference.from_dict(record)))
    with pytest.raises(
        ValueError, match=r"stain_reference=.*no-tissue.png.*too little stained tissue"
    ):
        stain_normalization("macenko", str(TILES / "no-tissue.png"))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"stain_reference=.*bad.png.*cannot be read as an image"):
        stain_normalization("macenko", str(tmp_path / "bad.png"))
    with pytest.raises(ValueError, match=r"stain_norm='reinhard': allowed: none, macenko"):
        stain_normalization("reinhard")
