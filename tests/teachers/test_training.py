"""Teacher training: MoNuSeg-like folders, demo slides, the split, and a tiny real StarDist run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from histokd.teachers import TeacherError, build_teacher
from histokd.teachers.training import (
    InstanceImage,
    TeacherTrainingConfig,
    _split,
    demo_slide_images,
    load_instance_folder,
    read_monuseg_xml,
    train_teacher,
)

MONUSEG_XML = """<?xml version="1.0"?>
<Annotations><Annotation Id="1"><Regions>
  <Region Id="1"><Vertices><Vertex X="2" Y="2"/><Vertex X="10" Y="2"/><Vertex X="10" Y="10"/><Vertex X="2" Y="10"/></Vertices></Region>
  <Region Id="2"><Vertices><Vertex X="20" Y="20"/><Vertex X="30" Y="20"/><Vertex X="25" Y="30"/></Vertices></Region>
</Regions></Annotation></Annotations>
"""


def test_monuseg_xml(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(MONUSEG_XML)
    labels = read_monuseg_xml(path, (40, 40))
    assert labels.dtype == np.int32 and set(np.unique(labels)) == {0, 1, 2}
    assert labels[5, 5] == 1 and labels[22, 25] == 2 and labels[35, 35] == 0
    (tmp_path / "b.xml").write_text("<Annotations/>")
    with pytest.raises(TeacherError, match="b.xml: no Region"):
        read_monuseg_xml(tmp_path / "b.xml", (8, 8))


def test_images_and_masks_folder_rescaled_to_20x(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    image = np.full((64, 48, 3), 200, np.uint8)
    mask = np.zeros((64, 48), np.uint16)
    mask[10:20, 10:20] = 7
    Image.fromarray(image).save(tmp_path / "images" / "x.png")
    tifffile.imwrite(tmp_path / "masks" / "x.tif", mask)
    items = load_instance_folder(tmp_path, data_magnification=40, magnification=20)
    assert len(items) == 1
    assert items[0].image.shape == (32, 24, 3) and items[0].labels.shape == (32, 24)
    assert set(np.unique(items[0].labels)) == {0, 7}
    assert items[0].source.endswith("x.png")


def test_monuseg_original_layout(tmp_path):
    (tmp_path / "Tissue Images").mkdir()
    (tmp_path / "Annotations").mkdir()
    tifffile.imwrite(tmp_path / "Tissue Images" / "TCGA-1.tif", np.full((40, 40, 3), 180, np.uint8))
    (tmp_path / "Annotations" / "TCGA-1.xml").write_text(MONUSEG_XML)
    items = load_instance_folder(tmp_path, data_magnification=20, magnification=20)
    assert items[0].labels.max() == 2


def test_bad_folders_are_clear(tmp_path):
    with pytest.raises(TeacherError, match="not a MoNuSeg-like dataset"):
        load_instance_folder(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "lonely.png")
    with pytest.raises(TeacherError, match=r"lonely.png: no mask named lonely\.\("):
        load_instance_folder(tmp_path)
    np.save(tmp_path / "masks" / "lonely.npy", np.zeros((9, 8), np.int32))
    with pytest.raises(
        TeacherError, match=r"mask shape \(9, 8\) differs from image shape \(8, 8\)"
    ):
        load_instance_folder(tmp_path)


def test_split_holds_out_whole_sources():
    items = [
        InstanceImage(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.int32), f"slide{i % 4}")
        for i in range(16)
    ]
    train, val = _split(items, 0.25, seed=0)
    assert len(val) == 4 and len({i.source for i in val}) == 1
    assert not {i.source for i in val} & {i.source for i in train}


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("patch_size", 100, "patch_size=100: must be a multiple of grid"),
        ("epochs", 0, "epochs=0: must be a positive integer"),
        ("device", "tpu", "device='tpu': allowed: cpu, cuda, gpu, auto"),
        ("run_name", "a/b", "run_name='a/b': must be 1-128 characters"),
        ("validation_fraction", 1.0, r"validation_fraction=1.0: must be in \(0, 1\)"),
        ("demo_slides", 0, "no training data"),
        ("normalization", "rgb", "normalization='rgb': allowed: joint, per_channel"),
    ],
)
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        TeacherTrainingConfig(**{field: value})


def test_demo_slide_tiles_match_their_truth(held_out_slides):
    items = demo_slide_images(held_out_slides[:1], magnification=20, tile_size=256)
    assert items and all(i.image.shape == (256, 256, 3) and i.labels.max() > 0 for i in items)
    # nuclei are darker than the rest of the tile
    item = items[0]
    assert item.image[item.labels > 0].mean() < item.image[item.labels == 0].mean() - 30


@pytest.mark.slow
def test_tiny_training_run_makes_a_loadable_teacher(tmp_path):
    """A real StarDist2D training (1 epoch, a few steps): the folder loads as a teacher."""
    config = TeacherTrainingConfig(
        storage_path=str(tmp_path), run_name="tiny", demo_slides=2, demo_slide_size=512, tile_size=256, patch_size=64,
        unet_n_depth=2, unet_n_filter_base=8, net_conv_after_unet=16, epochs=1, steps_per_epoch=3,
        batch_size=2, optimize_nms=False, use_gpu=False, command=["test"],
    )  # fmt: skip
    result = train_teacher(config)
    files = {p.name for p in result.model_dir.iterdir()}
    assert files == {"config.json", "thresholds.json", "weights_best.h5", "histokd_teacher.json"}
    defaults = json.loads((result.model_dir / "histokd_teacher.json").read_text())
    assert defaults["alpha"] == result.alpha and set(defaults["validation_iou_by_alpha"]) >= {
        "0.1",
        "0.5",
    }
    assert defaults["command"] == ["test"] and defaults["training"]["epochs"] == 1
    # how it was trained, so that it labels the same way (issue 15): 20x tiles, joint normalisation
    assert (defaults["teacher_mpp"], defaults["normalization"], defaults["percentiles"]) == (
        0.5,
        "joint",
        [1.0, 99.8],
    )
    teacher = build_teacher(str(result.model_dir))
    assert teacher.alpha == result.alpha and teacher.grid == (2, 2)
    assert teacher.pseudo_label(np.zeros((1, 48, 48, 3), np.uint8)).shape == (1, 48, 48)
    with pytest.raises(TeacherError, match="model folder exists; pass overwrite=True"):
        train_teacher(config)


def _monuseg_like_folder(root, n_images: int = 4, side: int = 256):
    """images/ (PNG) + masks/ (uint16 TIFF and .npy) cut from a 40x demo slide, where nuclei are
    twice as wide in pixels as at the 20x the teacher trains at; the most crowded tiles first."""
    import openslide

    from histokd.demos.synthetic import make_demo_slides

    slide = make_demo_slides(
        root / "slide", n=1, seed=11, width=3 * side, height=3 * side, mpp=0.25
    )[0]
    assert slide.magnification == 40
    tiles = [(x, y) for y in range(0, 3 * side, side) for x in range(0, 3 * side, side)]
    tiles.sort(key=lambda xy: -len(np.unique(slide.read_truth(*xy, side, side))))
    folder = root / "monuseg"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    with openslide.OpenSlide(slide.slide_path) as reader:
        for i, (x, y) in enumerate(tiles[:n_images]):
            labels = slide.read_truth(x, y, side, side)
            assert labels.max() > 0
            _, labels = np.unique(labels, return_inverse=True)  # 0 stays background, ids 1..n
            labels = labels.reshape(side, side).astype(np.uint16)
            image = np.asarray(reader.read_region((x, y), 0, (side, side)).convert("RGB"))
            Image.fromarray(image).save(folder / "images" / f"tile{i}.png")
            if i % 2:
                np.save(folder / "masks" / f"tile{i}.npy", labels.astype(np.int32))
            else:
                tifffile.imwrite(folder / "masks" / f"tile{i}.tif", labels)
    return folder


def _train_teacher_job():
    """jobs/train_teacher.py as a module (its ``main(argv)`` is what the command line runs)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "jobs" / "train_teacher.py"
    spec = importlib.util.spec_from_file_location("train_teacher_job", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_training_from_a_data_folder_without_demo_slides(tmp_path, capsys):
    """The job trained on a MoNuSeg-like --data folder alone (--demo-slides 0): 4 images at 40x,
    one held out, brought to 20x; the model folder loads as a teacher."""
    folder = _monuseg_like_folder(tmp_path)
    out_dir = tmp_path / "out"
    argv = [
        "--data", str(folder), "--data-magnification", "40", "--demo-slides", "0",
        "--storage-path", str(out_dir), "--run-name", "tiny_monuseg", "--patch-size", "64", "--unet-n-depth", "2",
        "--unet-n-filter-base", "8", "--net-conv-after-unet", "16", "--epochs", "1", "--steps-per-epoch", "3",
        "--batch-size", "2", "--no-optimize-nms", "--no-use-gpu",
    ]  # fmt: skip
    assert _train_teacher_job().main(argv) == 0
    assert "(3 train / 1 held-out images" in capsys.readouterr().out
    model_dir = out_dir / "tiny_monuseg"
    assert {p.name for p in out_dir.iterdir()} == {"tiny_monuseg"}  # no demo slides were written
    assert (model_dir / "logs" / "driver.log").is_file()  # the job's full log, beside the model
    assert _train_teacher_job().main(argv) == 2  # a model is there: only --overwrite replaces it
    assert "model folder exists" in capsys.readouterr().err
    defaults = json.loads((model_dir / "histokd_teacher.json").read_text())
    assert defaults["num_train_images"] == 3 and defaults["num_validation_images"] == 1
    images = sorted(str(p) for p in (folder / "images").iterdir())
    assert len(defaults["validation_sources"]) == 1 and defaults["validation_sources"][0] in images
    assert defaults["training"]["demo_slides"] == 0 and defaults["training"]["data"] == [
        str(folder)
    ]
    assert (
        defaults["command"][:2] == ["python", "jobs/train_teacher.py"]
        and defaults["command"][2:] == argv
    )

    teacher = build_teacher(str(model_dir))
    assert teacher.alpha == defaults["alpha"] and teacher.grid == (2, 2)
    patch = np.asarray(Image.open(images[0]))[:96, :80][
        None
    ]  # any size, not a multiple of the grid
    labels = teacher.pseudo_label(patch)
    assert (
        labels.shape == (1, 96, 80)
        and labels.dtype == np.uint8
        and set(np.unique(labels)) <= {0, 1}
    )
    # the training images were 128 px: what the held-out IoU was measured on is 20x
    items = load_instance_folder(folder, data_magnification=40, magnification=20)
    assert [i.image.shape for i in items] == [(128, 128, 3)] * 4 and all(
        i.labels.max() > 0 for i in items
    )
