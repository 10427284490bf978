"""A dataset of tissue regions: the data table in, region images at every magnification out.

The data table (CSV) has one row per slide or per region:

* ``slide`` (required): slide file, absolute or relative to the table's folder;
* ``split`` (required): ``train``, ``val``, ``test`` or ``aux`` (the unlabelled auxiliary set
  of DiPalma Sec. 4.2, whose labels, if any, are ignored);
* ``label``: class name; empty for unlabelled rows. A slide's label goes to every region found
  on it (slide-level labels, as for celiac disease and renal cell carcinoma, Sec. 4.2, 4.4);
* ``x``, ``y``, ``width``, ``height`` (optional, level-0 pixels): a given region (annotated
  regions, as for lung adenocarcinoma, Sec. 4.3). Rows without a box get the tissue regions
  :func:`~histokd.resdist.regions.find_tissue_regions` finds;
* ``base_magnification`` (optional): for slides that record no magnification.

:func:`build_region_set` writes ``images/{mag}x/{region_id}.png`` for every magnification
(each downsampled from the original with Lanczos, Sec. 4.1), ``regions.csv`` and
``region_set.json``; a second call with the same inputs reuses them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from histokd.resdist.regions import (
    DEFAULT_MAX_SOURCE_PIXELS,
    RegionFinder,
    TissueRegion,
    find_tissue_regions,
    magnification_tag,
    read_region_magnifications,
)
from histokd.slides import SlideReader

__all__ = ["SPLITS", "RegionRecord", "RegionSet", "build_region_set", "read_data_table"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "aux")
_TABLE_FILE = "regions.csv"
_META_FILE = "region_set.json"
_BOX = ("x", "y", "width", "height")


@dataclass(frozen=True)
class RegionRecord:
    """One region of the set.

    Attributes:
        region_id: Unique name (``{slide stem}-r{k:03d}``).
        slide: Slide file.
        split: ``train``, ``val``, ``test`` or ``aux``.
        label: Class index, -1 when unlabelled.
        x: Left edge (level 0).
        y: Top edge (level 0).
        width: Width (level 0).
        height: Height (level 0).
        base_magnification: Magnification of level 0.
    """

    region_id: str
    slide: str
    split: str
    label: int
    x: int
    y: int
    width: int
    height: int
    base_magnification: float


@dataclass
class RegionSet:
    """Region images on disk and their table.

    Attributes:
        root: The set's folder.
        class_names: Class names; label k is ``class_names[k]``.
        magnifications: Magnifications with images.
        records: The regions.
    """

    root: Path
    class_names: tuple[str, ...]
    magnifications: tuple[float, ...]
    records: list[RegionRecord]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    def image_path(self, region_id: str, magnification: float) -> Path:
        """The image file of a region at a magnification."""
        return self.root / "images" / magnification_tag(magnification) / f"{region_id}.png"

    def select(self, splits: Iterable[str], labelled: bool = False) -> list[RegionRecord]:
        """Records of the given splits (in table order), optionally only the labelled ones."""
        wanted = set(splits)
        unknown = wanted - set(SPLITS)
        if unknown:
            raise ValueError(f"splits {sorted(unknown)}: allowed: {', '.join(SPLITS)}")
        return [r for r in self.records if r.split in wanted and (not labelled or r.label >= 0)]

    def items(
        self, splits: Iterable[str], magnifications: Sequence[float], labelled: bool = False
    ) -> list[dict[str, Any]]:
        """Plain dicts for training workers: ``region_id``, ``label`` and ``paths`` by magnification tag.

        Raises:
            ValueError: A magnification the set has no images for.
        """
        missing = [m for m in magnifications if float(m) not in self.magnifications]
        if missing:
            raise ValueError(
                f"magnifications {missing}: the region set at {self.root} has images at "
                f"{', '.join(magnification_tag(m) for m in self.magnifications)} only"
            )
        return [
            {
                "region_id": r.region_id,
                "label": r.label,
                "paths": {
                    magnification_tag(m): str(self.image_path(r.region_id, m))
                    for m in magnifications
                },
            }
            for r in self.select(splits, labelled)
        ]

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
        """Open a set written by :func:`build_region_set`."""
        root = Path(root)
        meta_path = root / _META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{root}: no {_META_FILE}; build the region set first (build_region_set)"
            )
        meta = json.loads(meta_path.read_text())
        records = []
        with open(root / _TABLE_FILE, newline="") as f:
            for row in csv.DictReader(f):
                records.append(
                    RegionRecord(
                        region_id=row["region_id"], slide=row["slide"], split=row["split"], label=int(row["label"]),
                        x=int(row["x"]), y=int(row["y"]), width=int(row["width"]), height=int(row["height"]),
                        base_magnification=float(row["base_magnification"]),
                    )
                )  # fmt: skip
        return cls(
            root,
            tuple(meta["class_names"]),
            tuple(float(m) for m in meta["magnifications"]),
            records,
        )


def read_data_table(
    path: str | os.PathLike, class_names: Sequence[str] | None = None
) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    """Rows of the data table, checked, with slide paths made absolute, and the class names.

    Args:
        path: The CSV.
        class_names: Fixed class order; default: the sorted labels of the table.

    Raises:
        ValueError: A missing column, a bad split, box or label, naming the row.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data={str(path)!r}: no such CSV file")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or [])
        rows = list(reader)
    for required in ("slide", "split"):
        if required not in columns:
            raise ValueError(f"{path}: column {required!r} missing; columns are {sorted(columns)}")
    has_box = set(_BOX) <= columns
    if not has_box and columns & set(_BOX):
        raise ValueError(
            f"{path}: give all of {list(_BOX)} or none; found {sorted(columns & set(_BOX))}"
        )
    labels = sorted({(r.get("label") or "").strip() for r in rows} - {""})
    names = tuple(class_names) if class_names else tuple(labels)
    out = []
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{path}, line {i}"
        split = (row.get("split") or "").strip()
        if split not in SPLITS:
            raise ValueError(f"{where}: split={split!r}; allowed: {', '.join(SPLITS)}")
        label = (row.get("label") or "").strip()
        if label and label not in names:
            raise ValueError(
                f"{where}: label={label!r} is not a class; classes: {', '.join(names)}"
            )
        slide = Path(row["slide"].strip())
        slide = slide if slide.is_absolute() else (path.parent / slide)
        entry: dict[str, Any] = {
            "slide": str(slide.resolve()),
            "split": split,
            "label": names.index(label) if label else -1,
        }
        if has_box and all((row.get(k) or "").strip() for k in _BOX):
            try:
                box = [int(float(row[k])) for k in _BOX]
            except ValueError as exc:
                raise ValueError(f"{where}: box {[row[k] for k in _BOX]} is not numeric") from exc
            if box[0] < 0 or box[1] < 0 or box[2] < 1 or box[3] < 1:
                raise ValueError(
                    f"{where}: box x={box[0]}, y={box[1]}, width={box[2]}, height={box[3]}: need x, y >= 0 and sizes >= 1"
                )
            entry["box"] = box
        base = (row.get("base_magnification") or "").strip()
        entry["base_magnification"] = float(base) if base else None
        out.append(entry)
    if not out:
        raise ValueError(f"{path}: no rows")
    return out, names


def _fingerprint(
    rows: list[dict[str, Any]],
    names: Sequence[str],
    magnifications: Sequence[float],
    finder: RegionFinder,
) -> str:
    payload = json.dumps(
        {"rows": rows, "classes": list(names), "mags": [float(m) for m in magnifications], "finder": repr(finder), "version": 1},
        sort_keys=True, default=str,
    )  # fmt: skip
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _extract_slide(
    slide: str,
    entries: list[dict[str, Any]],
    root: str,
    magnifications: Sequence[float],
    finder: RegionFinder,
    max_source_pixels: int,
) -> list[dict[str, Any]]:
    """Find or take the regions of one slide and write their images; their table rows."""
    reader = SlideReader(slide, entries[0]["base_magnification"])
    rows = []
    try:
        regions: list[tuple[TissueRegion, dict[str, Any]]] = []
        index = 0
        for entry in entries:
            if "box" in entry:
                x, y, w, h = entry["box"]
                found = [TissueRegion(reader.path, 0, x, y, w, h, reader.info.base_magnification)]
            else:
                found = find_tissue_regions(reader, finder)
            for region in found:
                region = TissueRegion(reader.path, index, region.x, region.y, region.width, region.height,
                                      region.base_magnification, region.tissue_fraction)  # fmt: skip
                index += 1
                regions.append((region, entry))
        for region, entry in regions:
            images = read_region_magnifications(reader, region, magnifications, max_source_pixels)
            for mag, image in images.items():
                out = Path(root) / "images" / magnification_tag(mag) / f"{region.region_id}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_name(f".{out.name}.tmp.png")
                Image.fromarray(image).save(tmp, compress_level=1)
                os.replace(tmp, out)
            rows.append(
                asdict(
                    RegionRecord(
                        region.region_id,
                        slide,
                        entry["split"],
                        entry["label"],
                        region.x,
                        region.y,
                        region.width,
                        region.height,
                        region.base_magnification,
                    )
                )  # fmt: skip
            )
    finally:
        reader.close()
    return rows


def build_region_set(
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    magnifications: Sequence[float],
    finder: RegionFinder | None = None,
    class_names: Sequence[str] | None = None,
    max_source_pixels: int = DEFAULT_MAX_SOURCE_PIXELS,
    use_ray: bool | None = None,
) -> RegionSet:
    """Write (or reuse) the region images of a data table at every magnification.

    Args:
        data: The data table (see the module docstring).
        out_dir: Folder of the set.
        magnifications: Magnifications to write, e.g. (10, 5, 2.5, 1.25, 0.625).
        finder: Tissue-region settings for rows without a box.
        class_names: Fixed class order (default: sorted labels).
        max_source_pixels: See :func:`read_region_magnifications`.
        use_ray: One Ray task per slide; None: when Ray is initialised and there are at least
            16 slides (below that, starting the task workers costs more than it saves).

    Returns:
        The set.

    Raises:
        ValueError: A bad table, or no region found at all.
    """
    finder = finder or RegionFinder()
    mags = tuple(sorted({float(m) for m in magnifications}, reverse=True))
    if not mags or any(not m > 0 for m in mags):
        raise ValueError(f"magnifications={list(magnifications)}: need positive values")
    rows, names = read_data_table(data, class_names)
    root = Path(out_dir)
    fingerprint = _fingerprint(rows, names, mags, finder)
    meta_path = root / _META_FILE
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("fingerprint") == fingerprint:
        return RegionSet.load(root)
    root.mkdir(parents=True, exist_ok=True)
    by_slide: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_slide.setdefault(row["slide"], []).append(row)
    for slide, entries in by_slide.items():
        if len({e["split"] for e in entries}) > 1:
            raise ValueError(
                f"{data}: slide {slide} is in several splits {sorted({e['split'] for e in entries})}; a slide's regions must share a split"
            )
    if use_ray is None:
        import ray

        use_ray = ray.is_initialized() and len(by_slide) >= 16
    if use_ray:
        import ray

        task = ray.remote(num_cpus=1)(_extract_slide)
        futures = [
            task.remote(s, e, str(root), mags, finder, max_source_pixels)
            for s, e in by_slide.items()
        ]
        per_slide = ray.get(futures)
    else:
        per_slide = [
            _extract_slide(s, e, str(root), mags, finder, max_source_pixels)
            for s, e in by_slide.items()
        ]
    table = [row for rows_ in per_slide for row in rows_]
    if not table:
        raise ValueError(f"{data}: no tissue region found on any slide (RegionFinder: {finder})")
    ids = [r["region_id"] for r in table]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{data}: two slides share a file name stem; region ids must be unique")
    tmp = root / f".{_TABLE_FILE}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    os.replace(tmp, root / _TABLE_FILE)
    meta = {
        "fingerprint": fingerprint,
        "data": str(Path(data).resolve()),
        "class_names": list(names),
        "magnifications": list(mags),
        "finder": repr(finder),
        "num_regions": len(table),
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    region_set = RegionSet.load(root)
    log.info("region set %s: %s", root, region_set.counts())
    return region_set


def median_size(
    region_set: RegionSet, records: Sequence[RegionRecord], magnification: float
) -> tuple[int, int]:
    """Median (height, width) of the records' images at ``magnification`` (for GFLOPs)."""
    if not records:
        raise ValueError("median_size: no records")
    sizes = np.array(
        [
            TissueRegion(r.slide, 0, r.x, r.y, r.width, r.height, r.base_magnification).size_at(
                magnification
            )
            for r in records
        ]
    )
    return int(math.floor(np.median(sizes[:, 1]) + 0.5)), int(
        math.floor(np.median(sizes[:, 0]) + 0.5)
    )
