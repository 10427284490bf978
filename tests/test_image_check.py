"""The driver-side check of image files: what counts as unreadable, the CSV, the line, the limit."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image

from histokd.image_check import (
    find_bad_images,
    image_problem,
    require_splits,
    require_two_classes,
    screen_samples,
)


def _png(path, mode="RGB", size=64, seed=0):
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).convert(mode).save(path)
    return str(path)


@pytest.fixture
def files(tmp_path):
    good = _png(tmp_path / "good.png")
    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "text.png"
    text.write_text("not an image\n")
    buf = io.BytesIO()
    Image.open(good).save(buf, "JPEG")
    jpeg = buf.getvalue()
    (tmp_path / "good.jpg").write_bytes(jpeg)
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return {name: str(tmp_path / name) for name in
            ("good.png", "truncated.png", "text.png", "good.jpg", "truncated.jpg")}  # fmt: skip


def test_what_is_unreadable(files, tmp_path):
    assert image_problem(files["good.png"]) is None
    assert image_problem(files["good.jpg"]) is None
    assert "Truncated" in image_problem(files["truncated.png"])
    assert "cannot identify image file" in image_problem(files["text.png"])
    # PIL's verify() checks nothing in a JPEG: the draft decode finds the missing half
    assert "truncated" in image_problem(files["truncated.jpg"])
    assert "\n" not in image_problem(files["text.png"])
    # a mask must be single-channel class indices
    assert "mode RGB" in image_problem(files["good.png"], modes=("L", "P"))
    assert image_problem(_png(tmp_path / "mask.png", "L"), modes=("L", "P")) is None
    bad = find_bad_images(list(files.values()) * 2, threads=2)  # duplicates checked once
    assert sorted(bad) == sorted(files[n] for n in ("truncated.png", "text.png", "truncated.jpg"))


def test_screen_lists_counts_and_keeps_the_good_samples(files, tmp_path, capsys):
    samples = [(files["good.png"],), (files["text.png"],), (files["good.jpg"],),
               (files["truncated.png"],)] + [(files["good.png"],)] * 16  # fmt: skip
    kept = screen_samples(
        samples, source="data X", max_bad_fraction=0.1, report_dir=tmp_path / "run"
    )
    assert kept == [0, 2] + list(range(4, 20))
    rows = list(csv.DictReader(open(tmp_path / "run" / "bad_images.csv")))
    assert [r["path"] for r in rows] == [files["text.png"], files["truncated.png"]]
    assert all(r["reason"] for r in rows)
    line = capsys.readouterr().out.strip()
    assert line.startswith("data X: checked 4 images in ")
    assert "2 unreadable, 2 of 20 samples skipped" in line and "bad_images.csv" in line
    with pytest.raises(
        ValueError, match=r"data X: 2 of 20 samples \(10.0%\).*max_bad_fraction=0.05"
    ):
        screen_samples(samples, source="data X", max_bad_fraction=0.05, report_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="data X: none of the 2 samples is readable"):
        screen_samples(samples[1:2] * 2, source="data X", max_bad_fraction=1.0, report_dir=tmp_path)


def test_a_sample_is_bad_when_any_of_its_files_is(files, tmp_path):
    mask = _png(tmp_path / "mask.png", "L")
    samples = [(files["good.png"], mask), (files["good.png"], files["good.png"])]  # an RGB "mask"
    kept = screen_samples(samples, source="seg", max_bad_fraction=1.0, report_dir=tmp_path,
                          modes=[None, ("L", "P")])  # fmt: skip
    assert kept == [0]


def test_unusable_remainders_are_refused():
    require_two_classes("d", {"a": 3, "b": 1, "c": 0})
    with pytest.raises(ValueError, match=r"d: a single class, 'tumor' \(12 samples\)"):
        require_two_classes("d", {"tumor": 12, "stroma": 0})
    with pytest.raises(ValueError, match="no class"):
        require_two_classes("d", {"tumor": 0})
    require_splits("d", {"train": 5, "test": 2}, {"train": 4, "test": 1})
    with pytest.raises(ValueError, match="d: split 'test' has no usable sample left"):
        require_splits("d", {"train": 5, "test": 2}, {"train": 5})
