"""The record cache: training records (image and pseudo label) in Parquet shards."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from histokd.teachers.cache import (
    RecordCache,
    decode_image,
    encode_image,
    patch_key,
    teacher_fingerprint,
)
from histokd.teachers.stream import resize_image

SIZE = 128


def _labels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, (n, size, size), dtype=np.uint8)


@pytest.fixture(scope="module")
def he_images(tiles_dir) -> np.ndarray:
    """Three real H&E tiles (histolab's), resized to the records' side as the stream does."""
    names = ["high-nuclei-score-level0.png", "medium-nuclei-score-level0.png",
             "high-nuclei-score-red-pen-level1.png"]  # fmt: skip
    return np.stack(
        [resize_image(np.asarray(Image.open(tiles_dir / n).convert("RGB")), SIZE) for n in names]
    )


def _write(cache: RecordCache, images: np.ndarray, labels: np.ndarray, x0: int = 0):
    n = len(images)
    keys = [patch_key("/s/a.svs", x0 + 1024 * i, 0, 20, 1024, cache.input_size) for i in range(n)]
    xs = [x0 + 1024 * i for i in range(n)]
    return keys, cache.write(keys, ["/s/a.svs"] * n, xs, [0] * n, images, labels)


def test_record_roundtrip_jpeg_close_png_exact_labels_exact(tmp_path, he_images):
    """JPEG 95 (4:4:4) stays within 3 grey levels on average and 24 at any pixel of a real H&E
    tile; PNG is exact; labels and their nucleus share are exact in both."""
    labels = _labels(3, SIZE)
    jpeg = RecordCache(tmp_path, "t", SIZE, "jpeg", 95)
    keys, shard = _write(jpeg, he_images, labels)
    index = jpeg.index()
    assert set(index) == set(keys) and index[keys[1]] == (str(shard), 1)
    images, got = RecordCache.read(shard, [2, 0])
    np.testing.assert_array_equal(got, labels[[2, 0]])
    error = np.abs(images.astype(int) - he_images[[2, 0]])
    assert images.shape == (2, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert error.mean() < 3 and error.max() <= 24, (error.mean(), error.max())
    table = pq.read_table(shard)
    assert (
        table.column("nuclei_fraction").to_pylist() == np.float32(labels.mean(axis=(1, 2))).tolist()
    )
    assert table.column("slide").to_pylist() == ["/s/a.svs"] * 3

    png = RecordCache(tmp_path, "t", SIZE, "png")
    _, shard = _write(png, he_images, labels)
    images, got = RecordCache.read(shard, [0, 1, 2])
    np.testing.assert_array_equal(images, he_images)
    np.testing.assert_array_equal(got, labels)
    # the quality is what was asked: JPEG 50 is smaller and further off than JPEG 95
    low, high = (encode_image(he_images[0], "jpeg", q) for q in (50, 95))
    assert len(low) < 0.6 * len(high)
    assert np.abs(decode_image(low).astype(int) - he_images[0]).mean() > error.mean() + 1


def test_size_line(tmp_path, he_images):
    cache = RecordCache(tmp_path, "t", SIZE)
    assert cache.size() == (0, 0)
    _write(cache, he_images, _labels(3, SIZE))
    records, nbytes = cache.size()
    shard = cache.shards()[0]
    assert records == 3 and nbytes == shard.stat().st_size + len(open(f"{shard}.sha256").read())
    line = cache.size_line()
    assert f"3 records, {nbytes / 1e6:,.1f} MB, {nbytes / 3:,.0f} bytes/record" in line
    assert f"400,000 records (RCKD's S_n) would take {nbytes / 3 * 4e5 / 1e9:,.1f} GB" in line


def test_retried_batch_overwrites_its_shard(tmp_path):
    cache = RecordCache(tmp_path, "t", 16)
    keys = [patch_key("s", x, 0, 20, 256, 16) for x in range(4)]
    images = np.zeros((4, 16, 16, 3), np.uint8)
    first = cache.write(keys, ["s"] * 4, range(4), [0] * 4, images, _labels(4, 16))
    again = cache.write(keys[::-1], ["s"] * 4, range(4), [0] * 4, images, _labels(4, 16))
    assert first == again and len(cache.shards()) == 1 and len(cache.index()) == 4
    assert not list(cache.folder.glob("*.tmp"))


def test_damaged_shard_is_skipped(tmp_path):
    cache = RecordCache(tmp_path, "t", 8)
    cache.write(
        [patch_key("s", 0, 0, 20, 256, 8)], ["s"], [0], [0], np.zeros((1, 8, 8, 3)), _labels(1, 8)
    )
    (cache.folder / "shard-broken.parquet").write_bytes(b"not parquet")
    assert len(cache.index()) == 1


def test_old_label_only_shards_are_not_records(tmp_path):
    """An earlier version's shards (labels only, in the teacher's folder) are never read as records."""
    fingerprint = teacher_fingerprint("deconvolution")
    old = tmp_path / fingerprint / "shard-old.parquet"
    old.parent.mkdir()
    key = patch_key("s", 0, 0, 20, 256, 8)
    pq.write_table(pa.table({"key": [key], "pseudo_label": [b"\0" * 8]}), old)
    cache = RecordCache(tmp_path, fingerprint, 8)
    assert cache.index() == {} and cache.shards() == [] and old.is_file()


def test_folder_key_follows_teacher_input_size_and_format(tmp_path):
    def folder(fingerprint="t", size=512, fmt="jpeg", quality=95):
        return RecordCache(tmp_path, fingerprint, size, fmt, quality).folder

    base = folder()
    assert base == folder() and base.parent.name == "t"
    others = [folder(size=256), folder(fmt="png"), folder(quality=90),
              folder(fingerprint=teacher_fingerprint("deconvolution"))]  # fmt: skip
    assert len({base, *others}) == 5
    assert folder(fmt="png", quality=90) == folder(fmt="png")  # PNG has no quality
    cache = RecordCache.for_teacher(tmp_path, "deconvolution", {"alpha": 0.5}, 64, "png")
    assert (
        cache.folder
        == tmp_path / teacher_fingerprint("deconvolution", {"alpha": 0.5}) / "records-64px-png"
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ((512, "webp", 95), "record_format='webp': allowed: jpeg, png"),
        ((512, "jpeg", 0), r"jpeg_quality=0: must be an integer in \[1, 100\]"),
        ((512, "jpeg", 95.5), r"jpeg_quality=95.5: must be an integer in \[1, 100\]"),
        ((0, "jpeg", 95), "input_size=0: must be a positive integer"),
    ],
)
def test_bad_record_settings_are_named(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        RecordCache(tmp_path, "t", *settings)


def test_write_checks_shapes(tmp_path):
    cache = RecordCache(tmp_path, "t", 8)
    with pytest.raises(ValueError, match=r"expected \(1, 8, 8, 3\) and \(1, 8, 8\)"):
        cache.write(["k"], ["s"], [0], [0], np.zeros((1, 16, 16, 3)), _labels(1, 8))


def test_key_includes_everything_that_changes_the_label():
    base = patch_key("s", 0, 0, 20, 1024, 512)
    assert base != patch_key("s", 0, 0, 10, 1024, 512)
    assert base != patch_key("s", 0, 0, 20, 512, 512)
    assert base != patch_key("s", 0, 0, 20, 1024, 256)
    assert base == patch_key("s", np.int64(0), 0.0, 20.0, np.int32(1024), 512)


def test_fingerprint_follows_settings_and_weights(tmp_path):
    assert teacher_fingerprint("deconvolution", {"alpha": 0.5}) == teacher_fingerprint(
        "deconvolution", {"alpha": 0.5}
    )
    assert teacher_fingerprint("deconvolution", {"alpha": 0.5}) != teacher_fingerprint(
        "deconvolution", {"alpha": 0.2}
    )
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights_best.h5").write_bytes(b"one")
    before = teacher_fingerprint(str(folder))
    (folder / "weights_best.h5").write_bytes(b"two")
    assert teacher_fingerprint(str(folder)) != before
    assert teacher_fingerprint("demo").startswith("demo-")
    same = {
        teacher_fingerprint(s) for s in ("stardist", "2D_versatile_he", "stardist:2D_versatile_he")
    }
    assert len(same) == 1
    assert teacher_fingerprint("demo", {"batch_size": 4}) == teacher_fingerprint(
        "demo", {"batch_size": 16}
    )
