"""Feature export: the h5 layout read back, features against the backbone run directly, reruns
skip finished slides, a corrupt slide is reported and the others done (real Ray, real files)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("h5py")

MPP, PATCH = 1.0, 64  # 64 px patches at 1 um/px: 128 level-0 px of a 0.5 um/px slide


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory) -> Path:
    """A pretraining run folder's backbone.pth and config.yaml (resnet18, seeded weights)."""
    import torch

    from histokd.models import create_backbone, save_backbone

    folder = tmp_path_factory.mktemp("pretrain_run")
    torch.manual_seed(3)
    path = save_backbone(create_backbone("resnet18"), folder / "backbone.pth")
    (folder / "config.yaml").write_text("backbone: resnet18\n")
    return path


@pytest.fixture(scope="module")
def slide_folder(tmp_path_factory, testdata) -> Path:
    """Two small demo slides, one real H&E slide, and a corrupt file."""
    from histokd.demos.synthetic import make_demo_slides

    folder = tmp_path_factory.mktemp("extract_slides")
    make_demo_slides(folder, n=2, seed=21, width=768, height=768)
    (folder / "real").mkdir()
    shutil.copy(testdata / "slides" / "cmu-1-small-region.svs", folder / "real")
    (folder / "corrupt.svs").write_bytes(b"II*\x00" + b"\x17" * 4000)
    return folder


def test_extract_layout_features_rerun_and_bad_slide(
    ray_cluster, tmp_path, backbone_file, slide_folder, capsys
):
    import h5py
    import torch

    from histokd.features import ExtractConfig, run_extraction
    from histokd.features.extract import encode_patches, load_encoder
    from histokd.manifest import PatchReader
    from histokd.slides import SlideReader

    config = ExtractConfig(
        backbone=str(backbone_file), slides=[str(slide_folder)], mpp=MPP, patch_size=PATCH,
        batch_size=32, storage_path=str(tmp_path / "runs"), output=str(tmp_path / "out"),
    )  # fmt: skip
    result = run_extraction(config)
    out = capsys.readouterr().out

    # the corrupt slide: on the console, in bad_slides.csv; the three others done
    corrupt = str(slide_folder / "corrupt.svs")
    assert list(result.bad_slides) == [corrupt]
    assert "bad slide, skipped" in out and "corrupt.svs" in out
    rows = list(csv.DictReader(open(result.report["bad_slides"])))
    assert [r["slide_path"] for r in rows] == [corrupt] and rows[0]["status"] == "skipped"
    assert result.num_extracted == 3 and result.num_skipped == 0
    assert sorted(result.files) == ["cmu-1-small-region", "demo-s21-000", "demo-s21-001"]
    sha = __import__("histokd.resume", fromlist=["x"]).file_sha256(backbone_file)[:8]
    assert Path(result.features_dir) == tmp_path / "out" / f"features_resnet18-{sha}" / "h5_files"

    encoder, arch, kind = load_encoder(str(backbone_file))
    assert (arch, kind) == ("resnet18", "backbone")
    total = 0
    for name, path in result.files.items():
        with h5py.File(path, "r") as f:
            feats, coords = f["features"][:], f["coords"][:]
            attrs, file_attrs = dict(f["coords"].attrs), dict(f.attrs)
            slide_path = file_attrs["slide_path"]
        with SlideReader(slide_path) as reader:
            width, height = reader.info.dimensions
            base_mpp = reader.info.mpp_x
        extent = round(PATCH * MPP / base_mpp)
        assert feats.dtype == np.float32 and feats.shape == (len(coords), 512) and len(coords) > 0
        assert coords.dtype == np.int64 and coords.shape[1] == 2
        assert np.all(coords % extent == 0), name  # on the grid
        assert np.all(coords >= 0) and np.all(coords[:, 0] + extent <= width)
        assert np.all(coords[:, 1] + extent <= height)
        assert len(np.unique(coords, axis=0)) == len(coords)
        assert attrs["patch_size"] == PATCH and attrs["patch_size_level0"] == extent
        assert attrs["target_magnification"] == pytest.approx(10.0)
        assert attrs["level0_magnification"] == pytest.approx(10.0 / base_mpp)
        assert attrs["level0_mpp"] == pytest.approx(base_mpp)
        assert attrs["target_mpp"] == pytest.approx(MPP, rel=0.02)
        assert attrs["name"] == name and list(attrs["level_dim"]) == [width, height]
        assert file_attrs["arch"] == "resnet18" and file_attrs["feature_dim"] == 512
        total += len(coords)
        # one patch, read as pretraining reads it, through the backbone directly
        k = len(coords) // 2
        image = PatchReader().read({
            "slide_path": slide_path, "base_magnification": 10.0 / base_mpp, "x": int(coords[k, 0]),
            "y": int(coords[k, 1]), "patch_size": PATCH, "magnification": 10.0 / MPP,
        })  # fmt: skip
        direct = encode_patches(encoder, image[None])[0]
        np.testing.assert_allclose(feats[k], direct, rtol=1e-4, atol=1e-4)
        assert np.abs(direct).sum() > 0
    assert result.num_patches == total
    # the demo slides are 768 px at 0.5 um/px: at most 6 x 6 cells each
    with h5py.File(result.files["demo-s21-000"], "r") as f:
        assert 1 <= len(f["coords"]) <= 36

    # the counts are the MLflow run's metrics
    from mlflow import MlflowClient

    metrics = MlflowClient(config.tracking_uri).get_run(result.mlflow_run_id).data.metrics
    assert metrics["num_extracted"] == 3 and metrics["num_bad"] == 1
    assert metrics["num_patches"] == total and metrics["feature_dim"] == 512

    # a rerun skips the finished slides: their files are untouched
    mtimes = {n: Path(p).stat().st_mtime_ns for n, p in result.files.items()}
    again = run_extraction(config)
    assert again.num_skipped == 3 and again.num_extracted == 0 and again.num_patches == 0
    assert {n: Path(p).stat().st_mtime_ns for n, p in again.files.items()} == mtimes
    assert list(again.bad_slides) == [corrupt]
    del torch


def test_load_encoder_errors_name_the_file(tmp_path, backbone_file):
    import torch

    from histokd.features.extract import load_encoder

    with pytest.raises(ValueError, match=r"backbone=.*not a csat backbone file"):
        load_encoder(str(backbone_file), "csat")
    junk = tmp_path / "junk.pth"
    torch.save({"a.weight": torch.zeros(3)}, junk)
    with pytest.raises(ValueError, match=r"junk.pth.*fit none of .*--arch"):
        load_encoder(str(junk))


def test_task_model_file_gives_its_backbone(tmp_path):
    """A fine-tuning best_model.pt is accepted: the encoder holds the task model's backbone."""
    import torch

    from histokd.cli import config_to_dict
    from histokd.features.extract import encode_patches, load_encoder
    from histokd.finetune import FinetuneConfig
    from histokd.finetune.loop import build_task_model

    torch.manual_seed(7)
    model = build_task_model("classification", "resnet18", 2).eval()
    config = config_to_dict(
        FinetuneConfig(task="classification", backbone="resnet18", input_size=64)
    )
    config.update(num_classes=2, class_names=["a", "b"], split_index=0)
    path = tmp_path / "best_model.pt"
    torch.save({"model": model.state_dict(), "best_epoch": 1, "config": config}, path)
    encoder, arch, kind = load_encoder(str(path))
    assert (arch, kind) == ("resnet18", "task model")
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        expected = model.forward_features(x).mean((2, 3)).numpy()
    np.testing.assert_allclose(encode_patches(encoder, images), expected, rtol=1e-5, atol=1e-5)
