"""Splits: disjoint, covering, stratified, reproducible; fixed lists (RCKD Sec. 2.1.2)."""

import numpy as np
import pytest

from histokd.finetune.splits import make_splits

LABELS = np.repeat([0, 1, 2], [50, 30, 20])  # 100 samples, imbalanced


def _parts(split):
    return [split.train, split.val, split.test]


def test_disjoint_and_covering():
    for split in make_splits(100, LABELS, num_splits=5, seed=0):
        parts = _parts(split)
        joined = np.concatenate(parts)
        assert len(joined) == len(set(joined.tolist())) == 100  # no sample twice, none lost
        assert split.sizes == (60, 20, 20)  # RCKD 6:2:2


def test_stratified():
    for split in make_splits(100, LABELS, num_splits=5, seed=1):
        for part, ratio in zip(_parts(split), (0.6, 0.2, 0.2), strict=True):
            counts = np.bincount(LABELS[part], minlength=3)
            assert np.abs(counts - ratio * np.array([50, 30, 20])).max() <= 1


def test_reproducible_and_seed_dependent():
    a = make_splits(100, LABELS, num_splits=5, seed=7)
    b = make_splits(100, LABELS, num_splits=5, seed=7)
    c = make_splits(100, LABELS, num_splits=5, seed=8)
    assert all(np.array_equal(x.test, y.test) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x.test, y.test) for x, y in zip(a, c, strict=True))
    assert len({tuple(s.test.tolist()) for s in a}) == 5  # five different splits
    more = make_splits(100, LABELS, num_splits=7, seed=7)
    assert all(np.array_equal(x.train, y.train) for x, y in zip(a, more[:5], strict=True))


def test_unstratified_for_segmentation():
    splits = make_splits(10, None, num_splits=2, seed=0)
    assert [s.sizes for s in splits] == [(6, 2, 2), (6, 2, 2)]


def test_fixed_test_list_splits_the_rest_train_val():
    # CRC / GlaS: a published test set; the training set split 80:20 (6:2)
    fixed = ["test"] * 20 + [None] * 80
    labels = np.tile([0, 1], 50)
    for split in make_splits(100, labels, num_splits=3, fixed=fixed):
        assert split.test.tolist() == list(range(20))
        assert split.sizes == (60, 20, 20)
        assert np.bincount(labels[split.val]).tolist() == [10, 10]


def test_published_train_list_without_val_is_split():
    fixed = ["train"] * 80 + ["test"] * 20
    split = make_splits(100, None, num_splits=1, fixed=fixed)[0]
    assert split.test.tolist() == list(range(80, 100)) and split.sizes == (60, 20, 20)


def test_all_fixed_repeats_the_lists():
    fixed = ["train"] * 5 + ["val"] * 3 + ["test"] * 2  # BACH (WSI): 5 / 3 / 2
    splits = make_splits(10, None, num_splits=2, fixed=fixed)
    for s in splits:
        assert (s.train.tolist(), s.val.tolist(), s.test.tolist()) == (
            [0, 1, 2, 3, 4],
            [5, 6, 7],
            [8, 9],
        )
    assert splits[0].seed != splits[1].seed  # the repeats differ in their training seed


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_splits"):
        make_splits(10, None, num_splits=0)
    with pytest.raises(ValueError, match="split_ratios"):
        make_splits(10, None, ratios=(0.0, 0.5, 0.5))
    with pytest.raises(ValueError, match="fixed split names"):
        make_splits(2, None, fixed=["train", "holdout"])
    with pytest.raises(ValueError, match="need train, val and test"):
        make_splits(2, None, fixed=["train", "val"])
    with pytest.raises(ValueError, match="labels has shape"):
        make_splits(3, [0, 1])


def test_small_classes_keep_the_overall_ratio():
    # 3 classes of 12: each class's share is 7.2 / 2.4 / 2.4; the totals must still be 6:2:2
    labels = np.repeat([0, 1, 2], 12)
    for split in make_splits(36, labels, num_splits=5, seed=0):
        assert split.sizes == (22, 7, 7)
        for part, share in zip(_parts(split), (7.2, 2.4, 2.4), strict=True):
            assert np.abs(np.bincount(labels[part], minlength=3) - share).max() < 1
