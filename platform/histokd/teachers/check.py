"""Check a teacher against a user's own annotated nuclei before a long pretraining run.

A StarDist teacher labels well only when it runs as it was trained (``/work/shared/TEACHER.md``:
IoU 0.66 as trained against 0.31 jointly normalised at half the scale, on real H&E). This
measures, on the user's images and true nuclei masks, the pooled IoU and Dice of RCKD's pseudo
label (Eq. 2, ``probability >= alpha``) for every combination of

- alpha (several thresholds),
- normalisation (joint over the channels, or per channel), and
- the scale the teacher labels at: its own (``teacher_mpp``, when known) against the patches'
  (``patch_mpp``: the pretraining patches' pixel size, 20x = 0.5 um/px),

draws an overlay of the best settings, and writes them as a ``histokd_teacher.json`` to put in
the teacher's model folder (or to pass to the jobs). Teachers without those settings (the
colour-deconvolution teacher) are checked by alpha alone.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from histokd.cli import arg
from histokd.run import RunFolderConfig, take_legacy_device, take_legacy_out
from histokd.teachers.base import TeacherError
from histokd.teachers.quality import binary_iou
from histokd.teachers.stardist_models import DEFAULTS_FILE, NORMALIZATIONS
from histokd.teachers.training import ALPHA_CANDIDATES, InstanceImage, load_image_mask_pairs

__all__ = ["CheckConfig", "CheckResult", "check_teacher"]

log = logging.getLogger(__name__)


@dataclass
class CheckConfig(RunFolderConfig):
    """What to check a teacher on, and where the report goes.

    Attributes:
        teacher: A StarDist pretrained name (``2D_versatile_he``), ``stardist:<name>``, a
            StarDist model folder, a registered teacher (``demo``, ``deconvolution``), or
            ``package.module:name``.
        masks: The images' nuclei masks, with the same file stems: instance labels
            (0 = background) or binary masks, as png, tif or npy, or MoNuSeg XML.
        run_name: The report folder ``STORAGE/RUN_NAME``: ``results.csv``, ``results.json``,
            ``overlay.png``, the best settings as ``histokd_teacher.json`` and the teacher's
            nuclei at them as QuPath GeoJSON, ``nuclei/<image stem>.geojson``.
        patch_mpp: The pixel size of the pretraining patches (RCKD: 20x = 0.5 um/px): the
            scale labelled at when the teacher is not resampled.
        teacher_mpp: The scale the teacher was trained at; default: its own setting
            (``histokd_teacher.json``, or 2D_versatile_he's 0.25).
        teacher_backend: ``torch`` or ``tensorflow`` (StarDist itself: the ``tf-cpu`` extra).
    """

    teacher: str = arg("demo", "StarDist name (2D_versatile_he) or folder, demo or deconvolution")
    images: str = arg("", "folder of RGB images (png, jpg, tif) of annotated tissue")
    masks: str = arg("", "folder of their nuclei masks (same stems; png/tif/npy or MoNuSeg XML)")
    run_name: str = arg("teacher_check", "report folder: results, overlay, histokd_teacher.json")
    mpp: float = arg(0.5, "pixel size of the images in um/px (40x: 0.25, 20x: 0.5)")
    patch_mpp: float = arg(0.5, "um/px of the pretraining patches (RCKD: 20x = 0.5)")
    teacher_mpp: float | None = arg(None, "um/px the teacher was trained at; default: its own")
    alphas: tuple[float, ...] = arg(ALPHA_CANDIDATES, "Eq. 2 thresholds to try")
    teacher_backend: Literal["torch", "tensorflow"] = arg("torch", "StarDist in PyTorch or TF")
    use_gpu: bool | None = arg(None, "run the teacher on a GPU (torch backend); auto: if any")
    overlays: int = arg(4, "images drawn in overlay.png")
    out: str | None = arg(None, "deprecated", hidden=True)
    device: str | None = arg(None, "deprecated", hidden=True)

    def __post_init__(self) -> None:
        take_legacy_out(self, self.out)
        take_legacy_device(self, self.device)
        self.out = self.device = None
        super().__post_init__()
        if not self.images or not self.masks:
            raise TeacherError(
                "images and masks: both folders are needed (--images DIR --masks DIR)"
            )
        for name in ("mpp", "patch_mpp"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0.01 <= value <= 100
            ):
                raise TeacherError(
                    f"{name}={value!r}: must be a pixel size in um/px in [0.01, 100] (20x: 0.5)"
                )
        self.alphas = tuple(float(a) for a in self.alphas)
        if not self.alphas or not all(0 < a <= 1 for a in self.alphas):
            raise TeacherError(f"alphas={self.alphas!r}: each must be in (0, 1] (RCKD Eq. 2)")


@dataclass
class CheckResult:
    """The measured table and the best settings.

    Attributes:
        rows: One dict per (normalization, scale, alpha): ``iou``, ``dice``, ``nucleus_fraction``.
        best: The settings of the best row (highest IoU), as ``histokd_teacher.json`` holds them.
        out_dir: The report folder.
    """

    rows: list[dict]
    best: dict
    out_dir: Path


def _candidates(teacher, config: CheckConfig) -> list[tuple[str | None, float | None]]:
    """(normalization, mpp the teacher labels at) pairs; (None, None) for teachers without them."""
    if not hasattr(teacher, "normalization"):
        return [(None, None)]
    scales = [config.patch_mpp]
    own = config.teacher_mpp if config.teacher_mpp is not None else teacher.teacher_mpp
    if own is not None and abs(own / config.patch_mpp - 1) > 0.02:
        scales.insert(0, float(own))
    return [(norm, mpp) for norm in NORMALIZATIONS for mpp in scales]


def _probabilities(
    teacher, items: list[InstanceImage], normalization, label_mpp, image_mpp
) -> list[np.ndarray]:
    if normalization is not None:
        teacher.normalization = normalization
        teacher.teacher_mpp = label_mpp
        teacher.patch_mpp = image_mpp
    return [teacher.probability(item.image[None])[0] for item in items]


def check_teacher(config: CheckConfig) -> CheckResult:
    """Measure the teacher on the annotated images; write the report; return the table.

    Raises:
        TeacherError: Bad folders, images or masks, or a teacher that cannot be built.
    """
    from histokd.teachers.registry import build_teacher

    items = load_image_mask_pairs(config.images, Path(config.masks))
    kwargs = {"backend": config.teacher_backend}
    if config.teacher != "deconvolution":
        device = {None: "auto", True: "cuda", False: "cpu"}[config.use_gpu]
        kwargs["device"] = device if config.teacher_backend == "torch" else None
    teacher = build_teacher(config.teacher, **{k: v for k, v in kwargs.items() if v is not None})
    truth = np.concatenate([(item.labels > 0).ravel() for item in items])
    rows, maps = [], {}
    for normalization, label_mpp in _candidates(teacher, config):
        probs = _probabilities(teacher, items, normalization, label_mpp, config.mpp)
        flat = np.concatenate([p.ravel() for p in probs])
        maps[(normalization, label_mpp)] = probs
        for alpha in config.alphas:
            mask = flat >= alpha  # RCKD Eq. 2
            iou = binary_iou(mask, truth)
            rows.append({
                "normalization": normalization or "-",
                "label_mpp": label_mpp if label_mpp is not None else "-",
                "scale": _scale_name(label_mpp, config),
                "alpha": alpha,
                "iou": round(iou, 4),
                "dice": round(2 * iou / (1 + iou), 4),
                "nucleus_fraction": round(float(mask.mean()), 4),
            })  # fmt: skip
    truth_fraction = float(truth.mean())
    best_row = max(rows, key=lambda r: (r["iou"], r["alpha"]))
    best = {"alpha": best_row["alpha"], "mask_mode": "probability"}
    if best_row["normalization"] != "-":
        best.update(
            normalization=best_row["normalization"],
            percentiles=list(teacher.percentiles),
            teacher_mpp=best_row["label_mpp"],
        )
    best.update(
        chosen_by=f"best pooled IoU of probability >= alpha against the true nuclei of {config.images} "
        f"(jobs/check_teacher.py, images at {config.mpp:g} um/px)",
        check_iou=best_row["iou"],
        check_dice=best_row["dice"],
        true_nucleus_fraction=round(truth_fraction, 4),
        teacher=config.teacher,
    )
    out = config.work_dir
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    report = {"config": {k: v for k, v in vars(config).items()}, "num_images": len(items),
              "true_nucleus_fraction": round(truth_fraction, 4), "rows": rows, "best": best}  # fmt: skip
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / DEFAULTS_FILE).write_text(json.dumps(best, indent=2) + "\n")
    best_maps = maps[(None if best_row["normalization"] == "-" else best_row["normalization"],
                      None if best_row["label_mpp"] == "-" else best_row["label_mpp"])]  # fmt: skip
    _draw_overlay(
        items[: config.overlays],
        best_maps,
        best["alpha"],
        out / "overlay.png",
        teacher_name=config.teacher,
    )
    _write_nuclei(items, best_maps, best["alpha"], out / "nuclei")
    return CheckResult(rows, best, out)


def _write_nuclei(
    items: list[InstanceImage], probs: list[np.ndarray], alpha: float, folder: Path
) -> None:
    """``folder/<image stem>.geojson``: the teacher's nuclei at the best alpha (connected components
    of Eq. 2's mask) as QuPath detections in the image's pixels (QuPath: open the image, then
    File > Import objects)."""
    from skimage.measure import label

    from histokd.inference.geojson import nuclei_features, write_geojson

    folder.mkdir(exist_ok=True)
    for item, prob in zip(items, probs, strict=True):
        instances = label(prob >= alpha, connectivity=1)  # RCKD Eq. 2
        write_geojson(
            folder / f"{Path(item.source).stem}.geojson",
            nuclei_features(instances, probability=prob),
        )


def _scale_name(label_mpp: float | None, config: CheckConfig) -> str:
    if label_mpp is None:
        return "-"
    return "patch" if abs(label_mpp / config.patch_mpp - 1) <= 0.02 else "teacher"


def format_table(rows: list[dict]) -> str:
    """The table as text: one line per normalization and scale, IoU per alpha."""
    alphas = sorted({r["alpha"] for r in rows})
    lines = ["normalization  scale (um/px)    " + "  ".join(f"a={a:<5g}" for a in alphas)]
    groups: dict[tuple, dict] = {}
    for r in rows:
        groups.setdefault((r["normalization"], r["scale"], r["label_mpp"]), {})[r["alpha"]] = r[
            "iou"
        ]
    for (norm, scale, mpp), ious in groups.items():
        where = f"{scale} ({mpp})" if scale != "-" else "-"
        lines.append(f"{norm:<14} {where:<16} " + "  ".join(f"{ious[a]:<7.3f}" for a in alphas))
    return "\n".join(lines)


def _draw_overlay(
    items: list[InstanceImage], probs: list[np.ndarray], alpha: float, path: Path, teacher_name: str
) -> None:
    """Image | true nuclei (green) and pseudo label (magenta) outlines, for a few images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    fig, axes = plt.subplots(len(items), 2, figsize=(8, 4 * len(items)), squeeze=False)
    for (ax_image, ax_overlay), item, prob in zip(axes, items, probs, strict=False):
        ax_image.imshow(item.image)
        ax_image.set_title(Path(item.source).name, fontsize=8)
        overlay = item.image.copy()
        overlay[find_boundaries(item.labels > 0)] = (0, 200, 0)
        overlay[find_boundaries(prob >= alpha)] = (230, 0, 230)
        ax_overlay.imshow(overlay)
        ax_overlay.set_title(
            f"true nuclei (green), {teacher_name} at alpha {alpha:g} (magenta)", fontsize=8
        )
        for ax in (ax_image, ax_overlay):
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
