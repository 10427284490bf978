r"""Check a nuclei teacher against your own annotated nuclei: the first step with a new teacher.

    python jobs/check_teacher.py --teacher 2D_versatile_he --images my/images --masks my/masks --mpp 0.25
    python jobs/check_teacher.py --teacher runs/teacher/my_teacher --images ... --masks ... --run-name check

It measures RCKD's pseudo label (Eq. 2: probability >= alpha) against the true nuclei, pooled
IoU and Dice, at several alphas, with joint and per-channel normalisation, at the teacher's own
scale and at the pretraining patches' scale (--patch-mpp, 20x = 0.5 um/px). It prints the table
and writes OUT/results.csv, OUT/results.json, OUT/overlay.png (true nuclei green, pseudo label
magenta), OUT/nuclei/<image>.geojson (the teacher's nuclei at the best settings as QuPath
detections with their area and probability: open the image in QuPath, File > Import objects)
and OUT/histokd_teacher.json: the best settings. Copy that file into the teacher's model
folder (or pass --teacher-settings OUT/histokd_teacher.json to jobs/rckd_pretrain.py) so that the
teacher runs that way everywhere.

Masks: instance labels (0 = background, 1..n = nuclei) or binary masks, png/tif/npy, or MoNuSeg
XML, named like their images (tile7.png with tile7.tif).
"""

from __future__ import annotations

import sys

from histokd.cli import print_fields, run_job
from histokd.teachers.check import CheckConfig


def _run(config: CheckConfig):
    from histokd.teachers.check import check_teacher

    return config, check_teacher(config)


def _report(outcome) -> None:
    from histokd.teachers.check import format_table

    config, result = outcome
    print(
        f"teacher {config.teacher} on {config.images} (images at {config.mpp:g} um/px), "
        "pooled IoU with the true nuclei:"
    )
    print(format_table(result.rows))
    best = result.best
    how = ", ".join(f"{k} {best[k]}" for k in ("normalization", "teacher_mpp") if k in best)
    print(
        f"best: alpha {best['alpha']:g}{', ' + how if how else ''}: IoU {best['check_iou']:.3f}, "
        f"Dice {best['check_dice']:.3f} (true nuclei cover {best['true_nucleus_fraction']:.1%} of the pixels)"
    )
    print_fields({
        "report": f"{result.out_dir}  (results.csv, results.json, overlay.png, nuclei/*.geojson)",
        "settings": result.out_dir / "histokd_teacher.json",
    })  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return run_job(CheckConfig, _run, argv, description=__doc__, report=_report)


if __name__ == "__main__":
    sys.exit(main())
