"""Train / validation / test splits of a downstream dataset (RCKD Sec. 2.1.2, Algorithm 2).

RCKD repeats the data split and the experiment five times with different random seeds and
reports the mean (Algorithm 2, N_fold = 5). Datasets that publish only a training set (BACH
microscopy, BreakHis, Lymph) are split 6:2:2; those with a fixed test set (CRC, GlaS) split their
training set into train and validation (RCKD says 80:20; here the ratio of the first two ratios,
6:2 = 75:25 by default, so that the parts keep the 6:2:2 proportions); BACH WSI has fixed lists
for all three.

:func:`make_splits` covers four cases: with no fixed lists it draws ``num_splits``
seeded random splits by ``ratios``; with a fixed test list it splits the rest into train and
validation by the ratio of the first two ratios; with fixed train and validation lists but no
test list it carves the test part out of the training list (the test ratio of all samples,
6:2:2 overall when the lists allow); with all three fixed it repeats the fixed split (the
repeats then differ only in the training seed). Classification splits are stratified: each
class is split by the ratios on its own, so every split keeps the class proportions to within
one sample per class.

With ``groups`` (a patient or slide per sample), every sample of a group goes to the same part
(`split_groups`): the groups are taken in a seeded random order and each goes to the part
where it leaves the smallest squared error between the parts' per-class counts and their
targets (ratio x class size), i.e. the part with the largest unmet need for the group's
classes. The shares then come near the ratios, stratified by class as far as whole groups allow.
A split depends only on the data, the seed and the split index, so every arm of a comparison
gets the same groups.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "RCKD_RATIOS",
    "Split",
    "check_label_fraction",
    "group_k_folds",
    "make_splits",
    "split_groups",
    "split_indices",
    "subsample_train",
]

log = logging.getLogger(__name__)

RCKD_RATIOS = (0.6, 0.2, 0.2)  # RCKD Sec. 2.1.2: training sets split 6:2:2


@dataclass(frozen=True)
class Split:
    """One split: sample indices of each part, sorted.

    Attributes:
        index: Split number, 0-based.
        seed: Seed the split was drawn with (also the training seed of this split).
        train: Indices of the training samples.
        val: Indices of the validation samples (early stopping).
        test: Indices of the test samples.
    """

    index: int
    seed: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def as_dict(self) -> dict[str, list[int]]:
        """Plain lists, for JSON."""
        return {"train": self.train.tolist(), "val": self.val.tolist(), "test": self.test.tolist()}

    @property
    def sizes(self) -> tuple[int, int, int]:
        """(train, val, test) sample counts."""
        return len(self.train), len(self.val), len(self.test)


def _check_ratios(ratios: Sequence[float]) -> tuple[float, ...]:
    ratios = tuple(float(r) for r in ratios)
    if (
        len(ratios) not in (2, 3)
        or any(r < 0 for r in ratios)
        or ratios[0] <= 0
        or sum(ratios) <= 0
    ):
        raise ValueError(
            f"split_ratios={list(ratios)!r}: need 3 non-negative ratios train:val:test (train > 0), e.g. 0.6 0.2 0.2"
        )
    total = sum(ratios)
    return tuple(r / total for r in ratios)


def _counts(n: int, ratios: Sequence[float]) -> list[int]:
    """Split n into parts by ratios: the largest remainders get the leftover samples, ties to the
    earlier part, and the first part (training) gets at least one sample when n > 0."""
    exact = np.asarray(ratios) * n
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    for k in order[: n - counts.sum()]:
        counts[k] += 1
    if n and counts[0] == 0:
        donor = int(np.argmax(counts))
        counts[donor] -= 1
        counts[0] += 1
    return counts.tolist()


def split_indices(
    indices: np.ndarray,
    ratios: Sequence[float],
    rng: np.random.Generator,
    labels: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Shuffle ``indices`` and cut them by ``ratios``, per class when ``labels`` are given.

    Args:
        indices: Sample indices to split.
        ratios: Normalised ratios, one per part.
        rng: The split's generator.
        labels: Class of each entry of ``indices`` (stratified), or None.

    Returns:
        One sorted index array per part.
    """
    parts: list[list[np.ndarray]] = [[] for _ in ratios]
    groups = [indices] if labels is None else [indices[labels == c] for c in np.unique(labels)]
    for group, counts in zip(
        groups, _stratified_counts([len(g) for g in groups], ratios, rng), strict=True
    ):
        shuffled = rng.permutation(group)
        start = 0
        for k, count in enumerate(counts):
            parts[k].append(shuffled[start : start + count])
            start += count
    return [
        np.sort(np.concatenate(p)).astype(np.int64) if p else np.empty(0, np.int64) for p in parts
    ]


def split_groups(
    indices: np.ndarray,
    ratios: Sequence[float],
    rng: np.random.Generator,
    groups: np.ndarray,
    labels: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Cut ``indices`` by ``ratios`` keeping each group's samples in one part (module docstring).

    Args:
        indices: Sample indices to split.
        ratios: Normalised ratios, one per part.
        rng: The split's generator.
        groups: Group of each entry of ``indices``.
        labels: Class of each entry of ``indices`` (stratified), or None.

    Returns:
        One sorted index array per part.
    """
    names, group_of = np.unique(groups, return_inverse=True)
    classes, label_of = np.unique(
        labels if labels is not None else np.zeros(len(indices)), return_inverse=True
    )
    counts = np.zeros((len(names), len(classes)), dtype=np.int64)  # group x class
    np.add.at(counts, (group_of, label_of), 1)
    target = np.outer(ratios, counts.sum(0))  # part x class
    assigned = np.zeros_like(target)
    part_of = np.empty(len(names), dtype=np.int64)
    for g in rng.permutation(len(names)):
        # adding c to part k changes the squared error by sum(c * (2 (assigned - target) + c))
        need = ((target - assigned) * counts[g]).sum(1)
        k = int(np.argmax(need))
        part_of[g] = k
        assigned[k] += counts[g]
    part_of_sample = part_of[group_of]
    return [np.sort(indices[part_of_sample == k]).astype(np.int64) for k in range(len(ratios))]


def _split(
    indices: np.ndarray,
    ratios: Sequence[float],
    rng: np.random.Generator,
    labels: np.ndarray | None,
    groups: np.ndarray | None,
) -> list[np.ndarray]:
    """`split_groups` with groups, else `split_indices`, of ``indices`` (labels, groups: of all samples)."""
    sub_labels = None if labels is None else labels[indices]
    if groups is None:
        return split_indices(indices, ratios, rng, sub_labels)
    return split_groups(indices, ratios, rng, groups[indices], sub_labels)


def _stratified_counts(
    sizes: Sequence[int], ratios: Sequence[float], rng: np.random.Generator
) -> list[list[int]]:
    """Per-class part sizes whose totals are exactly `_counts` of the whole, each class within one
    sample of its own proportional share: every class gets the floor of its share, and the
    samples left over go one by one to the (class, part) with the largest fractional share among
    parts still short of their total (ties broken at random)."""
    exact = np.outer(sizes, ratios)
    counts = np.floor(exact).astype(int)
    fraction = exact - counts + rng.random(exact.shape) * 1e-9
    leftover = np.asarray(sizes) - counts.sum(1)
    deficit = np.asarray(_counts(int(sum(sizes)), ratios)) - counts.sum(0)
    while leftover.sum() > 0:
        score = np.where((leftover[:, None] > 0) & (deficit[None, :] > 0), fraction, -np.inf)
        c, k = np.unravel_index(int(np.argmax(score)), score.shape)
        counts[c, k] += 1
        leftover[c] -= 1
        deficit[k] -= 1
        fraction[c, k] = -1.0
    return counts.tolist()


def make_splits(
    num_samples: int,
    labels: Sequence[int] | np.ndarray | None = None,
    num_splits: int = 5,
    ratios: Sequence[float] = RCKD_RATIOS,
    seed: int = 0,
    fixed: Sequence[str | None] | None = None,
    groups: Sequence[str] | np.ndarray | None = None,
) -> list[Split]:
    """The ``num_splits`` splits of a dataset (RCKD Algorithm 2, N_fold = 5).

    Split ``i`` is drawn from ``numpy.random.SeedSequence([seed, i])``, so the same seed gives the
    same splits and asking for more splits leaves the first ones unchanged.

    Args:
        num_samples: Dataset size n.
        labels: Class of each sample, for stratified splits (classification); None for
            segmentation.
        num_splits: Number of splits (RCKD: 5).
        ratios: train:val:test (RCKD: 6:2:2); with a fixed test list only train:val is used.
        seed: Seed of the set of splits.
        fixed: Per sample ``"train"``, ``"val"``, ``"test"`` or None (not fixed), from the
            dataset's own lists. Either no sample is fixed, or only the test samples are (the
            rest is split train:val; a fixed training list without a validation list counts
            as not fixed), or only train and val are (the test part is carved out of train),
            or every sample is.
        groups: Group (patient, slide) of each sample: a group's samples stay in one part of
            every split (`split_groups`), or None (samples split one by one).

    Returns:
        The splits; together the three parts of each cover every sample once.

    Raises:
        ValueError: Bad ratios, counts or fixed lists.
    """
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits={num_splits!r}: must be a positive integer (RCKD: 5)")
    if num_samples < 1:
        raise ValueError(f"the dataset has {num_samples} samples; need at least 1")
    ratios = _check_ratios(ratios)
    label_array = None if labels is None else np.asarray(labels)
    if label_array is not None and label_array.shape != (num_samples,):
        raise ValueError(f"labels has shape {label_array.shape}; expected ({num_samples},)")
    all_indices = np.arange(num_samples)
    fixed_array = (
        np.array([f or "" for f in fixed], dtype=object)
        if fixed is not None
        else np.full(num_samples, "", dtype=object)
    )
    if fixed_array.shape != (num_samples,):
        raise ValueError(f"fixed has {fixed_array.shape[0]} entries for {num_samples} samples")
    unknown = set(fixed_array.tolist()) - {"", "train", "val", "test"}
    if unknown:
        raise ValueError(f"fixed split names {sorted(unknown)}: allowed: train, val, test")
    group_array = None if groups is None else np.asarray([str(g) for g in groups], dtype=object)
    if group_array is not None and group_array.shape != (num_samples,):
        raise ValueError(f"groups has {group_array.shape[0]} entries for {num_samples} samples")
    if "val" not in set(fixed_array.tolist()):
        # a published training list without a validation list (CRC, GlaS) is split train:val
        fixed_array = np.where(fixed_array == "train", "", fixed_array)
    kinds = set(fixed_array.tolist())
    if group_array is not None:
        _check_groups_in_one_list(group_array, fixed_array)
    carve_test = kinds == {"train", "val"}
    if carve_test:
        log.warning(
            "the dataset fixes train and val lists but no test list: each split carves its test "
            "part (%.0f %% of all samples) out of the training list",
            100 * (ratios[2] if len(ratios) == 3 else 0),
        )
    if "" not in kinds and kinds != {"train", "val", "test"} and not carve_test:
        raise ValueError(
            f"the dataset fixes only {sorted(kinds)}; fixed lists need train, val and test"
        )

    splits = []
    for i in range(num_splits):
        split_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        if kinds == {""}:  # nothing fixed: random train:val:test
            if len(ratios) != 3:
                raise ValueError(
                    f"split_ratios={list(ratios)!r}: need 3 ratios when the dataset has no fixed test list"
                )
            train, val, test = _split(all_indices, ratios, rng, label_array, group_array)
        elif carve_test:  # fixed train and val: the test part comes out of train
            if len(ratios) != 3 or ratios[2] <= 0:
                raise ValueError(
                    f"split_ratios={list(ratios)!r}: need a test ratio > 0 to carve a test part out of the training list"
                )
            val = np.flatnonzero(fixed_array == "val")
            listed = np.flatnonzero(fixed_array == "train")
            n_test = min(_counts(num_samples, ratios)[2], len(listed) - 1)
            pair = _check_ratios([len(listed) - n_test, n_test]) if n_test > 0 else (1.0, 0.0)
            train, test = _split(listed, pair, rng, label_array, group_array)
        elif "" not in kinds:  # everything fixed
            train, val, test = (np.flatnonzero(fixed_array == k) for k in ("train", "val", "test"))
        elif kinds <= {"", "test"}:  # a fixed test set; the rest split train:val
            test = np.flatnonzero(fixed_array == "test")
            rest = np.flatnonzero(fixed_array != "test")
            pair = _check_ratios(ratios[:2])
            train, val = _split(rest, pair, rng, label_array, group_array)
        else:
            raise ValueError(
                f"the dataset fixes {sorted(k for k in kinds if k)} for some samples and leaves others unassigned; "
                "fix all of train/val/test, only test, or none"
            )
        if len(train) == 0:
            raise ValueError(
                f"split {i} has no training samples (n={num_samples}, ratios={list(ratios)})"
            )
        splits.append(Split(i, split_seed % (2**31), train, val, test))
    return splits


def group_k_folds(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[str] | np.ndarray,
    num_folds: int = 5,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> list[Split]:
    """k-fold cross-validation by group (patient), stratified by class as whole groups allow.

    The groups are dealt into ``num_folds`` parts by `split_groups` (equal ratios); fold ``i``
    tests part ``i`` and splits the other groups ``1 - val_fraction : val_fraction`` into
    train and validation (early stopping), again by `split_groups`. Every sample is tested in
    exactly one fold, and no group is ever in two parts of a fold.

    Args:
        labels: Class of each sample.
        groups: Group of each sample (a patient; the slide when there is none).
        num_folds: k, at least 2 and at most the number of groups.
        val_fraction: Share of a fold's training groups kept for validation.
        seed: Seed of the folds.

    Raises:
        ValueError: k out of range, or too few groups for a non-empty train, val and test part.
    """
    labels = np.asarray(labels)
    groups = np.asarray([str(g) for g in groups], dtype=object)
    n, n_groups = len(labels), len(np.unique(groups))
    if (
        isinstance(num_folds, bool)
        or not isinstance(num_folds, int)
        or not 2 <= num_folds <= n_groups
    ):
        raise ValueError(
            f"num_folds={num_folds!r}: must be an integer in [2, {n_groups}] (the number of patients)"
        )
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r}: must be in (0, 1)")
    everything = np.arange(n)
    rng = np.random.default_rng(np.random.SeedSequence([seed, num_folds]))
    parts = split_groups(everything, [1.0 / num_folds] * num_folds, rng, groups, labels)
    folds = []
    for i, test in enumerate(parts):
        rest = np.setdiff1d(everything, test)
        fold_rng = np.random.default_rng(np.random.SeedSequence([seed, num_folds, i]))
        train, val = split_groups(
            rest, [1 - val_fraction, val_fraction], fold_rng, groups[rest], labels[rest]
        )
        train_groups = np.unique(groups[train])
        if len(val) == 0 and len(train_groups) > 1:  # few patients: one of them validates
            moved = groups[train] == train_groups[fold_rng.integers(len(train_groups))]
            train, val = train[~moved], np.sort(train[moved])
        if not (len(train) and len(val) and len(test)):
            raise ValueError(
                f"num_folds={num_folds}: fold {i} has {len(train)} train, {len(val)} validation and "
                f"{len(test)} test samples from {n_groups} patients; give fewer folds or more patients"
            )
        folds.append(Split(i, seed, train, val, test))
    return folds


def check_label_fraction(fraction: float) -> float:
    """A label fraction in (0, 1], as a float.

    Raises:
        ValueError: Naming the value and what is allowed.
    """
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0 < fraction <= 1
    ):
        raise ValueError(
            f"label_fractions: {fraction!r}: each must be a number in (0, 1], e.g. 0.01 0.1 1.0"
        )
    return float(fraction)


def subsample_train(
    split: Split, labels: Sequence[int] | np.ndarray, fraction: float, seed: int = 0
) -> np.ndarray:
    """The training rows of ``split`` kept at a label ``fraction``, stratified by class.

    Each class's training rows are shuffled by a generator seeded by the split seed and the
    split index only (never the backbone or initialisation), and its first
    ``max(1, round(fraction x class rows))`` are kept: every arm of a comparison gets the same
    rows, every class keeps at least one, and the rows of a smaller fraction are a subset of
    those of a larger one. Validation and test rows are never subsampled.

    Args:
        split: The split.
        labels: Class of every sample of the dataset.
        fraction: Share of the training rows to keep, in (0, 1].
        seed: The seed of the splits (``split_seed``).

    Returns:
        The kept training indices, sorted.
    """
    fraction = check_label_fraction(fraction)
    if fraction == 1.0:
        return split.train.copy()
    train_labels = np.asarray(labels)[split.train]
    rng = np.random.default_rng(np.random.SeedSequence([seed, split.index, 0x1AB]))
    kept = []
    for c in np.unique(train_labels):
        rows = rng.permutation(split.train[train_labels == c])
        kept.append(rows[: max(1, int(round(fraction * len(rows))))])
    return np.sort(np.concatenate(kept)).astype(np.int64)


def _check_groups_in_one_list(groups: np.ndarray, fixed: np.ndarray) -> None:
    """A group whose samples sit in two of the dataset's own lists would leak across parts."""
    lists: dict[str, set[str]] = {}
    for group, name in zip(groups.tolist(), fixed.tolist(), strict=True):
        lists.setdefault(group, set()).add(name or "unassigned")
    for group, names in lists.items():
        if len(names) > 1:
            raise ValueError(
                f"group {group!r} has samples in the lists {sorted(names)}; with groups, each group's "
                "samples must all be in one list (train, val, test or unassigned)"
            )
