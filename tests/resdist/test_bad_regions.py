"""Region images that cannot be read are skipped on the driver, listed and counted; only an
unusable remainder (too many bad, one class, an empty split) stops a resolution-KD job."""

from __future__ import annotations

import csv
import dataclasses
import shutil

import pytest

from histokd.resdist.region_set import RegionSet, check_region_set


@pytest.fixture
def region_copy(tiny_demo, tmp_path) -> RegionSet:
    """A copy of the tiny demo's region set, free to damage."""
    shutil.copytree(tiny_demo["region_set"].root, tmp_path / "regions")
    return RegionSet.load(tmp_path / "regions")


def _damage(region_set: RegionSet) -> tuple[list[str], list[str]]:
    """Truncate one train region's 2.5x image and overwrite another's 1.25x image with text."""
    first, second = region_set.select(["train"], labelled=True)[:2]
    truncated = region_set.image_path(first.region_id, 2.5)
    truncated.write_bytes(truncated.read_bytes()[:100])
    text = region_set.image_path(second.region_id, 1.25)
    text.write_text("not an image")
    return [first.region_id, second.region_id], sorted([str(truncated), str(text)])


def test_regions_with_an_unreadable_image_are_skipped_and_listed(region_copy, tmp_path, capsys):
    ids, bad = _damage(region_copy)
    total = len(region_copy.records)
    checked = check_region_set(region_copy, max_bad_fraction=0.5, report_dir=tmp_path / "run")
    assert len(checked.records) == total - 2
    assert not set(ids) & {r.region_id for r in checked.records}
    assert checked.class_names == region_copy.class_names and checked.root == region_copy.root
    rows = list(csv.DictReader(open(tmp_path / "run" / "bad_images.csv")))
    assert sorted(r["path"] for r in rows) == bad
    out = capsys.readouterr().out
    assert f"region set {region_copy.root}: checked {3 * total} images in " in out
    assert f"2 unreadable, 2 of {total} samples skipped" in out
    with pytest.raises(
        ValueError, match=rf"2 of {total} samples .* more than max_bad_fraction=0.01"
    ):
        check_region_set(region_copy, max_bad_fraction=0.01, report_dir=tmp_path / "run")


def test_the_job_checks_its_region_set_into_its_run_folder(tiny_demo, region_copy, tmp_path):
    from histokd.resdist.config import SupervisedConfig
    from histokd.resdist.job import prepare_region_set

    _, bad = _damage(region_copy)
    config = SupervisedConfig(
        data=str(tiny_demo["table"]), storage_path=str(tmp_path / "runs"), region_dir=str(region_copy.root),
        magnifications=tiny_demo["magnifications"], min_region_area_um2=5000.0, run_name="teacher",
        num_workers=0, max_bad_fraction=0.5,
    )  # fmt: skip
    region_set = prepare_region_set(config)  # the set is reused (same inputs), then checked
    assert len(region_set.records) == len(region_copy.records) - 2
    rows = list(csv.DictReader(open(tmp_path / "runs" / "teacher" / "bad_images.csv")))
    assert sorted(r["path"] for r in rows) == bad
    with pytest.raises(ValueError, match=r"max_bad_fraction=2: must be in \[0, 1\]"):
        dataclasses.replace(config, max_bad_fraction=2)


def test_a_single_class_region_set_is_refused(region_copy, tmp_path):
    records = [dataclasses.replace(r, label=1 if r.label >= 0 else -1) for r in region_copy.records]
    single = RegionSet(
        region_copy.root, region_copy.class_names, region_copy.magnifications, records
    )
    labelled = sum(r.label == 1 and r.split != "aux" for r in records)
    with pytest.raises(
        ValueError, match=rf"region set .*: a single class, 'stroma' \({labelled} samples\)"
    ):
        check_region_set(single, max_bad_fraction=0.01, report_dir=tmp_path)


def test_a_split_left_empty_is_refused(region_copy, tmp_path):
    for record in region_copy.select(["val"]):
        region_copy.image_path(record.region_id, 10.0).write_text("gone")
    with pytest.raises(ValueError, match="split 'val' has no usable sample left"):
        check_region_set(region_copy, max_bad_fraction=1.0, report_dir=tmp_path)
