"""The stream's stages on their own: planning rows, reading tiles, the model actor's outputs."""

from __future__ import annotations

import numpy as np
import pytest

from histokd.inference.model_file import load_checkpoint
from histokd.inference.stream import (
    META_COLUMNS,
    TilePredictor,
    TileStreamSettings,
    plan_slide_batch,
    read_tile_batch,
)
from histokd.tissue import TissueFilter


def _settings(min_tissue: float = 0.1) -> TileStreamSettings:
    return TileStreamSettings(
        magnification=20,
        patch_size=256,
        input_size=64,
        overlap=0.0,
        tissue=TissueFilter(min_tissue_fraction=min_tissue),
    )


def test_plan_gives_tile_rows_and_one_marker_per_unusable_slide(slides_dir, tmp_path):
    paths = [
        str(slides_dir / "cmu-1-small-region.svs"),
        str(slides_dir / "broken.svs"),
        str(slides_dir / "boxes.tiff"),
    ]
    rows = plan_slide_batch(
        {"slide_index": np.arange(3), "slide_path": np.array(paths, object)}, _settings()
    )
    assert set(rows) == set(META_COLUMNS)
    status = rows["status"]
    cmu = rows["slide_index"] == 0
    assert (status[cmu] == "tile").all() and rows["tile_count"][cmu][0] == cmu.sum() > 0
    assert (rows["tissue_fraction"][cmu] >= 0.1).all()
    assert (rows["width"][cmu] == 2220).all() and (rows["extent"][cmu] == 256).all()
    broken = rows["slide_index"] == 1
    assert (
        broken.sum() == 1
        and status[broken][0] == "bad"
        and "broken.svs: not a slide format" in rows["message"][broken][0]
    )
    boxes = rows["slide_index"] == 2  # no magnification recorded and none given
    assert status[boxes][0] == "bad" and "base magnification unknown" in rows["message"][boxes][0]


def test_read_marks_unreadable_tiles_and_leaves_markers_alone(slides_dir):
    paths = [str(slides_dir / "unreadable.svs"), str(slides_dir / "cmu-1-small-region.svs")]
    rows = plan_slide_batch(
        {"slide_index": np.arange(2), "slide_path": np.array(paths, object)},
        _settings(min_tissue=0),
    )
    rows = {k: v[:3] for k, v in rows.items()}  # unreadable.svs's one tile and two CMU tiles
    out = read_tile_batch(rows, input_size=64, read_magnification=5.0)
    assert list(out["status"]) == ["unreadable", "tile", "tile"]
    assert "unreadable.svs: tiles cannot be read" in out["message"][0]
    assert out["image"].shape == (3, 64, 64, 3) and out["image"].dtype == np.uint8
    assert (out["image"][0] == 0).all() and out["image"][1:].std() > 5  # real pixels


def test_actor_predicts_tile_rows_only(classification_model_file, segmentation_model_file):
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    batch = {k: np.zeros(3, np.int64) for k in META_COLUMNS}
    batch["status"] = np.array(["tile", "unreadable", "tile"], object)
    batch["image"] = images

    def predictor(path):
        return TilePredictor(load_checkpoint(path), str(path), tile_side=8, threads=1)

    out = predictor(classification_model_file)(batch)
    assert (
        "image" not in out and out["probabilities"].shape == (3, 3) and "probability_map" not in out
    )
    np.testing.assert_allclose(out["probabilities"][[0, 2]].sum(1), 1, atol=1e-5)
    assert (out["probabilities"][1] == 0).all()
    out = predictor(segmentation_model_file)(batch)
    assert (
        out["probability_map"].shape == (3, 4, 8, 8) and out["probability_map"].dtype == np.float16
    )
    np.testing.assert_allclose(out["probability_map"][0].astype(np.float32).sum(0), 1, atol=2e-3)
    np.testing.assert_allclose(
        out["probabilities"][2],
        out["probability_map"][2].astype(np.float32).mean((1, 2)),
        atol=2e-3,
    )


def test_actor_applies_the_model_files_stain_normalisation(tmp_path, save_task_model):
    """A model fine-tuned with --stain-norm macenko records its target; the actor normalises
    tiles to it before the model, as fine-tuning normalised the training images."""
    from pathlib import Path

    import torch
    from PIL import Image

    from histokd.inference.model_file import ModelFileError
    from histokd.stain import StainReference, macenko_normalize, stain_normalization

    tiles = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "tiles"
    tile = np.array(Image.open(tiles / "high-nuclei-score-level0.png").convert("RGB"))
    images = np.stack([tile[i * 64 : i * 64 + 64, 100 : 100 + 64] for i in range(3)])
    record = stain_normalization("macenko", str(tiles / "tissue-level0-4302-10273-4814-10785.png"))
    with_stain = save_task_model(tmp_path / "stain" / "best_model.pt", stain_normalization=record)
    plain = save_task_model(tmp_path / "plain" / "best_model.pt")
    actor = TilePredictor(load_checkpoint(with_stain), str(with_stain), tile_side=8, threads=1)
    assert actor.info.stain_normalization == record
    reference = TilePredictor(load_checkpoint(plain), str(plain), tile_side=8, threads=1)
    normalised = (
        macenko_normalize(
            torch.from_numpy(images).permute(0, 3, 1, 2), StainReference.from_dict(record)
        )
        .permute(0, 2, 3, 1)
        .numpy()
    )
    assert np.abs(normalised.astype(int) - images).mean() > 3  # the normalisation does something
    np.testing.assert_allclose(
        actor.predict(images)[0], reference.predict(normalised)[0], atol=1e-6
    )
    assert not np.allclose(actor.predict(images)[0], reference.predict(images)[0], atol=1e-4)
    broken = save_task_model(
        tmp_path / "broken" / "best_model.pt", stain_normalization={"method": "x"}
    )
    with pytest.raises(
        ModelFileError, match=r"broken.*config\['stain_normalization'\]=.*allowed: a macenko record"
    ):
        TilePredictor(load_checkpoint(broken), str(broken), tile_side=8, threads=1)


@pytest.mark.gpu
def test_actor_runs_on_the_gpu_in_bf16(classification_model_file):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    images = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    checkpoint = load_checkpoint(classification_model_file)
    gpu = TilePredictor(checkpoint, "m.pt", tile_side=8)
    assert gpu.device.type == "cuda" and gpu.bf16
    cpu = TilePredictor(checkpoint, "m.pt", tile_side=8, precision="fp32")
    cpu.device = torch.device("cpu")
    cpu.model = cpu.model.cpu()
    np.testing.assert_allclose(gpu.predict(images)[0], cpu.predict(images)[0], atol=0.05)
