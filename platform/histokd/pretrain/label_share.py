"""How much of each slide the teacher calls nucleus: empty pseudo labels seen, not learnt.

A teacher run at the wrong scale or normalisation can label most patches of a slide empty
without any error (``/work/shared/TEACHER.md``: 75 % of the patches of 19 real slides, while the
epoch lines showed accuracy 0.974). Each worker counts, per slide, the patches it trained on,
their pseudo labels' share of nucleus pixels, and how many are almost empty; rank 0 merges the
workers' counts, shows the share on the epoch line, warns about slides whose patches are mostly
empty, and writes the table (``label_share.csv``) for the run summary.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

__all__ = ["LabelShare", "read_label_share", "summary_line"]

FIELDS = ("slide", "patches", "mean_nucleus_share", "empty_patches", "empty_fraction")


class LabelShare:
    """Per-slide counts of pseudo-label nucleus pixels.

    Args:
        empty_patch_share: A patch whose label has a smaller share of nucleus pixels is empty.
    """

    def __init__(self, empty_patch_share: float):
        self.empty_patch_share = float(empty_patch_share)
        self.counts: dict[str, list[float]] = {}  # slide -> [patches, sum of shares, empty patches]

    def add(self, slides: Iterable, shares: np.ndarray) -> None:
        """Count one batch: each patch's slide and its label's nucleus share."""
        for slide, share in zip(slides, np.asarray(shares, np.float64), strict=True):
            slide = slide.decode() if isinstance(slide, bytes) else str(slide)
            entry = self.counts.setdefault(slide, [0, 0.0, 0])
            entry[0] += 1
            entry[1] += float(share)
            entry[2] += int(share < self.empty_patch_share)

    def merge(self, others: Iterable[dict[str, list[float]]]) -> LabelShare:
        """This and other workers' ``counts``, summed."""
        merged = LabelShare(self.empty_patch_share)
        for counts in [self.counts, *others]:
            for slide, (n, total, empty) in counts.items():
                entry = merged.counts.setdefault(slide, [0, 0.0, 0])
                entry[0] += n
                entry[1] += total
                entry[2] += empty
        return merged

    @property
    def mean_share(self) -> float:
        """Nucleus share over every counted patch."""
        patches = sum(n for n, _, _ in self.counts.values())
        return sum(total for _, total, _ in self.counts.values()) / max(1, patches)

    def rows(self) -> list[dict]:
        """One row per slide, emptiest first."""
        rows = [
            {"slide": slide, "patches": int(n), "mean_nucleus_share": round(total / n, 5),
             "empty_patches": int(empty), "empty_fraction": round(empty / n, 4)}
            for slide, (n, total, empty) in self.counts.items() if n
        ]  # fmt: skip
        return sorted(
            rows, key=lambda r: (-r["empty_fraction"], r["mean_nucleus_share"], r["slide"])
        )

    def mostly_empty(self, empty_slide_fraction: float) -> list[dict]:
        """Slides on which more than ``empty_slide_fraction`` of the patches are empty."""
        return [r for r in self.rows() if r["empty_fraction"] > empty_slide_fraction]

    def write_csv(self, path: str | os.PathLike) -> Path:
        """The table, written atomically."""
        path = Path(path)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(self.rows())
        os.replace(tmp, path)
        return path


def read_label_share(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``label_share.csv``, numbers as numbers."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("patches", "empty_patches"):
            row[key] = int(row[key])
        for key in ("mean_nucleus_share", "empty_fraction"):
            row[key] = float(row[key])
    return rows


def summary_line(rows: list[dict], empty_patch_share: float, empty_slide_fraction: float) -> str:
    """The distribution over slides, for the end of a run."""
    if not rows:
        return "pseudo labels: no patches counted"
    shares = np.array([r["mean_nucleus_share"] for r in rows])
    empty = [r for r in rows if r["empty_fraction"] > empty_slide_fraction]
    patches = sum(r["patches"] for r in rows)
    empty_patches = sum(r["empty_patches"] for r in rows)
    line = (
        f"pseudo labels: nucleus share per slide min {shares.min():.1%}, median {np.median(shares):.1%}, "
        f"max {shares.max():.1%} over {len(rows)} slides; {empty_patches}/{patches} patches "
        f"({empty_patches / max(1, patches):.0%}) below {empty_patch_share:.1%}"
    )
    if empty:
        line += (
            f"; {len(empty)} slide(s) mostly empty (> {empty_slide_fraction:.0%} of their patches)"
        )
    return line
