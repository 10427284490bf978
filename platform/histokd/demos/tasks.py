"""Demo downstream tasks cut from synthetic slides, so fine-tuning runs offline in minutes.

The synthetic slides (``histokd.demos.synthetic``) are divided into large regions of tissue classes
(stroma, tumour, lymphocytes) that differ in nuclei density, size, shape and darkness, with an
exact region mask. From them this module writes two datasets in the layouts that
``histokd.finetune.datasets`` reads:

* ``classification/<class>/<patch>.png``: non-overlapping patches at 20x lying almost entirely
  (``purity``) in one class's region, like CRC's or Lymph's patches, and
* ``segmentation/{images,masks}/<patch>.png`` with ``classes.txt``: patches with enough tissue
  and their region masks (0 = background: glass and lumens; k = the k-th tissue class), like
  BACH (WSI)'s region segmentation.

The slides use a different seed from the pretraining demo slides (seed 0), so the RCKD backbone
has not seen the test images, even unlabelled. ``tasks.json`` (written last) records the
parameters; a second call with the same parameters reuses the files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from histokd.finetune.datasets import SCALE_FILE

__all__ = ["DEMO_TASK_SEED", "DemoTasks", "make_demo_tasks"]

DEMO_TASK_SEED = 1  # the pretraining demo uses seed 0: keep downstream images unseen
_VERSION = 2  # 2: dataset.json records the magnification and patch size


@dataclass(frozen=True)
class DemoTasks:
    """Where the demo tasks are and what they hold.

    Attributes:
        classification_dir: Folder-per-class classification dataset.
        segmentation_dir: Image/mask pairs with ``classes.txt``.
        slides_dir: The synthetic slides they were cut from.
        class_names: Tissue classes (classification labels; segmentation adds ``background``).
        classification_counts: Patches per class.
        segmentation_count: Image/mask pairs.
    """

    classification_dir: Path
    segmentation_dir: Path
    slides_dir: Path
    class_names: tuple[str, ...]
    classification_counts: dict[str, int]
    segmentation_count: int


def make_demo_tasks(
    out_dir: str | os.PathLike,
    n_slides: int = 4,
    seed: int = DEMO_TASK_SEED,
    slide_size: int = 4096,
    patch_size: int = 256,
    segmentation_patch_size: int = 512,
    magnification: float = 20.0,
    purity: float = 0.95,
    min_tissue: float = 0.5,
    max_per_class: int | None = None,
) -> DemoTasks:
    """Write (or reuse) the demo classification and segmentation datasets.

    Args:
        out_dir: Output folder (``slides/``, ``classification/``, ``segmentation/``).
        n_slides: Synthetic slides to cut.
        seed: Seed of the slides (default differs from the pretraining demo's).
        slide_size: Level-0 side of each slide in pixels (0.5 um/px).
        patch_size: Classification patch side in pixels at ``magnification``.
        segmentation_patch_size: Segmentation patch side in pixels at ``magnification``.
        magnification: Magnification of the patches (20x, like most of RCKD's datasets).
        purity: Least fraction of a classification patch inside one class's region.
        min_tissue: Least tissue fraction of a segmentation patch.
        max_per_class: Cap on classification patches per class (a seeded random subset).

    Returns:
        The datasets' locations and counts.
    """
    from histokd.demos.synthetic import make_demo_slides
    from histokd.slides import SlideReader

    if not 0.5 <= purity <= 1 or not 0 <= min_tissue <= 1:
        raise ValueError(
            f"purity={purity!r}, min_tissue={min_tissue!r}: need 0.5 <= purity <= 1 and 0 <= min_tissue <= 1"
        )
    for name, value in (
        ("n_slides", n_slides),
        ("patch_size", patch_size),
        ("segmentation_patch_size", segmentation_patch_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a positive integer")
    out = Path(out_dir)
    params = {
        "version": _VERSION, "n_slides": n_slides, "seed": seed, "slide_size": slide_size, "patch_size": patch_size,
        "segmentation_patch_size": segmentation_patch_size, "magnification": magnification, "purity": purity,
        "min_tissue": min_tissue, "max_per_class": max_per_class,
    }  # fmt: skip
    marker = out / "tasks.json"
    if marker.is_file():
        meta = json.loads(marker.read_text())
        if meta.get("params") == params:
            return _tasks_from(out, meta)
    slides = make_demo_slides(
        out / "slides", n=n_slides, seed=seed, width=slide_size, height=slide_size
    )
    class_names = slides[0].class_names
    cls_dir, seg_dir = out / "classification", out / "segmentation"
    for name in class_names:
        _clear(cls_dir / name)
    _clear(seg_dir / "images")
    _clear(seg_dir / "masks")
    (seg_dir / "classes.txt").write_text("\n".join(("background", *class_names)) + "\n")

    by_class: dict[int, list[tuple[np.ndarray, str]]] = {
        k: [] for k in range(1, len(class_names) + 1)
    }
    segmentation_count = 0
    for slide in slides:
        with SlideReader(slide.slide_path) as reader:
            scale = reader.downsample_for(magnification)
            for size, task in (
                (patch_size, "classification"),
                (segmentation_patch_size, "segmentation"),
            ):
                extent = int(round(size * scale))
                for y in range(0, slide.height - extent + 1, extent):
                    for x in range(0, slide.width - extent + 1, extent):
                        regions = slide.read_truth(
                            x, y, extent, extent, kind="regions", size=(size, size)
                        )
                        fractions = (
                            np.bincount(regions.ravel(), minlength=len(class_names) + 1)
                            / regions.size
                        )
                        stem = f"{slide.slide_path.stem}_x{x}_y{y}"
                        if task == "classification":
                            label = int(np.argmax(fractions[1:])) + 1
                            if fractions[label] >= purity:
                                by_class[label].append(
                                    (reader.read_region(x, y, size, magnification), stem)
                                )
                        elif 1 - fractions[0] >= min_tissue:
                            Image.fromarray(reader.read_region(x, y, size, magnification)).save(
                                seg_dir / "images" / f"{stem}.png"
                            )
                            Image.fromarray(regions.astype(np.uint8)).save(
                                seg_dir / "masks" / f"{stem}.png"
                            )
                            segmentation_count += 1
    rng = np.random.default_rng(seed)
    counts = {}
    for label, patches in by_class.items():
        if max_per_class is not None and len(patches) > max_per_class:
            keep = np.sort(rng.choice(len(patches), max_per_class, replace=False))
            patches = [patches[i] for i in keep]
        for image, stem in patches:
            Image.fromarray(image).save(cls_dir / class_names[label - 1] / f"{stem}.png")
        counts[class_names[label - 1]] = len(patches)
    for folder, size in ((cls_dir, patch_size), (seg_dir, segmentation_patch_size)):
        (folder / SCALE_FILE).write_text(
            json.dumps({"magnification": magnification, "patch_size": size}) + "\n"
        )
    meta = {
        "params": params,
        "class_names": list(class_names),
        "classification_counts": counts,
        "segmentation_count": segmentation_count,
    }
    tmp = marker.with_name(".tasks.json.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, marker)
    return _tasks_from(out, meta)


def _clear(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path in folder.glob("*.png"):
        path.unlink()


def _tasks_from(out: Path, meta: dict) -> DemoTasks:
    return DemoTasks(
        classification_dir=out / "classification",
        segmentation_dir=out / "segmentation",
        slides_dir=out / "slides",
        class_names=tuple(meta["class_names"]),
        classification_counts=dict(meta["classification_counts"]),
        segmentation_count=int(meta["segmentation_count"]),
    )
