"""A dataset of tissue regions: the data table in, region images at every magnification out.

The data table (CSV), one row per slide or region: ``slide`` (relative to the table's folder),
``split`` (train, val, test, or aux: DiPalma Sec. 4.2's unlabelled set), ``label`` (empty:
unlabelled; a slide's goes to all its regions, Sec. 4.4), optionally a level-0 box ``x, y,
width, height`` (else :func:`find_tissue_regions` finds the regions) and, for a slide that
records no pixel size, ``mpp`` (its level-0 um per pixel) or the older ``base_magnification``
(10 / mpp). A slide's own MPP metadata always comes first (:class:`histokd.slides.SlideReader`).
:func:`build_region_set` writes ``images/{mag}x/{region_id}.png``, ``regions.csv`` and
``region_set.json``; a second call with the same inputs reuses them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from histokd.resdist.config import SPLITS
from histokd.resdist.regions import (
    RegionFinder,
    TissueRegion,
    find_tissue_regions,
    magnification_tag,
    read_region_magnifications,
)
from histokd.resume import write_atomic
from histokd.slides import SlideReader

__all__ = ["RegionRecord", "RegionSet", "build_region_set", "check_region_set", "median_size",
           "read_data_table"]  # fmt: skip

log = logging.getLogger(__name__)

_TABLE_FILE = "regions.csv"
_META_FILE = "region_set.json"
_BOX = ("x", "y", "width", "height")


@dataclass(frozen=True)
class RegionRecord(TissueRegion):
    """A region of the set: its box, its split and its class index (-1: unlabelled)."""

    split: str = "train"
    label: int = -1


def median_size(records: Sequence[TissueRegion], magnification: float) -> tuple[int, int]:
    """Median (height, width) of the regions at ``magnification``, rounded half up."""
    sizes = np.array([r.size_at(magnification) for r in records])
    return tuple(math.floor(np.median(sizes[:, i]) + 0.5) for i in (1, 0))


@dataclass
class RegionSet:
    """Region images on disk and their table; label k is ``class_names[k]``."""

    root: Path
    class_names: tuple[str, ...]
    magnifications: tuple[float, ...]
    records: list[RegionRecord]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def image_path(self, region_id: str, magnification: float) -> Path:
        return self.root / "images" / magnification_tag(magnification) / f"{region_id}.png"

    def select(self, splits: Iterable[str], labelled: bool = False) -> list[RegionRecord]:
        """Records of the given splits (in table order), optionally only the labelled ones."""
        wanted = set(splits)
        if wanted - set(SPLITS):
            raise ValueError(f"splits {sorted(wanted - set(SPLITS))}: allowed: {', '.join(SPLITS)}")
        return [r for r in self.records if r.split in wanted and (not labelled or r.label >= 0)]

    def items(self, splits: Iterable[str], magnifications: Sequence[float], labelled: bool = False) -> list[dict]:  # fmt: skip
        """Plain dicts for training workers: ``region_id``, ``label``, ``paths`` by magnification
        tag; a ValueError for a magnification the set has no images for."""
        missing = [m for m in magnifications if float(m) not in self.magnifications]
        if missing:
            have = ", ".join(magnification_tag(m) for m in self.magnifications)
            raise ValueError(f"magnifications {missing}: the set at {self.root} has {have} only")
        return [
            {"region_id": r.region_id, "label": r.label,
             "paths": {magnification_tag(m): str(self.image_path(r.region_id, m)) for m in magnifications}}
            for r in self.select(splits, labelled)
        ]  # fmt: skip

    def counts(self) -> dict[str, dict[str, int]]:
        """Regions per split and class (DiPalma Tables 2-4)."""
        out: dict[str, dict[str, int]] = {}
        for r in self.records:
            name = self.class_names[r.label] if r.label >= 0 else "unlabelled"
            out.setdefault(r.split, {}).setdefault(name, 0)
            out[r.split][name] += 1
        return out

    @classmethod
    def load(cls, root: str | os.PathLike) -> RegionSet:
        """Open a set written by :func:`build_region_set` (a FileNotFoundError where there is none)."""
        root = Path(root)
        meta = json.loads((root / _META_FILE).read_text())
        parse = {f.name: {"int": int, "float": float, "str": str}[f.type] for f in fields(RegionRecord)}  # fmt: skip
        with open(root / _TABLE_FILE, newline="") as f:
            records = [RegionRecord(**{k: parse[k](v) for k, v in row.items()}) for row in csv.DictReader(f)]  # fmt: skip
        return cls(root, tuple(meta["class_names"]), tuple(map(float, meta["magnifications"])), records)  # fmt: skip


def read_data_table(path: str | os.PathLike, class_names: Sequence[str] | None = None) -> tuple[list[dict], tuple[str, ...]]:  # fmt: skip
    """Rows of the data table, checked (a ValueError naming the row), with absolute slide paths,
    and the class names (``class_names``, else the table's sorted labels)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data={str(path)!r}: no such CSV file")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns, rows = set(reader.fieldnames or []), list(reader)
    for required in ("slide", "split"):
        if required not in columns:
            raise ValueError(f"{path}: column {required!r} missing; columns are {sorted(columns)}")
    if columns & set(_BOX) and not set(_BOX) <= columns:
        raise ValueError(f"{path}: give all of {list(_BOX)} or none")
    names = tuple(class_names or sorted({(r.get("label") or "").strip() for r in rows} - {""}))
    out = []
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{path}, line {i}"
        split, label = ((row.get(k) or "").strip() for k in ("split", "label"))
        if split not in SPLITS:
            raise ValueError(f"{where}: split={split!r}; allowed: {', '.join(SPLITS)}")
        if label and label not in names:
            raise ValueError(
                f"{where}: label={label!r} is not a class; classes: {', '.join(names)}"
            )
        slide = path.parent / row["slide"].strip()  # an absolute path stays as it is
        entry = {"slide": str(slide.resolve()), "split": split,
                 "label": names.index(label) if label else -1,
                 "base_magnification": _assumed_magnification(row, where)}  # fmt: skip
        if all((row.get(k) or "").strip() for k in _BOX):
            try:
                x, y, w, h = (int(float(row[k])) for k in _BOX)
            except ValueError as exc:
                raise ValueError(f"{where}: box {[row[k] for k in _BOX]} is not numeric") from exc
            if x < 0 or y < 0 or w < 1 or h < 1:
                raise ValueError(f"{where}: box {x, y, w, h}: need x, y >= 0 and sizes >= 1")
            entry["box"] = [x, y, w, h]
        out.append(entry)
    if not out:
        raise ValueError(f"{path}: no rows")
    return out, names


def _assumed_magnification(row: dict, where: str) -> float | None:
    """The level-0 magnification a row assumes for a slide without a pixel size: ``mpp``
    (10 / mpp) or ``base_magnification``; None where it gives neither."""
    mpp, base = ((row.get(k) or "").strip() for k in ("mpp", "base_magnification"))
    try:
        value = 10.0 / float(mpp) if mpp else float(base) if base else None
    except (ValueError, ZeroDivisionError):
        value = -1.0
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"{where}: mpp={mpp!r}, base_magnification={base!r}: need a positive number "
            "(mpp in um per pixel, e.g. 0.25)"
        )
    return value


def _extract_slide(slide: str, entries: list[dict], root: str, mags: Sequence[float], finder):
    """Find or take the regions of one slide and write their images; their table rows."""
    rows = []
    with SlideReader(slide, entries[0]["base_magnification"]) as reader:
        base = reader.info.base_magnification
        for entry in entries:
            found = [TissueRegion(slide, 0, *entry["box"], base)] if "box" in entry else None
            for region in found or find_tissue_regions(reader, finder):
                record = RegionRecord(slide, len(rows), region.x, region.y, region.width, region.height,
                                      base, region.tissue_fraction, entry["split"], entry["label"])  # fmt: skip
                for mag, image in read_region_magnifications(reader, record, mags).items():
                    out = Path(root) / "images" / magnification_tag(mag) / f"{record.region_id}.png"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    tmp = out.with_name(f".{out.name}.tmp.png")
                    Image.fromarray(image).save(tmp, compress_level=1)
                    os.replace(tmp, out)
                rows.append(asdict(record))
    return rows


def build_region_set(data: str | os.PathLike, out_dir: str | os.PathLike, magnifications: Sequence[float],
                     finder: RegionFinder | None = None, class_names: Sequence[str] | None = None) -> RegionSet:  # fmt: skip
    """Write (or reuse) the region images of a data table at every magnification; a ValueError for
    a bad table or no region found at all. With Ray up and 16 or more slides, a Ray task per slide."""
    finder = finder or RegionFinder()
    mags = tuple(sorted({float(m) for m in magnifications}, reverse=True))
    if not mags or min(mags) <= 0:
        raise ValueError(f"magnifications={list(magnifications)}: need positive values")
    rows, names = read_data_table(data, class_names)
    root = Path(out_dir)
    fingerprint = hashlib.sha256(json.dumps(
        {"rows": rows, "classes": names, "mags": mags, "finder": repr(finder), "version": 2},
        sort_keys=True, default=str,
    ).encode()).hexdigest()[:16]  # fmt: skip
    meta_path = root / _META_FILE
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("fingerprint") == fingerprint:
        return RegionSet.load(root)
    by_slide: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_slide.setdefault(row["slide"], []).append(row)
    for slide, entries in by_slide.items():
        if len({e["split"] for e in entries}) > 1:
            raise ValueError(f"{data}: slide {slide} is in several splits; its regions must share one")  # fmt: skip
    args = [(s, e, str(root), mags, finder) for s, e in by_slide.items()]
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized() and len(args) >= 16:  # fewer: not worth the tasks
        task = ray.remote(num_cpus=1)(_extract_slide)
        per_slide = ray.get([task.remote(*a) for a in args])
    else:
        per_slide = [_extract_slide(*a) for a in args]
    table = [row for rows_ in per_slide for row in rows_]
    if not table:
        raise ValueError(f"{data}: no tissue region found on any slide (RegionFinder: {finder})")
    ids = [RegionRecord(**row).region_id for row in table]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{data}: two slides share a file name stem; region ids must be unique")
    root.mkdir(parents=True, exist_ok=True)
    write_atomic(root / _TABLE_FILE, lambda f: pd.DataFrame(table).to_csv(f, index=False))
    meta = {"fingerprint": fingerprint, "data": str(Path(data).resolve()), "class_names": list(names),
            "magnifications": list(mags), "finder": repr(finder), "num_regions": len(table)}  # fmt: skip
    meta_path.write_text(json.dumps(meta, indent=2))
    region_set = RegionSet.load(root)
    log.info("region set %s: %s", root, region_set.counts())
    return region_set


def check_region_set(region_set: RegionSet, max_bad_fraction: float, report_dir: str | os.PathLike) -> RegionSet:  # fmt: skip
    """The set without the regions that have an unreadable image at any magnification, by
    :mod:`histokd.image_check`'s rules (``report_dir/bad_images.csv``; a ValueError when more than
    ``max_bad_fraction`` are bad, fewer than two classes are labelled or a split is left empty)."""
    from collections import Counter

    from histokd.image_check import require_splits, require_two_classes, screen_samples

    source = f"region set {region_set.root}"
    samples = [[str(region_set.image_path(r.region_id, m)) for m in region_set.magnifications]
               for r in region_set.records]  # fmt: skip
    kept = screen_samples(samples, source=source, max_bad_fraction=max_bad_fraction, report_dir=report_dir)  # fmt: skip
    records = [region_set.records[i] for i in kept]
    require_splits(source, Counter(r.split for r in region_set.records), Counter(r.split for r in records))  # fmt: skip
    labelled = Counter(r.label for r in records if r.label >= 0 and r.split != "aux")
    require_two_classes(
        source, {name: labelled[k] for k, name in enumerate(region_set.class_names)}
    )
    if len(records) == len(region_set.records):
        return region_set
    return RegionSet(region_set.root, region_set.class_names, region_set.magnifications, records)
