r"""Cut a labelled patch dataset from annotated slides (QuPath GeoJSON, Aperio XML, ASAP XML).

    python jobs/make_patch_dataset.py --slides /data/wsi --annotations /data/annotations \
        --output datasets/crc --mpp 0.5 --patch-size 256               # a folder per class
    python jobs/make_patch_dataset.py --slides /data/wsi --annotations /data/annotations \
        --output datasets/crc-seg --layout masks --patients patients.csv
    python jobs/finetune.py --data datasets/crc --group-by patient ...

Each slide <stem>.svs (any slide format) takes its regions from <stem>.geojson, <stem>.json
(QuPath: File > Export objects, with classes) or <stem>.xml (Aperio ImageScope or ASAP), in
level-0 pixels. Patches on a grid at --mpp, --patch-size pixels a side, every --stride pixels,
go to OUT/<class>/<slide>_<x>_<y>.png when one class covers --min-coverage of them (--layout
classes), or to OUT/images/ and OUT/masks/ (mask value = class index, 0 = unannotated; names in
classes.txt) when annotated over --min-coverage (--layout masks). OUT/dataset.csv lists them
with slide and patient columns (--patients: a CSV of slide,patient; default: one patient per
slide); OUT/dataset.json holds the classes, colours, scale and counts per class and slide.
Bad slides and annotation files are skipped and listed in OUT/bad_files.csv; a rerun skips
patches already cut.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

from histokd.cli import arg, print_fields, run_job
from histokd.run import RunFolderConfig


@dataclass
class PatchDatasetConfig(RunFolderConfig):
    """Which slides and annotations, how patches are cut, where the dataset goes."""

    run_name: str = arg("patches", "the dataset's folder name under --storage-path")
    slides: list[str] = arg(help="slide files, folders or .txt lists of paths", factory=list)
    annotations: str = arg(
        "", "folder of annotation files named like the slides (.geojson/.json/.xml)"
    )
    output: str | None = arg(None, "the dataset folder (instead of STORAGE/RUN_NAME)")
    mpp: float = arg(0.5, "um per patch pixel (20x: 0.5)")
    patch_size: int = arg(256, "patch side in pixels")
    layout: Literal["classes", "masks"] = arg(
        "classes", "classes: a folder per class; masks: image/mask pairs"
    )
    min_coverage: float = arg(
        0.5, "share of a patch one class (classes) or any class (masks) must cover"
    )
    stride: int | None = arg(None, "grid step in patch pixels; default: --patch-size (no overlap)")
    patients: str | None = arg(None, "CSV of slide,patient; default: each slide its own patient")
    assume_mpp: float | None = arg(None, "um/px of slides recording no MPP, resolution or power")

    def __post_init__(self) -> None:
        if self.output:
            import os

            path = os.path.abspath(os.path.expanduser(self.output.rstrip("/")))
            self.storage_path, self.run_name = os.path.dirname(path), os.path.basename(path)
        super().__post_init__()
        if not self.slides:
            raise ValueError("slides=[]: give slide files, folders or .txt lists (--slides)")
        if not self.annotations:
            raise ValueError("annotations='': give the folder of annotation files (--annotations)")
        if isinstance(self.mpp, bool) or not self.mpp > 0:
            raise ValueError(f"mpp={self.mpp!r}: must be a positive um/px (20x: 0.5)")
        for name in ("patch_size", "stride"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name}={value!r}: must be a positive integer (pixels)")
        if not 0 < self.min_coverage <= 1:
            raise ValueError(f"min_coverage={self.min_coverage!r}: must be in (0, 1]")


def _run(config: PatchDatasetConfig):
    from histokd.manifest import discover_slides
    from histokd.patch_dataset import make_patch_dataset

    return make_patch_dataset(
        discover_slides(config.slides), config.annotations, config.work_dir, mpp=config.mpp,
        patch_size=config.patch_size, layout=config.layout, min_coverage=config.min_coverage,
        stride=config.stride, patients=config.patients, assume_mpp=config.assume_mpp,
    )  # fmt: skip


def _report(result) -> None:
    print_fields({
        "dataset": f"{result.csv_path}  ({result.num_patches} patches, {result.num_written} written now)",
        "classes": ", ".join(f"{n} {c}" for n, c in result.counts.items()),
        "bad files": f"{len(result.bad)}  ({result.bad_files_path})",
    })  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return run_job(PatchDatasetConfig, _run, argv, description=__doc__, report=_report)


if __name__ == "__main__":
    sys.exit(main())
