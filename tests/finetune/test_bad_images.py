"""Unreadable images never kill a fine-tuning job: they are checked on the driver, skipped,
listed in bad_images.csv and counted; only an unusable remainder stops the job."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histokd.finetune import FinetuneConfig, run_finetune
from histokd.finetune.datasets import check_task_dataset, load_task_dataset


def _with_bad_files(source: Path, dest: Path) -> tuple[Path, list[str]]:
    """A copy of the 36-image demo task with a truncated PNG and a text file named .png added."""
    shutil.copytree(source, dest)
    first = sorted((dest / "tumor").glob("*.png"))[0]
    data = first.read_bytes()
    truncated = dest / "tumor" / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    text = dest / "stroma" / "notes.png"
    text.write_text("this is not an image\n")
    return dest, sorted([str(truncated), str(text)])


def test_a_run_with_unreadable_images_finishes_and_lists_them(
    ray_cluster, tmp_path, demo_tasks_small, capsys
):
    data, bad = _with_bad_files(demo_tasks_small.classification_dir, tmp_path / "data")
    config = FinetuneConfig(
        data=str(data), storage_path=str(tmp_path / "runs"), run_name="bad", input_size=32, batch_size=16,
        epochs=1, patience=5, lr=0.05, num_splits=1, num_workers=0, bootstrap_resamples=100,
        max_bad_fraction=0.1,
    )  # fmt: skip
    result = run_finetune(config, tracking=False)
    run_dir = Path(result.run_dir)
    rows = list(csv.DictReader(open(run_dir / "bad_images.csv")))
    assert sorted(r["path"] for r in rows) == bad
    reasons = {Path(r["path"]).name: r["reason"] for r in rows}
    assert "Truncated" in reasons["truncated.png"]
    assert "cannot identify image file" in reasons["notes.png"]
    out = capsys.readouterr().out
    assert f"{data}: checked 38 images in " in out
    assert "2 unreadable, 2 of 38 samples skipped" in out
    # trained and tested on the 36 good images only (stratified 6:2:2)
    assert result.split_results[0]["sizes"] == {"train": 22, "val": 7, "test": 7}
    images = json.loads((run_dir / "splits.json").read_text())["images"]
    assert len(images) == 36 and not set(bad) & set(images)


def test_too_many_unreadable_images_stop_the_job_with_one_error(tmp_path, demo_tasks_small):
    data, bad = _with_bad_files(demo_tasks_small.classification_dir, tmp_path / "data")
    config = FinetuneConfig(data=str(data), storage_path=str(tmp_path / "runs"), run_name="bad")
    assert config.max_bad_fraction == 0.01  # the default: 1 %
    with pytest.raises(ValueError) as error:
        run_finetune(config, tracking=False)
    message = str(error.value)
    assert message.startswith(f"{data}: 2 of 38 samples (5.3%) have unreadable images")
    assert "max_bad_fraction=0.01" in message and "\n" not in message
    listed = tmp_path / "runs" / "bad" / "bad_images.csv"
    assert sorted(r["path"] for r in csv.DictReader(open(listed))) == bad


def test_a_single_class_dataset_is_refused(tmp_path, demo_tasks_small):
    data = tmp_path / "one_class"
    shutil.copytree(demo_tasks_small.classification_dir / "tumor", data / "tumor")
    config = FinetuneConfig(data=str(data), storage_path=str(tmp_path / "runs"), run_name="one")
    with pytest.raises(ValueError, match=rf"^{data}: a single class, 'tumor' \(12 samples\)"):
        run_finetune(config, tracking=False)


def test_a_class_left_without_readable_images_is_refused(tmp_path, demo_tasks_small):
    data = tmp_path / "data"
    shutil.copytree(demo_tasks_small.classification_dir / "tumor", data / "tumor")
    (data / "stroma").mkdir()
    (data / "stroma" / "a.png").write_text("not an image")
    dataset = load_task_dataset(data, "classification")
    assert dataset.class_names == ("stroma", "tumor")
    with pytest.raises(ValueError, match=r"a single class, 'tumor' \(12 samples\)"):
        check_task_dataset(dataset, max_bad_fraction=0.5, report_dir=tmp_path / "run")


def test_a_fixed_split_left_empty_is_refused(tmp_path, demo_tasks_small):
    data = tmp_path / "data"
    for name in ("tumor", "stroma"):
        shutil.copytree(demo_tasks_small.classification_dir / name, data / "train" / name)
        (data / "test" / name).mkdir(parents=True)
        (data / "test" / name / "x.png").write_text("not an image")
    dataset = load_task_dataset(data, "classification")
    with pytest.raises(ValueError, match="split 'test' has no usable sample left"):
        check_task_dataset(dataset, max_bad_fraction=0.5, report_dir=tmp_path / "run")


def test_segmentation_pairs_with_a_bad_mask_are_skipped(tmp_path, demo_tasks_small):
    data = tmp_path / "seg"
    shutil.copytree(demo_tasks_small.segmentation_dir, data)
    dataset = load_task_dataset(data, "segmentation")
    masks = sorted((data / "masks").glob("*.png"))
    rgb = np.zeros((8, 8, 3), np.uint8)
    Image.fromarray(rgb).save(masks[0])  # a colour image where a class-index mask belongs
    masks[1].write_bytes(masks[1].read_bytes()[:40])  # a truncated mask
    checked = check_task_dataset(dataset, max_bad_fraction=0.5, report_dir=tmp_path / "run")
    assert len(checked) == len(dataset) - 2
    assert not {str(m) for m in masks[:2]} & set(checked.masks)
    assert checked.images == [i for i, m in zip(dataset.images, dataset.masks, strict=True)
                              if m not in {str(m) for m in masks[:2]}]  # fmt: skip
    rows = {
        r["path"]: r["reason"] for r in csv.DictReader(open(tmp_path / "run" / "bad_images.csv"))
    }
    assert rows.keys() == {str(m) for m in masks[:2]}
    assert "mode RGB" in rows[str(masks[0])]


@pytest.mark.parametrize("value", [-0.1, 1.5, "0.1", True])
def test_max_bad_fraction_is_checked(tmp_path, value):
    with pytest.raises(ValueError, match=rf"max_bad_fraction={value!r}: must be in \[0, 1\]"):
        FinetuneConfig(storage_path=str(tmp_path), max_bad_fraction=value)


def test_search_and_comparison_take_the_flag(tmp_path):
    from histokd.cli import parse_config
    from histokd.finetune.compare import CompareConfig
    from histokd.finetune.search import SearchConfig

    for cls in (SearchConfig, CompareConfig):
        config = parse_config(cls, ["--storage-path", str(tmp_path), "--max-bad-fraction", "0.05"])
        assert config.finetune.max_bad_fraction == 0.05, cls
