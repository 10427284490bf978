"""The pseudo-label cache: Parquet shards keyed by slide and position."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from histokd.teachers.cache import PseudoLabelCache, patch_key, teacher_fingerprint


def _labels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, (n, size, size), dtype=np.uint8)


def test_roundtrip_and_index(tmp_path):
    cache = PseudoLabelCache(tmp_path, "t")
    keys = [patch_key("/s/a.svs", x, 0, 20, 1024, 24) for x in (0, 1024, 2048)]
    labels = _labels(3, 24)
    shard = cache.write(keys, ["/s/a.svs"] * 3, [0, 1024, 2048], [0, 0, 0], labels)
    index = cache.index()
    assert set(index) == set(keys)
    assert index[keys[1]] == (str(shard), 1)
    np.testing.assert_array_equal(PseudoLabelCache.read_labels(shard, [2, 0]), labels[[2, 0]])
    table = pq.read_table(shard)
    assert (
        table.column("nuclei_fraction").to_pylist() == np.float32(labels.mean(axis=(1, 2))).tolist()
    )
    assert table.column("slide").to_pylist() == ["/s/a.svs"] * 3


def test_retried_batch_overwrites_its_shard(tmp_path):
    cache = PseudoLabelCache(tmp_path, "t")
    keys = [patch_key("s", x, 0, 20, 256, 16) for x in range(4)]
    first = cache.write(keys, ["s"] * 4, range(4), [0] * 4, _labels(4, 16))
    again = cache.write(keys[::-1], ["s"] * 4, range(4), [0] * 4, _labels(4, 16))
    assert first == again and len(cache.shards()) == 1 and len(cache.index()) == 4
    assert not list(cache.folder.glob("*.tmp"))


def test_damaged_shard_is_skipped(tmp_path):
    cache = PseudoLabelCache(tmp_path, "t")
    cache.write([patch_key("s", 0, 0, 20, 256, 8)], ["s"], [0], [0], _labels(1, 8))
    (cache.folder / "shard-broken.parquet").write_bytes(b"not parquet")
    assert len(cache.index()) == 1


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
