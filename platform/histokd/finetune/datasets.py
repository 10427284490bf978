"""Downstream datasets: what is on disk, read into a `TaskDataset` of file paths and labels.

Three layouts (``docs/datasets.md`` maps the paper's six datasets onto them):

* Classification, a folder per class: ``ROOT/<class>/**/<image>``. Images are found
  recursively under each class folder, so BreakHis's nested tree works with ROOT at
  ``.../breast``. Fixed lists: ``ROOT/{train,val,test}/<class>/...`` (any of the three).
* Classification or segmentation from a CSV: columns ``path,label`` or ``image,mask``,
  with an optional ``split`` column (``train``/``val``/``test``) and optional group columns
  (``patient``, ``slide``: any column, named by ``group_by``, whose rows
  `histokd.finetune.splits.make_splits` keeps in one part); relative paths are relative to the
  CSV's folder.
* Segmentation, image and mask pairs: ``ROOT/images/<stem>.<ext>`` with
  ``ROOT/masks/<stem>.<ext>`` (a single-channel image whose pixel value is the class index;
  ``ignore_index``, 255 by default, marks unlabelled pixels), or the same under
  ``ROOT/{train,val,test}/``. Class names come from ``ROOT/classes.txt`` (line k names value
  k), otherwise they are ``class_0 ... class_{C-1}`` with C from the largest mask value.

A folder holding a ``dataset.csv`` (what ``jobs/make_patch_dataset.py`` writes, with its slide
and patient columns) is read as that CSV.

Images of any size are accepted; `ImageSamples` resizes them to the input resolution, making
non-square ones square first by one of `RESIZE_MODES`.

The scale of the images, which whole-slide inference must match, can be stated in a
``dataset.json`` in ROOT (beside the CSV for a CSV): ``{"magnification": 20, "patch_size": 256}``,
the magnification the images were cut at and their side in pixels there. Without it the
side is taken from the images when they are all the same square size, and the magnification
from ``--magnification``; the fine-tuned model file records both.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "MASK_MODES",
    "RESIZE_MODES",
    "SPLIT_NAMES",
    "TaskDataset",
    "check_task_dataset",
    "load_classification_csv",
    "load_classification_folder",
    "load_segmentation_csv",
    "load_segmentation_pairs",
    "load_task_dataset",
    "read_scale",
]

SCALE_FILE = "dataset.json"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SPLIT_NAMES = ("train", "val", "test")
MASK_MODES = ("L", "P", "I", "I;16", "1")  # single-channel class indices
# How a non-square image becomes square before its resize (`histokd.finetune.samples.to_square`).
RESIZE_MODES = ("squash", "center-crop", "pad")
Task = Literal["classification", "segmentation"]


@dataclass
class TaskDataset:
    """A downstream dataset as paths and labels.

    Attributes:
        task: ``classification`` or ``segmentation``.
        images: Image paths.
        class_names: Class names; label (or mask value) k is ``class_names[k]``.
        labels: Class index per image (classification).
        masks: Mask path per image (segmentation).
        fixed: Per image ``train``/``val``/``test`` from the dataset's own lists, or None.
        source: Where it was read from.
        magnification: Magnification the images were cut at, from ``dataset.json``, or None.
        patch_size: Side in pixels of an image at ``magnification``, from ``dataset.json``, or None.
        groups: Per image its group (patient, slide) from the CSV's ``group_by`` column, or None.
    """

    task: Task
    images: list[str]
    class_names: tuple[str, ...]
    labels: list[int] | None = None
    masks: list[str] | None = None
    fixed: list[str | None] | None = None
    source: str = ""
    magnification: float | None = None
    patch_size: int | None = None
    groups: list[str] | None = None

    def __post_init__(self) -> None:
        if not self.images:
            raise ValueError(
                f"{self.source or 'dataset'}: no images found (extensions: {', '.join(IMAGE_EXTENSIONS)})"
            )
        if self.task == "classification" and (
            self.labels is None or len(self.labels) != len(self.images)
        ):
            raise ValueError(f"{self.source}: a classification dataset needs one label per image")
        if self.task == "segmentation" and (
            self.masks is None or len(self.masks) != len(self.images)
        ):
            raise ValueError(f"{self.source}: a segmentation dataset needs one mask per image")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return len(self.class_names)

    def class_counts(self) -> dict[str, int]:
        """Images per class (classification)."""
        if self.labels is None:
            return {}
        counts = np.bincount(np.asarray(self.labels), minlength=self.num_classes)
        return {name: int(c) for name, c in zip(self.class_names, counts, strict=True)}

    def common_side(self, limit: int = 2000) -> int | None:
        """The side of the images when they are all the same square size (headers only), else None.

        Only the first ``limit`` images are looked at, so a huge dataset costs no full scan.
        """
        from PIL import Image

        sides = set()
        for path in self.images[:limit]:
            with Image.open(path) as image:
                sides.add(image.size)
            if len(sides) > 1:
                return None
        ((width, height),) = sides
        return width if width == height else None

    def size_range(self, limit: int = 2000) -> tuple[tuple[int, int], tuple[int, int]]:
        """The smallest and the largest image by area, as ``(width, height)`` (headers of the
        first ``limit`` images only)."""
        from PIL import Image

        sizes = set()
        for path in self.images[:limit]:
            with Image.open(path) as image:
                sizes.add(image.size)
        ordered = sorted(sizes, key=lambda size: (size[0] * size[1], size))
        return ordered[0], ordered[-1]

    def take(self, indices: Sequence[int]) -> TaskDataset:
        """The dataset of the samples at ``indices`` (same classes, source and scale)."""
        indices = [int(i) for i in indices]

        def pick(values: list | None) -> list | None:
            return None if values is None else [values[i] for i in indices]

        return TaskDataset(
            self.task, pick(self.images), self.class_names, labels=pick(self.labels), masks=pick(self.masks),
            fixed=pick(self.fixed), source=self.source, magnification=self.magnification, patch_size=self.patch_size,
            groups=pick(self.groups),
        )  # fmt: skip

    def subset(self, indices: Sequence[int]) -> dict[str, list]:
        """The samples at ``indices`` as plain lists (for a Ray Train worker's config)."""
        indices = [int(i) for i in indices]
        out: dict[str, list] = {"images": [self.images[i] for i in indices]}
        if self.labels is not None:
            out["labels"] = [int(self.labels[i]) for i in indices]
        if self.masks is not None:
            out["masks"] = [self.masks[i] for i in indices]
        return out


def _is_image(path: Path) -> bool:
    return (
        path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    )


def _subfolders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_roots(root: Path) -> list[tuple[str | None, Path]]:
    """``[(split name, folder)]``: the split subfolders when any exist, else the root itself."""
    present = [(name, root / name) for name in SPLIT_NAMES if (root / name).is_dir()]
    return present or [(None, root)]


def load_classification_folder(root: str | os.PathLike) -> TaskDataset:
    """A folder per class, optionally under ``train``/``val``/``test`` (see the module docstring).

    Raises:
        ValueError: The folder is missing, has no class folders, or a class folder has no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data={str(root)!r}: no such folder")
    roots = _split_roots(root)
    class_names = sorted({p.name for _, folder in roots for p in _subfolders(folder)})
    if not class_names:
        raise ValueError(
            f"data={str(root)!r}: no class folders; expected ROOT/<class>/<images> or ROOT/train/<class>/<images>"
        )
    images, labels, fixed = [], [], []
    for split, folder in roots:
        for label, name in enumerate(class_names):
            class_dir = folder / name
            if not class_dir.is_dir():
                continue
            found = sorted(str(p) for p in class_dir.rglob("*") if _is_image(p))
            if not found and split is None:
                raise ValueError(
                    f"data={str(root)!r}: class folder {str(class_dir)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
                )
            images += found
            labels += [label] * len(found)
            fixed += [split] * len(found)
    return TaskDataset(
        "classification", images, tuple(class_names), labels=labels,
        fixed=fixed if roots[0][0] is not None else None, source=str(root),
    )  # fmt: skip


def _read_csv(
    path: Path, required: Sequence[str], group_by: str | None = None
) -> list[dict[str, str]]:
    if not path.is_file():
        raise ValueError(f"data={str(path)!r}: no such CSV file")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in required if c not in columns]
        if missing:
            raise ValueError(
                f"data={str(path)!r}: CSV lacks column(s) {missing}; has {columns}; need {list(required)} (and optionally split)"
            )
        if group_by is not None and group_by not in columns:
            raise ValueError(
                f"group_by={group_by!r}: {path} has no such column; its columns: {', '.join(columns)}"
            )
        rows = list(reader)
    if not rows:
        raise ValueError(f"data={str(path)!r}: CSV has no rows")
    return rows


def _resolve(base: Path, value: str, csv_path: Path, line: int, column: str) -> str:
    path = Path(value)
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise ValueError(
            f"{csv_path}: line {line}: {column} {value!r} does not exist (looked for {path})"
        )
    return str(path)


def _groups_of(
    rows: Sequence[dict[str, str]], group_by: str | None, csv_path: Path
) -> list[str] | None:
    """The ``group_by`` column, stripped; an empty cell is an error naming its line."""
    if group_by is None:
        return None
    groups = [(row.get(group_by) or "").strip() for row in rows]
    for line, group in enumerate(groups, start=2):
        if not group:
            raise ValueError(
                f"{csv_path}: line {line}: empty {group_by!r} (group_by needs a group on every row)"
            )
    return groups


def _split_of(row: dict[str, str], csv_path: Path, line: int) -> str | None:
    split = (row.get("split") or "").strip().lower() or None
    if split is not None and split not in SPLIT_NAMES:
        raise ValueError(
            f"{csv_path}: line {line}: split {split!r}; allowed: train, val, test or empty"
        )
    return split


def load_classification_csv(path: str | os.PathLike, group_by: str | None = None) -> TaskDataset:
    """A CSV of ``path,label[,split]``; labels are class names (or integers), sorted for indices.

    Args:
        path: The CSV file.
        group_by: A column (``patient``, ``slide``) whose rows stay in one part of each split.

    Raises:
        ValueError: Missing columns or files, a bad split name or an empty group, naming the line.
    """
    path = Path(path)
    rows = _read_csv(path, ("path", "label"), group_by)
    base = path.parent
    names = [r["label"].strip() for r in rows]
    if all(n.lstrip("-").isdigit() for n in names):
        class_names = tuple(str(i) for i in range(max(int(n) for n in names) + 1))
    else:
        class_names = tuple(sorted(set(names)))
    index = {n: i for i, n in enumerate(class_names)}
    images, labels, fixed = [], [], []
    for line, row in enumerate(rows, start=2):
        if names[line - 2] not in index or not names[line - 2]:
            raise ValueError(f"{path}: line {line}: empty or negative label {names[line - 2]!r}")
        images.append(_resolve(base, row["path"].strip(), path, line, "path"))
        labels.append(index[names[line - 2]])
        fixed.append(_split_of(row, path, line))
    return TaskDataset("classification", images, class_names, labels=labels,
                       fixed=fixed if any(fixed) else None, source=str(path),
                       groups=_groups_of(rows, group_by, path))  # fmt: skip


def _read_class_names(root: Path, masks: Sequence[str]) -> tuple[str, ...]:
    names_file = root / "classes.txt"
    if names_file.is_file():
        names = tuple(line.strip() for line in names_file.read_text().splitlines() if line.strip())
        if not names:
            raise ValueError(
                f"{names_file}: empty; write one class name per line (line k names mask value k)"
            )
        return names
    from PIL import Image

    top = 0
    for mask in masks:
        values = np.unique(np.asarray(Image.open(mask)))
        values = values[values != 255]
        top = max(top, int(values.max()) if values.size else 0)
    return tuple(f"class_{k}" for k in range(top + 1))


def load_segmentation_pairs(root: str | os.PathLike) -> TaskDataset:
    """``ROOT[/split]/images/<stem>.*`` with ``ROOT[/split]/masks/<stem>.*``.

    Raises:
        ValueError: Missing folders, or an image without a mask (naming the image).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data={str(root)!r}: no such folder")
    roots = _split_roots(root)
    images, masks, fixed = [], [], []
    for split, folder in roots:
        image_dir, mask_dir = folder / "images", folder / "masks"
        if not image_dir.is_dir() or not mask_dir.is_dir():
            raise ValueError(
                f"data={str(root)!r}: expected folders {image_dir} and {mask_dir} (image/mask pairs with the same stem)"
            )
        mask_by_stem = {p.stem: str(p) for p in mask_dir.iterdir() if _is_image(p)}
        for image in sorted(p for p in image_dir.iterdir() if _is_image(p)):
            if image.stem not in mask_by_stem:
                raise ValueError(
                    f"data={str(root)!r}: image {image} has no mask {mask_dir}/{image.stem}.*"
                )
            images.append(str(image))
            masks.append(mask_by_stem[image.stem])
            fixed.append(split)
    return TaskDataset("segmentation", images, _read_class_names(root, masks), masks=masks,
                       fixed=fixed if roots[0][0] is not None else None, source=str(root))  # fmt: skip


def load_segmentation_csv(path: str | os.PathLike, group_by: str | None = None) -> TaskDataset:
    """A CSV of ``image,mask[,split]``; class names from ``classes.txt`` beside the CSV; rows of
    one ``group_by`` value stay in one part of each split."""
    path = Path(path)
    rows = _read_csv(path, ("image", "mask"), group_by)
    images, masks, fixed = [], [], []
    for line, row in enumerate(rows, start=2):
        images.append(_resolve(path.parent, row["image"].strip(), path, line, "image"))
        masks.append(_resolve(path.parent, row["mask"].strip(), path, line, "mask"))
        fixed.append(_split_of(row, path, line))
    return TaskDataset("segmentation", images, _read_class_names(path.parent, masks), masks=masks,
                       fixed=fixed if any(fixed) else None, source=str(path),
                       groups=_groups_of(rows, group_by, path))  # fmt: skip


def load_task_dataset(
    data: str | os.PathLike, task: Task, group_by: str | None = None
) -> TaskDataset:
    """Read a dataset in any of the layouts of the module docstring.

    Args:
        data: A folder or a ``.csv`` file.
        task: ``classification`` or ``segmentation``.
        group_by: A CSV column (``patient``, ``slide``) to split by; CSV datasets only.

    Raises:
        ValueError: Naming the path and what was expected.
    """
    path = Path(data)
    if task not in ("classification", "segmentation"):
        raise ValueError(f"task={task!r}: allowed: classification, segmentation")
    from histokd.patch_dataset import CSV_FILE

    if path.is_dir() and (path / CSV_FILE).is_file():  # make_patch_dataset's output
        path = path / CSV_FILE
    if group_by and path.suffix.lower() != ".csv":
        raise ValueError(
            f"group_by={group_by!r}: only a CSV dataset has group columns; data={str(path)!r} is a folder"
        )
    if path.suffix.lower() == ".csv":
        dataset = (
            load_classification_csv(path, group_by or None)
            if task == "classification"
            else load_segmentation_csv(path, group_by or None)
        )
    else:
        dataset = (
            load_classification_folder(path)
            if task == "classification"
            else load_segmentation_pairs(path)
        )
    scale = read_scale(path.parent if path.suffix.lower() == ".csv" else path)
    dataset.magnification, dataset.patch_size = scale.get("magnification"), scale.get("patch_size")
    return dataset


def check_task_dataset(
    dataset: TaskDataset, max_bad_fraction: float, report_dir: str | os.PathLike
) -> TaskDataset:
    """The dataset without its unreadable images (and masks), checked on the driver before training.

    The rules are :mod:`histokd.image_check`'s: bad files listed in ``report_dir/bad_images.csv``
    and counted on one line; an error when more than ``max_bad_fraction`` of the samples are bad,
    fewer than two classes remain, or one of the dataset's own ``train``/``val``/``test`` lists
    is left empty.

    Raises:
        ValueError: The dataset is unusable, naming it and why.
    """
    from collections import Counter

    from histokd.image_check import require_splits, require_two_classes, screen_samples

    if dataset.masks is not None:
        samples = list(zip(dataset.images, dataset.masks, strict=True))
        modes = [None, MASK_MODES]
    else:
        samples, modes = [(image,) for image in dataset.images], None
    kept = screen_samples(samples, source=dataset.source, max_bad_fraction=max_bad_fraction,
                          report_dir=report_dir, modes=modes)  # fmt: skip
    checked = dataset if len(kept) == len(dataset) else dataset.take(kept)
    if dataset.fixed is not None:
        listed = [Counter(s for s in d.fixed if s) for d in (dataset, checked)]
        require_splits(dataset.source, *listed)
    if checked.labels is not None:
        require_two_classes(dataset.source, checked.class_counts())
    else:  # segmentation: the classes the masks may hold
        require_two_classes(dataset.source, dict.fromkeys(checked.class_names, len(checked)))
    return checked


def read_scale(root: str | os.PathLike) -> dict[str, float | int]:
    """``magnification`` and ``patch_size`` from ``ROOT/dataset.json``; empty when there is none.

    Raises:
        ValueError: The file is not JSON, or a value is not positive, naming the file.
    """
    from histokd.cli import parse_json_object

    path = Path(root) / SCALE_FILE
    if not path.is_file():
        return {}
    meta = parse_json_object(
        path.read_text(), str(path), '{"magnification": 20, "patch_size": 256}'
    )
    out: dict[str, float | int] = {}
    magnification = meta.get("magnification")
    if magnification is not None:
        if (
            isinstance(magnification, bool)
            or not isinstance(magnification, (int, float))
            or not magnification > 0
        ):
            raise ValueError(
                f"{path}: magnification={magnification!r}: must be a positive number (e.g. 20)"
            )
        out["magnification"] = float(magnification)
    patch_size = meta.get("patch_size")
    if patch_size is not None:
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size <= 0:
            raise ValueError(
                f"{path}: patch_size={patch_size!r}: must be a positive integer (pixels at the magnification)"
            )
        out["patch_size"] = patch_size
    return out
