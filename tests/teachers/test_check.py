"""jobs/check_teacher.py: a teacher measured against annotated nuclei, and its best settings kept."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histokd.teachers import DEMO_TEACHER_DIR, TeacherError, build_teacher

REPO = Path(__file__).resolve().parents[2]


def _job():
    spec = importlib.util.spec_from_file_location(
        "check_teacher_job", REPO / "jobs" / "check_teacher.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def annotated(held_out_slides, tmp_path_factory) -> Path:
    """images/ (PNG) and masks/ (instance TIFF, one binary PNG) of held-out demo tiles at 20x."""
    import tifffile

    from histokd.teachers.training import demo_slide_images

    items = demo_slide_images(held_out_slides[:1], magnification=20, tile_size=256)[:4]
    root = tmp_path_factory.mktemp("annotated")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i, item in enumerate(items):
        Image.fromarray(item.image).save(root / "images" / f"tile{i}.png")
        if i == 0:  # a binary mask works too
            Image.fromarray(((item.labels > 0) * 255).astype(np.uint8)).save(
                root / "masks" / f"tile{i}.png"
            )
        else:
            tifffile.imwrite(root / "masks" / f"tile{i}.tif", item.labels.astype(np.uint16))
    return root


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def test_demo_teacher_check(annotated, tmp_path, capsys):
    out = tmp_path / "check"
    code = _job().main(["--teacher", "demo", "--images", str(annotated / "images"), "--masks", str(annotated / "masks"),
                        "--storage-path", str(tmp_path), "--run-name", "check", "--no-use-gpu"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "pooled IoU with the true nuclei" in printed and "best: alpha" in printed
    rows = _rows(out)
    assert (
        len(rows) == 2 * 7
    )  # joint and per channel, one scale (the demo teacher's is the patches'), 7 alphas
    assert {r["normalization"] for r in rows} == {"joint", "per_channel"} and {
        r["scale"] for r in rows
    } == {"patch"}
    best = json.loads((out / "histokd_teacher.json").read_text())
    assert (
        best["alpha"] in (0.05, 0.1)
        and best["normalization"] == "joint"
        and best["check_iou"] > 0.8
    )
    joint = {float(r["alpha"]): float(r["iou"]) for r in rows if r["normalization"] == "joint"}
    assert joint[0.1] > joint[0.5] + 0.3  # alpha 0.5 marks nucleus cores only (TEACHER.md)
    assert (out / "overlay.png").stat().st_size > 10_000 and (out / "results.json").is_file()
    # the teacher's nuclei at the best alpha, as QuPath detections in the image's pixels
    from skimage.measure import label

    from histokd.annotations import read_qupath_geojson

    teacher = build_teacher("demo", device="cpu")
    teacher.normalization = best["normalization"]
    image = np.asarray(Image.open(annotated / "images" / "tile1.png").convert("RGB"))
    expected = label(teacher.probability(image[None])[0] >= best["alpha"], connectivity=1).max()
    assert sorted(p.name for p in (out / "nuclei").iterdir()) == [
        f"tile{i}.geojson" for i in range(4)
    ]
    nuclei = read_qupath_geojson(out / "nuclei" / "tile1.geojson", object_types=("detection",))
    assert len(nuclei.regions) == expected > 5 and {r.label for r in nuclei.regions} == {"nucleus"}
    assert all(0 <= r.bounds[0] and r.bounds[2] <= 256 for r in nuclei.regions)
    # The settings file drops into a model folder and the teacher labels that way
    folder = tmp_path / "teacher"
    shutil.copytree(DEMO_TEACHER_DIR, folder)
    shutil.copy(out / "histokd_teacher.json", folder / "histokd_teacher.json")
    teacher = build_teacher(str(folder), device="cpu")
    assert (teacher.alpha, teacher.normalization, teacher.teacher_mpp) == (
        best["alpha"],
        "joint",
        0.5,
    )


def test_the_teachers_own_scale_beats_a_wrong_one(annotated, tmp_path):
    """Patches at 80x (patch_mpp 0.125) for a 20x teacher: labelled there, nuclei look 4x too large and
    IoU falls; the check shows it and keeps the teacher's own scale."""
    from histokd.teachers.check import CheckConfig, check_teacher

    config = CheckConfig(teacher="demo", images=str(annotated / "images"), masks=str(annotated / "masks"),
                         storage_path=str(tmp_path), patch_mpp=0.125, use_gpu=False, alphas=(0.1,))  # fmt: skip
    result = check_teacher(config)
    iou = {(r["normalization"], r["scale"]): r["iou"] for r in result.rows}
    assert set(iou) == {(n, s) for n in ("joint", "per_channel") for s in ("teacher", "patch")}
    assert iou[("joint", "teacher")] > iou[("joint", "patch")] + 0.15, iou
    assert result.best["teacher_mpp"] == 0.5


def test_deconvolution_teacher_is_checked_by_alpha(annotated, tmp_path):
    from histokd.teachers.check import CheckConfig, check_teacher

    result = check_teacher(CheckConfig(teacher="deconvolution", images=str(annotated / "images"),
                                       masks=str(annotated / "masks"), storage_path=str(tmp_path)))  # fmt: skip
    assert len(result.rows) == 7 and {r["normalization"] for r in result.rows} == {"-"}
    assert "normalization" not in result.best and 0.2 < result.best["check_iou"] < 0.95


def test_check_counts_ties_at_alpha_as_nucleus(annotated, tmp_path):
    """The check's Eq. 2 is ``probability >= alpha``: at an alpha that the map takes exactly (the
    deconvolution teacher's value on flat glass, about a tenth of the pixels), ties are nucleus."""
    from histokd.teachers.check import CheckConfig, check_teacher
    from histokd.teachers.training import load_image_mask_pairs

    teacher = build_teacher("deconvolution")
    items = load_image_mask_pairs(str(annotated / "images"), annotated / "masks")
    prob = np.concatenate([teacher.probability(item.image[None])[0].ravel() for item in items])
    values, counts = np.unique(prob[(prob > 0) & (prob < 1)], return_counts=True)
    alpha = float(values[counts.argmax()])
    assert counts.max() / prob.size > 0.01  # enough ties to show in a 4-decimal fraction
    result = check_teacher(CheckConfig(teacher="deconvolution", images=str(annotated / "images"),
                                       masks=str(annotated / "masks"), storage_path=str(tmp_path),
                                       alphas=(alpha,)))  # fmt: skip
    (row,) = result.rows
    assert row["nucleus_fraction"] == round(float((prob >= alpha).mean()), 4)
    assert row["nucleus_fraction"] > round(float((prob > alpha).mean()), 4) + 0.01


def test_bad_input_is_one_clear_error(annotated, tmp_path, capsys):
    job = _job()
    (tmp_path / "masks").mkdir()
    code = job.main(
        [
            "--images",
            str(annotated / "images"),
            "--masks",
            str(tmp_path / "masks"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "tile0.png: no mask named tile0" in capsys.readouterr().err
    with pytest.raises(TeacherError, match="mpp=0: must be a pixel size"):
        from histokd.teachers.check import CheckConfig

        CheckConfig(images="a", masks="b", mpp=0)


@pytest.fixture(scope="module")
def tiny_teachers(tmp_path_factory) -> dict[str, Path]:
    """Two tiny StarDist teachers trained the same way but for the normalisation (~20 s each)."""
    from histokd.teachers.training import TeacherTrainingConfig, train_teacher

    out = tmp_path_factory.mktemp("tiny_teachers")
    folders = {}
    for normalization in ("joint", "per_channel"):
        config = TeacherTrainingConfig(
            storage_path=str(out), run_name=f"tiny_{normalization}", demo_slides=2, demo_slide_size=768, tile_size=256,
            patch_size=64, unet_n_depth=2, unet_n_filter_base=8, net_conv_after_unet=16, epochs=8, steps_per_epoch=20,
            lr=1e-3, batch_size=4, optimize_nms=False, use_gpu=False, command=["test"],
            normalization=normalization, demo_dir=str(out / "slides"),
        )  # fmt: skip
        folders[normalization] = train_teacher(config).model_dir
    return folders


def _best_by_normalization(teacher: Path, images: Path, masks: Path, out: Path) -> dict[str, float]:
    from histokd.teachers.check import CheckConfig, check_teacher

    result = check_teacher(
        CheckConfig(
            teacher=str(teacher),
            images=str(images),
            masks=str(masks),
            storage_path=str(out.parent),
            run_name=out.name,
            use_gpu=False,
        )
    )
    best: dict[str, float] = {}
    for row in result.rows:
        best[row["normalization"]] = max(best.get(row["normalization"], 0.0), row["iou"])
    assert result.best["normalization"] == max(best, key=best.get)  # the file keeps the winner
    return best


@pytest.mark.slow
def test_check_finds_how_each_tiny_teacher_was_trained(tiny_teachers, annotated, tmp_path):
    """Trained jointly: joint normalisation wins on the annotated tiles. Trained per channel: on the
    same tiles from a scanner with another colour response (each channel scaled and offset), per
    channel wins, and by as much as that normalisation undoes the scanner (its IoU stays put)."""
    for normalization, folder in tiny_teachers.items():
        stored = json.loads((folder / "histokd_teacher.json").read_text())
        assert (
            stored["normalization"] == normalization
            and build_teacher(str(folder)).normalization == normalization
        )
    joint = _best_by_normalization(
        tiny_teachers["joint"], annotated / "images", annotated / "masks", tmp_path / "a"
    )
    assert joint["joint"] > joint["per_channel"] + 0.1, joint
    scanner = tmp_path / "scanner"
    scanner.mkdir()
    for path in sorted((annotated / "images").glob("*.png")):
        image = np.asarray(Image.open(path)).astype(np.float32) * [0.3, 0.5, 1.0] + [170, 40, 0]
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(scanner / path.name)
    per_channel = _best_by_normalization(
        tiny_teachers["per_channel"], scanner, annotated / "masks", tmp_path / "b"
    )
    assert per_channel["per_channel"] > per_channel["joint"] + 0.2, per_channel
    as_scanned = _best_by_normalization(
        tiny_teachers["per_channel"], annotated / "images", annotated / "masks", tmp_path / "c"
    )
    assert abs(as_scanned["per_channel"] - per_channel["per_channel"]) < 0.03, (
        as_scanned,
        per_channel,
    )
