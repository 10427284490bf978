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
    # CRC / GlaS: a published test set; the training set split 6:2 (75:25)
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
        make_splits(2, None, fixed=["val", "test"])
    with pytest.raises(ValueError, match="labels has shape"):
        make_splits(3, [0, 1])


def test_small_classes_keep_the_overall_ratio():
    # 3 classes of 12: each class's share is 7.2 / 2.4 / 2.4; the totals must still be 6:2:2
    labels = np.repeat([0, 1, 2], 12)
    for split in make_splits(36, labels, num_splits=5, seed=0):
        assert split.sizes == (22, 7, 7)
        for part, share in zip(_parts(split), (7.2, 2.4, 2.4), strict=True):
            assert np.abs(np.bincount(labels[part], minlength=3) - share).max() < 1


def _patients(seed: int = 0, n_patients: int = 60):
    """Patients of 1-8 images each; a patient's images mostly share one class (3 classes)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 9, n_patients)
    groups = np.repeat([f"P{p:02d}" for p in range(n_patients)], sizes)
    labels = np.repeat(np.arange(n_patients) % 3, sizes)
    flip = rng.random(len(labels)) < 0.1
    labels[flip] = (labels[flip] + 1) % 3
    return groups, labels


def _assert_no_group_crosses(split, groups):
    owners = {}
    for k, part in enumerate(_parts(split)):
        for g in set(groups[part].tolist()):
            assert owners.setdefault(g, k) == k, f"group {g} in parts {owners[g]} and {k}"


def test_groups_never_cross_parts_and_shares_are_near_6_2_2():
    groups, labels = _patients()
    n = len(labels)
    splits = make_splits(n, labels, num_splits=5, seed=3, groups=groups)
    for split in splits:
        _assert_no_group_crosses(split, groups)
        assert sorted(np.concatenate(_parts(split)).tolist()) == list(range(n))
        shares = np.array(split.sizes) / n
        assert np.abs(shares - [0.6, 0.2, 0.2]).max() < 0.04, shares
        for c in range(3):  # stratified as far as whole patients allow
            in_class = np.array([np.sum(labels[p] == c) for p in _parts(split)])
            assert np.abs(in_class / in_class.sum() - [0.6, 0.2, 0.2]).max() < 0.08
    assert len({tuple(s.test.tolist()) for s in splits}) == 5  # five different splits
    again = make_splits(n, labels, num_splits=5, seed=3, groups=list(groups))
    assert all(np.array_equal(a.test, b.test) for a, b in zip(splits, again, strict=True))


def test_groups_with_a_fixed_test_list_split_the_rest_75_25():
    groups, labels = _patients(seed=1)
    fixed = np.where(np.isin(groups, [f"P{p:02d}" for p in range(12)]), "test", None)
    rest = int(np.sum(fixed != "test"))
    for split in make_splits(len(labels), labels, num_splits=3, fixed=fixed, groups=groups):
        _assert_no_group_crosses(split, groups)
        assert split.test.tolist() == np.flatnonzero(fixed == "test").tolist()
        assert abs(len(split.train) / rest - 0.75) < 0.05


def test_a_group_in_two_fixed_lists_is_an_error():
    with pytest.raises(
        ValueError, match=r"group 'P1' has samples in the lists \['test', 'unassigned'\]"
    ):
        make_splits(4, None, fixed=["test", None, None, "test"], groups=["P1", "P1", "P2", "P3"])


def test_train_and_val_lists_without_test_carve_the_test_out_of_train(caplog):
    fixed = ["train"] * 80 + ["val"] * 20
    labels = np.tile([0, 1], 50)
    with caplog.at_level("WARNING", logger="histokd.finetune.splits"):
        splits = make_splits(100, labels, num_splits=3, fixed=fixed)
    assert sum("carves its test part (20 % of all samples) out of the training list" in r.message
               for r in caplog.records) == 1  # fmt: skip
    for split in splits:
        assert split.sizes == (60, 20, 20)  # 6:2:2 overall
        assert split.val.tolist() == list(range(80, 100))
        assert split.test.max() < 80 and np.bincount(labels[split.test]).tolist() == [10, 10]
    assert len({tuple(s.test.tolist()) for s in splits}) == 3
    groups = np.repeat([f"S{i}" for i in range(25)], 4)  # slides of 4 images, val = S20..S24
    for split in make_splits(100, None, num_splits=2, fixed=fixed, groups=groups):
        _assert_no_group_crosses(split, groups)
        assert split.sizes == (60, 20, 20)


def test_label_fractions_are_stratified_seeded_nested_and_keep_every_class():
    from histokd.finetune.splits import subsample_train

    labels = np.repeat([0, 1, 2], [300, 90, 10])  # unbalanced: 300, 90 and 10 rows
    split = make_splits(len(labels), labels, num_splits=2, seed=3)[1]
    train_labels = labels[split.train]
    full = np.bincount(train_labels, minlength=3)
    rows = {f: subsample_train(split, labels, f, seed=3) for f in (0.01, 0.1, 0.5, 1.0)}
    assert np.array_equal(rows[1.0], split.train)
    for f, kept in rows.items():
        assert set(kept) <= set(split.train) and len(set(kept)) == len(kept)
        counts = np.bincount(labels[kept], minlength=3)
        # each class: its share rounded, and at least one row (6 rows of class 2 at 1 % -> 1)
        assert counts.tolist() == [max(1, round(f * n)) for n in full], (f, counts, full)
    assert len(rows[0.1]) == pytest.approx(0.1 * len(split.train), abs=2)
    assert set(rows[0.01]) <= set(rows[0.1]) <= set(rows[0.5])  # nested
    # the same rows on every call (every arm) for the same seed and split; others elsewhere
    assert np.array_equal(subsample_train(split, labels, 0.1, seed=3), rows[0.1])
    assert not np.array_equal(subsample_train(split, labels, 0.1, seed=4), rows[0.1])
    with pytest.raises(ValueError, match=r"label_fractions: 0: each must be a number in \(0, 1\]"):
        subsample_train(split, labels, 0)
    with pytest.raises(ValueError, match=r"label_fractions: 1.5"):
        subsample_train(split, labels, 1.5)
