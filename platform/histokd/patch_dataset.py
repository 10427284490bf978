"""A labelled patch dataset cut from annotated slides, in the layouts fine-tuning reads.

Each slide ``<stem>.<ext>`` is paired with the annotation file of the same stem
(``<stem>.geojson``, ``<stem>.json`` or ``<stem>.xml``: :mod:`histokd.annotations`). Patches lie
on a grid over the annotated part of the slide (level-0 origin 0, step ``stride`` patch pixels)
and are read exactly as pretraining reads them (:meth:`histokd.slides.SlideReader.read_region`
at ``mpp``); the annotations are rasterised at the patch's own scale. Two layouts:

* ``classes``: ``OUT/<class>/<slide>_<x>_<y>.png`` (``x``, ``y``: the level-0 top-left corner)
  for each patch that one class covers by at least ``min_coverage``; ``dataset.csv`` has
  ``path,label,slide,patient``.
* ``masks``: ``OUT/images/<name>.png`` with ``OUT/masks/<name>.png`` (pixel value = class
  index, 0 = unannotated) for each patch annotated over at least ``min_coverage``;
  ``classes.txt`` names the values; ``dataset.csv`` has ``image,mask,slide,patient``.

``dataset.json`` records the classes and their colours, the scale (``magnification`` and
``patch_size``, which fine-tuning and inference read), the patches per class and slide and the
sources. ``jobs/finetune.py --data OUT --group-by patient`` (or ``slide``; OUT or its CSV)
trains on it. A slide or annotation file that cannot be used is skipped and listed in ``bad_files.csv``
(``file,kind,reason``); a rerun skips patches already on disk (each is written under a temporary
name, then renamed).

The slides are cut in a plain loop in the driver, not in Ray tasks: the output is one folder of
files that tasks on other nodes would write to their own disks, and the work is reading.
"""

from __future__ import annotations

import csv
import json
import os
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from histokd.annotations import (
    ANNOTATION_EXTENSIONS,
    AnnotationError,
    AnnotationFile,
    rasterise_regions,
    read_annotations,
)

__all__ = ["LAYOUTS", "PatchDatasetResult", "make_patch_dataset", "pair_annotations"]

LAYOUTS = ("classes", "masks")
CSV_FILE = "dataset.csv"  # finetune.datasets.load_task_dataset reads it in a folder too
BAD_FILES = "bad_files.csv"
BACKGROUND = "background"  # mask value 0 in the masks layout


@dataclass
class PatchDatasetResult:
    """What was cut.

    Attributes:
        out_dir: The dataset folder.
        csv_path: ``dataset.csv``: the file to give ``jobs/finetune.py --data``.
        class_names: Classes; in the masks layout value k of a mask is ``class_names[k]``.
        counts: Patches per class (classes layout), or patches holding each class (masks).
        num_patches: Patches in the dataset.
        num_written: Of those, written by this run (the rest were on disk already).
        bad: ``(file, kind, reason)`` of each skipped slide or annotation file.
    """

    out_dir: Path
    csv_path: Path
    class_names: list[str]
    counts: dict[str, int]
    num_patches: int
    num_written: int
    bad: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def bad_files_path(self) -> Path:
        return self.out_dir / BAD_FILES


def pair_annotations(
    slides: Sequence[str], annotations_dir: str | os.PathLike
) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """Each slide's annotation file, matched by file stem; the unmatched as ``bad`` rows.

    Returns:
        ``{slide path: annotation path}`` and ``[(file, kind, reason)]`` for slides with no
        annotation file, annotation files with no slide, and stems with several files.
    """
    folder = Path(annotations_dir)
    if not folder.is_dir():
        raise ValueError(f"annotations={str(folder)!r}: no such folder")
    by_stem: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            by_stem.setdefault(path.stem, []).append(path)
    pairs, bad, used = {}, [], set()
    for slide in slides:
        stem = Path(slide).stem
        found = by_stem.get(stem, [])
        # a thumbnail or notes of the same stem beside the annotation file are not candidates
        found = [p for p in found if p.suffix.lower() in ANNOTATION_EXTENSIONS] or found
        if not found:
            bad.append(
                (slide, "slide", f"no annotation file {stem}.{{geojson,json,xml}} in {folder}")
            )
        elif len(found) > 1:
            bad.append(
                (
                    slide,
                    "slide",
                    f"several annotation files: {', '.join(p.name for p in found)}; keep one",
                )
            )
        else:
            pairs[slide] = str(found[0])
        used.add(stem)
    for stem, paths in by_stem.items():
        for path in paths:
            if stem not in used and path.suffix.lower() in ANNOTATION_EXTENSIONS:
                bad.append((str(path), "annotations", f"no slide named {stem}.* among the slides"))
    return pairs, bad


def _read_patients(path: str | os.PathLike) -> dict[str, str]:
    """``{slide stem or file name: patient}`` from a CSV with columns ``slide,patient``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"patients={str(path)!r}: no such CSV file")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not {"slide", "patient"} <= set(reader.fieldnames or []):
            raise ValueError(
                f"patients={str(path)!r}: columns {reader.fieldnames}; need slide,patient"
            )
        out = {}
        for line, row in enumerate(reader, start=2):
            slide, patient = (row["slide"] or "").strip(), (row["patient"] or "").strip()
            if not slide or not patient:
                raise ValueError(f"{path}: line {line}: empty slide or patient")
            out[slide] = patient
    return out


def _write_png(path: Path, array: np.ndarray) -> None:
    """Write under a temporary name in the same folder, then rename: never half a file."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp.png")
    try:
        Image.fromarray(array).save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _grid(
    annotations: AnnotationFile,
    extent: tuple[int, int],
    step: tuple[float, float],
    dims: tuple[int, int],
) -> list[tuple[int, int]]:
    """Level-0 top-left corners of the grid cells that meet a region's bounds and fit the slide."""
    cells: set[tuple[int, int]] = set()
    (ex, ey), (sx, sy), (width, height) = extent, step, dims
    for region in annotations.regions:
        x0, y0, x1, y1 = region.bounds
        for i in range(max(0, int((x0 - ex) // sx)), int(x1 // sx) + 1):
            for j in range(max(0, int((y0 - ey) // sy)), int(y1 // sy) + 1):
                x, y = round(i * sx), round(j * sy)
                if (
                    x + ex <= width
                    and y + ey <= height
                    and x < x1
                    and x + ex > x0
                    and y < y1
                    and y + ey > y0
                ):
                    cells.add((x, y))
    return sorted(cells, key=lambda c: (c[1], c[0]))


def _check_existing(out_dir: Path, settings: dict) -> None:
    """Refuse to add patches to a dataset cut at other settings."""
    path = out_dir / "dataset.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    differ = [k for k, v in settings.items() if k in old and old[k] != v]
    if differ:
        was = ", ".join(f"{k}={old[k]!r} (now {settings[k]!r})" for k in differ)
        raise ValueError(
            f"output={str(out_dir)!r} holds a dataset cut with {was}; give another --output"
        )


def make_patch_dataset(
    slides: Sequence[str],
    annotations_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    mpp: float = 0.5,
    patch_size: int = 256,
    layout: Literal["classes", "masks"] = "classes",
    min_coverage: float = 0.5,
    stride: int | None = None,
    patients: str | os.PathLike | None = None,
    assume_mpp: float | None = None,
) -> PatchDatasetResult:
    """Cut the patch dataset of the module docstring.

    Args:
        slides: Slide paths (``histokd.manifest.discover_slides``).
        annotations_dir: Folder of annotation files named like the slides.
        out_dir: The dataset folder.
        mpp: um per patch pixel (0.5 = 20x).
        patch_size: Patch side in pixels.
        layout: ``classes`` (a folder per class) or ``masks`` (image/mask pairs).
        min_coverage: Share of a patch that one class (classes) or any class (masks) must cover.
        stride: Grid step in patch pixels; default ``patch_size`` (no overlap).
        patients: CSV of ``slide,patient`` (slide: file stem or name); default: each slide its
            own patient.
        assume_mpp: um per level-0 pixel of slides that record none.

    Raises:
        ValueError: No slide could be used (the first reasons named), a slide missing from
            ``patients``, or ``out_dir`` holding a dataset cut at other settings.
    """
    from histokd.slides import SlideError, SlideReader

    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: allowed: {', '.join(LAYOUTS)}")
    stride = patch_size if stride is None else stride
    out_dir = Path(out_dir)
    settings = {
        "mpp": mpp,
        "patch_size": patch_size,
        "layout": layout,
        "stride": stride,
        "min_coverage": min_coverage,
    }
    _check_existing(out_dir, settings)
    pairs, bad = pair_annotations(slides, annotations_dir)
    patient_of = _read_patients(patients) if patients else {}
    if patient_of:
        missing = [
            s for s in pairs if Path(s).stem not in patient_of and Path(s).name not in patient_of
        ]
        if missing:
            raise ValueError(
                f"patients={str(patients)!r}: no row for slide(s) {', '.join(Path(s).name for s in missing[:5])}"
            )
    parsed: dict[str, AnnotationFile] = {}
    for slide, annotation in pairs.items():
        try:
            parsed[slide] = read_annotations(annotation)
        except AnnotationError as exc:
            bad.append((annotation, "annotations", exc.problem))
            continue
        if not parsed[slide].regions:
            bad.append((annotation, "annotations", "no classified area regions"))
            del parsed[slide]
    names = sorted({name for a in parsed.values() for name in a.class_names})
    class_names = (
        [BACKGROUND] + [n for n in names if n != BACKGROUND] if layout == "masks" else names
    )
    index = {
        name: k + (layout == "classes") for k, name in enumerate(class_names)
    }  # classes: 0 = none
    colours: dict[str, list[int]] = {}
    for a in parsed.values():
        for r in a.regions:
            if r.colour is not None:
                colours.setdefault(r.label, list(r.colour))
    from matplotlib.colors import TABLEAU_COLORS, to_rgb

    # the Tableau colours, as the inference overlays draw classes
    palette = [[round(255 * c) for c in to_rgb(v)] for v in TABLEAU_COLORS.values()]
    colours = {n: colours.get(n, palette[k % len(palette)]) for k, n in enumerate(class_names)}

    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    per_slide: dict[str, dict[str, int]] = {}
    written = 0
    for done, (slide, regions_file) in enumerate(parsed.items(), start=1):
        stem = Path(slide).stem
        patient = patient_of.get(stem, patient_of.get(Path(slide).name, stem))
        try:
            with SlideReader(slide, assume_mpp=assume_mpp) as reader:
                footprint = reader.footprint(patch_size, mpp=mpp)
                dx, dy = (e / patch_size for e in footprint.extent)
                cells = _grid(
                    regions_file,
                    footprint.extent,
                    (stride * dx, stride * dy),
                    reader.info.dimensions,
                )
                slide_rows, slide_written = [], 0
                for x, y in cells:
                    labels = rasterise_regions(
                        regions_file.regions, index, (x, y), (dx, dy), (patch_size, patch_size)
                    )
                    name = f"{stem}_{x}_{y}.png"
                    if layout == "classes":
                        shares = (
                            np.bincount(labels.ravel(), minlength=len(class_names) + 1)[1:]
                            / labels.size
                        )
                        if shares.max() < min_coverage:
                            continue
                        label = class_names[int(shares.argmax())]
                        image_path = out_dir / label / name
                        row = {"path": f"{label}/{name}", "label": label}
                    else:
                        if (labels > 0).mean() < min_coverage:
                            continue
                        image_path, mask_path = out_dir / "images" / name, out_dir / "masks" / name
                        row = {"image": f"images/{name}", "mask": f"masks/{name}"}
                        present = np.unique(labels)
                        label = ",".join(class_names[k] for k in present)
                        if not mask_path.is_file():
                            _write_png(mask_path, labels)
                    if not image_path.is_file():
                        _write_png(image_path, reader.read_region(x, y, patch_size, mpp=mpp))
                        slide_written += 1
                    slide_rows.append({**row, "slide": stem, "patient": patient, "_label": label})
        except SlideError as exc:
            bad.append((slide, "slide", exc.problem))
            print(f"slide {done}/{len(parsed)} {stem}: skipped ({exc.problem})", flush=True)
            continue
        rows += slide_rows
        written += slide_written
        counted = Counter(c for r in slide_rows for c in r["_label"].split(","))
        per_slide[stem] = dict(sorted(counted.items()))
        print(
            f"slide {done}/{len(parsed)} {stem}: {len(slide_rows)} patches "
            f"({slide_written} written, {len(slide_rows) - slide_written} on disk)",
            flush=True,
        )
    _write_bad_files(out_dir / BAD_FILES, bad)
    if not rows:
        reasons = "; ".join(f"{Path(f).name}: {r}" for f, _, r in bad[:3]) or (
            f"no patch reaches min_coverage={min_coverage}"
        )
        raise ValueError(
            f"no patches cut from {len(slides)} slide(s) ({reasons}); see {out_dir / BAD_FILES}"
        )
    counts = Counter(c for r in rows for c in r["_label"].split(","))
    counts = {n: counts.get(n, 0) for n in class_names}
    columns = ["path", "label"] if layout == "classes" else ["image", "mask"]
    with open(out_dir / f".{CSV_FILE}.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*columns, "slide", "patient"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(out_dir / f".{CSV_FILE}.tmp", out_dir / CSV_FILE)
    if layout == "masks":
        _write_text(out_dir / "classes.txt", "".join(f"{n}\n" for n in class_names))
    meta = {
        **settings,
        "magnification": 10.0 / mpp,
        "classes": class_names,
        "colours": colours,
        "num_patches": len(rows),
        "counts": {"per_class": counts, "per_slide": per_slide},
        "counting": "patches" if layout == "classes" else "patches holding each class",
        "source": {
            "annotations": str(Path(annotations_dir).resolve()),
            "slides": {Path(s).stem: {"slide": s, "annotations": pairs[s], "format": parsed[s].format}
                       for s in parsed if Path(s).stem in per_slide},
        },
    }  # fmt: skip
    _write_text(out_dir / "dataset.json", json.dumps(meta, indent=2) + "\n")
    return PatchDatasetResult(
        out_dir, out_dir / CSV_FILE, class_names, counts, len(rows), written, bad
    )


def _write_bad_files(path: Path, bad: list[tuple[str, str, str]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "kind", "reason"])
        writer.writerows(bad)
    os.replace(tmp, path)
