"""The shared training augmentations: switches, HED jitter bounds, CPU and device paths, pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histokd.augment import (
    AUGMENTATIONS,
    Augmentation,
    augment_on_device,
    check_augment,
    save_augment_examples,
)
from histokd.stain import rgb_to_hed

TILES = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "tiles"
ALL = tuple(AUGMENTATIONS)


def _tiles(n: int = 4, side: int = 64) -> torch.Tensor:
    """``n`` real H&E crops, ``n x 3 x side x side`` uint8."""
    array = np.array(Image.open(TILES / "medium-nuclei-score-level1.png").convert("RGB"))
    crops = [array[40 * i : 40 * i + side, 30 * i : 30 * i + side] for i in range(n)]
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


def _marked_mask(images: torch.Tensor) -> torch.Tensor:
    """A mask with a block in one corner, so that every flip and rotation is visible."""
    mask = torch.zeros(images.shape[0], images.shape[2], images.shape[3], dtype=torch.long)
    mask[:, :8, :24] = 1
    mask[:, :4, :4] = 2
    return mask


def test_flips_and_rotations_move_image_and_mask_together_all_eight():
    images = torch.zeros(64, 3, 16, 16, dtype=torch.uint8)
    images[:, :, :4, :8] = 255
    images[:, 0, :2, :2] = 10
    masks = (images[:, 0] > 0).long() + (images[:, 0] == 10).long()
    out, out_masks = Augmentation(("flip", "rot90"))(
        images, masks, torch.Generator().manual_seed(0)
    )
    assert torch.equal(out[:, 0].long().gt(0).long() + (out[:, 0] == 10).long(), out_masks)
    assert len({tuple(m.flatten().tolist()) for m in out_masks}) == 8  # every one of the eight
    assert torch.equal(
        torch.sort(out.flatten(1).sum(1)).values, torch.sort(images.flatten(1).sum(1)).values
    )


def test_hed_jitter_draws_stay_within_sigma_and_keep_the_mask():
    images = _tiles().float() / 255
    masks = _marked_mask(images)
    sigma = 0.05
    draws = Augmentation().draw(len(images), torch.Generator().manual_seed(3))
    out, out_masks = Augmentation(("hed",), hed_sigma=sigma)(images, masks, draws=draws)
    assert torch.equal(out_masks, masks)  # colour only: the mask is untouched
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    scale, shift = 1 + sigma * (2 * draws[:, 2:5] - 1), sigma * (2 * draws[:, 5:8] - 1)
    assert ((scale - 1).abs() <= sigma).all() and (shift.abs() <= sigma).all()
    before, after = rgb_to_hed(images), rgb_to_hed(out)
    for n in range(len(images)):
        inside = ((out[n] > 1e-4) & (out[n] < 1 - 1e-4)).all(0)
        for c in range(3):
            s, s_new = before[n, c][inside], after[n, c][inside]
            assert float((s_new - (s * scale[n, c] + shift[n, c])).abs().max()) < 1e-3
            assert float(((s_new - s).abs() - (sigma * s.abs() + sigma)).max()) < 1e-3
    zero, _ = Augmentation(("hed",), hed_sigma=0.0)(_tiles(), None, draws=draws)
    assert int((zero.int() - _tiles().int()).abs().max()) <= 1  # sigma 0: the identity


@pytest.mark.parametrize("op", ALL)
def test_each_switch_changes_the_output_and_off_leaves_the_others_as_they_were(op):
    images, masks = _tiles(), _marked_mask(_tiles())
    draws = Augmentation().draw(len(images), torch.Generator().manual_seed(1))
    draws[:, 0], draws[:, 1] = 0.9, 0.1  # three quarter turns, flipped: a visible transform
    strong = {"hed_sigma": 0.2, "color_jitter": 0.4, "hue_jitter": 0.1}
    on, on_masks = Augmentation((op,), **strong)(images, masks, draws=draws)
    assert not torch.equal(on, images)
    assert torch.equal(on_masks, masks) == (op not in ("flip", "rot90"))
    # all but this one: differs from all; the others' draws did not move (the geometric
    # transform is that of the geometric switches alone)
    others = tuple(o for o in ALL if o != op)
    without, without_masks = Augmentation(others, **strong)(images, masks, draws=draws)
    with_all, _ = Augmentation(ALL, **strong)(images, masks, draws=draws)
    assert not torch.equal(without, with_all)
    geometric = tuple(o for o in ("flip", "rot90") if o in others)
    _, geometric_masks = Augmentation(geometric)(images, masks, draws=draws)
    assert torch.equal(without_masks, geometric_masks)


def test_none_changes_nothing_and_the_switch_list_is_checked():
    images = _tiles()
    out, masks = Augmentation(())(images, None, torch.Generator().manual_seed(0))
    assert out is images and masks is None
    assert check_augment(["none"], ALL) == [] and check_augment(False, ALL) == []
    assert check_augment(True, ["flip"]) == ["flip"]
    assert check_augment(["hed", "flip", "hed"], ALL) == ["hed", "flip"]
    with pytest.raises(
        ValueError,
        match=r"augment=\['flip', 'blur'\]: unknown augmentation 'blur'; allowed: flip, rot90",
    ):
        check_augment(["flip", "blur"], ALL)
    with pytest.raises(ValueError, match="unknown augmentation 'none'"):
        check_augment(["none", "flip"], ALL)


def test_cpu_and_device_paths_agree_for_the_same_seed():
    """The draws come from a CPU generator: augmenting before the batch moves to the device or
    after it gives the same images (on CPU here; on a GPU worker the device is cuda)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    augmentation = Augmentation(ALL)
    images, masks = _tiles(), _marked_mask(_tiles())
    cpu_images, cpu_masks = augmentation(
        images.float() / 255, masks, torch.Generator().manual_seed(5)
    )
    dev_images, dev_masks = augmentation((images.to(device).float() / 255), masks.to(device),
                                         torch.Generator().manual_seed(5))  # fmt: skip
    assert torch.equal(cpu_masks, dev_masks.cpu())
    assert float((cpu_images - dev_images.cpu()).abs().max()) < 1e-5
    # per sample (a loader, one image at a time) and per batch (the device) alike
    draws = augmentation.draw_per_sample(seed=7, epoch=2, indices=[5, 9, 1, 0])
    batch, _ = augmentation(images, None, draws=draws)
    for row, index in enumerate([5, 9, 1, 0]):
        single, _ = augmentation(images[row : row + 1], None,
                                 draws=augmentation.draw_per_sample(7, 2, [index]))  # fmt: skip
        assert torch.equal(single[0], batch[row])
    assert not torch.equal(draws, augmentation.draw_per_sample(7, 3, [5, 9, 1, 0]))  # epochs differ
    assert augment_on_device("auto", torch.device("cpu")) is False
    assert augment_on_device("auto", torch.device("cuda")) is True
    assert augment_on_device("device", torch.device("cpu")) is True
    assert augment_on_device("cpu", torch.device("cuda")) is False


def test_examples_grid_shows_before_and_after(tmp_path):
    images = _tiles(3)
    after, _ = Augmentation(ALL)(images, None, torch.Generator().manual_seed(0))
    path = save_augment_examples(images, after.float() / 255, str(tmp_path / "x.png"), title="t")
    grid = np.array(Image.open(path))
    assert grid.shape == (18 + 3 * 68, 2 * 68, 3)
    assert np.array_equal(grid[18 + 2 : 18 + 66, 2:66], images[0].permute(1, 2, 0).numpy())
    assert np.array_equal(grid[18 + 2 : 18 + 66, 70:134], after[0].permute(1, 2, 0).numpy())
