"""The data table and the region set built from it."""

from __future__ import annotations

import csv
import time

import numpy as np
import pytest
from PIL import Image

from histokd.resdist.region_set import RegionSet, build_region_set, read_data_table
from histokd.resdist.regions import RegionFinder
from histokd.slides import SlideError


def _write(path, rows, fields=("slide", "split", "label")):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_demo_region_set(tiny_demo):
    region_set: RegionSet = tiny_demo["region_set"]
    assert region_set.class_names == ("lymphocyte", "stroma", "tumor")
    assert region_set.magnifications == (10.0, 2.5, 1.25)
    counts = region_set.counts()
    assert set(counts) == {"train", "val", "test", "aux"}
    assert counts["aux"] == {
        "unlabelled": len(region_set.select(["aux"]))
    }  # aux labels are not kept
    # every region has an image at every magnification, of the size its box gives
    from histokd.resdist.dataset import load_rgb
    from histokd.resdist.regions import TissueRegion

    for record in region_set.records:
        for mag in region_set.magnifications:
            image = load_rgb(str(region_set.image_path(record.region_id, mag)))
            box = TissueRegion(
                record.slide,
                0,
                record.x,
                record.y,
                record.width,
                record.height,
                record.base_magnification,
            )
            assert (image.shape[1], image.shape[0]) == box.size_at(mag)
    items = region_set.items(["train"], [10.0, 1.25], labelled=True)
    assert items and set(items[0]["paths"]) == {"10x", "1.25x"}
    assert all(item["label"] >= 0 for item in items)
    with pytest.raises(ValueError, match="5x"):
        region_set.items(["train"], [5.0])
    with pytest.raises(ValueError, match="splits"):
        region_set.select(["dev"])


def test_same_inputs_reuse_the_set(tiny_demo):
    region_set = tiny_demo["region_set"]
    started = time.monotonic()
    again = build_region_set(
        tiny_demo["table"], region_set.root, [10.0, 2.5, 1.25], RegionFinder(min_area_um2=5000.0)
    )
    assert time.monotonic() - started < 2.0  # nothing was re-read
    assert [r.region_id for r in again.records] == [r.region_id for r in region_set.records]


def test_regions_found_when_no_box_is_given(tiny_demo, tmp_path):
    rows = list(csv.DictReader(open(tiny_demo["table"])))
    slides = sorted({r["slide"] for r in rows if r["split"] == "train"})[:2]
    table = _write(tmp_path / "slides.csv", [
        {"slide": str(tiny_demo["table"].parent / slides[0]), "split": "train", "label": "tumor"},
        {"slide": str(tiny_demo["table"].parent / slides[1]), "split": "test", "label": "stroma"},
    ])  # fmt: skip
    region_set = build_region_set(
        table,
        tmp_path / "set",
        [2.5],
        RegionFinder(min_area_um2=5000.0),
        class_names=["stroma", "tumor"],
    )
    assert region_set.class_names == ("stroma", "tumor")
    train, test = region_set.select(["train"]), region_set.select(["test"])
    assert train and test
    assert {r.label for r in train} == {1} and {r.label for r in test} == {
        0
    }  # slide labels go to every region


def test_data_table_errors_name_the_line(tmp_path, tiny_demo):
    slide = str(tiny_demo["region_set"].records[0].slide)
    with pytest.raises(ValueError, match="no such CSV"):
        read_data_table(tmp_path / "missing.csv")
    bad_split = _write(tmp_path / "a.csv", [{"slide": slide, "split": "dev", "label": "tumor"}])
    with pytest.raises(ValueError, match=r"line 2: split='dev'"):
        read_data_table(bad_split)
    no_split = _write(
        tmp_path / "b.csv", [{"slide": slide, "label": "tumor"}], fields=("slide", "label")
    )
    with pytest.raises(ValueError, match="column 'split' missing"):
        read_data_table(no_split)
    bad_label = _write(tmp_path / "c.csv", [{"slide": slide, "split": "train", "label": "tumour"}])
    with pytest.raises(ValueError, match="label='tumour' is not a class"):
        read_data_table(bad_label, class_names=["stroma", "tumor"])
    partial = _write(
        tmp_path / "d.csv",
        [{"slide": slide, "split": "train", "label": "x", "x": 1}],
        fields=("slide", "split", "label", "x"),
    )
    with pytest.raises(ValueError, match="all of"):
        read_data_table(partial)
    bad_box = _write(tmp_path / "e.csv", [{"slide": slide, "split": "train", "label": "x", "x": 0, "y": 0, "width": 0, "height": 5}],
                     fields=("slide", "split", "label", "x", "y", "width", "height"))  # fmt: skip
    with pytest.raises(ValueError, match="line 2: box"):
        read_data_table(bad_box)
    two_splits = _write(
        tmp_path / "f.csv",
        [
            {"slide": slide, "split": "train", "label": "a"},
            {"slide": slide, "split": "test", "label": "a"},
        ],
    )
    with pytest.raises(ValueError, match="several splits"):
        build_region_set(two_splits, tmp_path / "f", [1.25])


def test_a_slide_without_a_pixel_size_takes_the_tables_mpp(testdata, tmp_path):
    """The real TCGA slide records no MPP and no objective power: it is refused until the table
    gives its ``mpp`` (0.25: a 40x scan), then its regions are read at 10x as 4x-down images.
    A bad value names the line."""
    slide = str(testdata / "slides" / "tcga-cr-7395-01a-01-ts1.svs")
    box = {"x": 0, "y": 0, "width": 2048, "height": 2048}
    fields = ("slide", "split", "label", "x", "y", "width", "height", "mpp")
    without = _write(tmp_path / "a.csv", [{"slide": slide, "split": "train", "label": "t", **box}], fields=fields)  # fmt: skip
    with pytest.raises(SlideError, match="tcga-cr-7395.*assume"):
        build_region_set(without, tmp_path / "a", [10.0])
    rows = [{"slide": slide, "split": "train", "label": "t", "mpp": "0.25", **box}]
    region_set = build_region_set(
        _write(tmp_path / "b.csv", rows, fields=fields), tmp_path / "b", [10.0]
    )
    (record,) = region_set.records
    assert record.base_magnification == pytest.approx(40.0)
    image = np.asarray(Image.open(region_set.image_path(record.region_id, 10.0)))
    assert image.shape[:2] == (512, 512)  # 2048 level-0 px at 0.25 um/px, read at 1 um/px
    bad = _write(tmp_path / "c.csv", [{**rows[0], "mpp": "-1"}], fields=fields)
    with pytest.raises(ValueError, match=r"line 2: mpp='-1'"):
        read_data_table(bad)
