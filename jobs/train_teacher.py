r"""Train a StarDist2D nuclei teacher for RCKD pseudo labels, on the CPU or a GPU.

    python jobs/train_teacher.py                                   # on synthetic demo slides
    python jobs/train_teacher.py --data /data/monuseg --demo-slides 0 --unet-n-filter-base 32
    python jobs/train_teacher.py --config teacher.yaml

Data: MoNuSeg-like folders (--data), each with images/ + masks/ (instance masks, 0 =
background, 1..n = nuclei) or MoNuSeg 2018's own 'Tissue Images/' + Annotations/ (XML), at
--data-magnification; and, by default, tiles of synthetic demo slides with their true nuclei.
The model folder (STORAGE/RUN_NAME) loads with --teacher STORAGE/RUN_NAME in every job.

The shipped demo teacher (histokd/assets/demo_teacher) was made by:

    python jobs/train_teacher.py --storage-path platform/histokd/assets --run-name demo_teacher \
        --demo-dir runs/teacher/demo_slides --no-use-gpu --overwrite

Its default alpha is chosen on the held-out demo slide (best pseudo-mask IoU) and written to
histokd_teacher.json. StarDist's probability is 1 at a nucleus centre falling to 0 at its edge,
so RCKD's alpha 0.5 marks nucleus cores; lower alphas recover whole nuclei.
"""

from __future__ import annotations

import sys

from histokd.cli import run_job
from histokd.teachers.training import TeacherTrainingConfig


def _report(result) -> None:
    ious = ", ".join(f"{a:g}: {v:.3f}" for a, v in result.validation_iou.items())
    print(
        f"teacher:  {result.model_dir}  ({result.num_train} train / {result.num_validation} "
        f"held-out images, {result.seconds:.0f} s)"
    )
    print(
        f"held-out pseudo-mask IoU by alpha: {ious}; predict_instances: "
        f"{result.validation_iou_instances:.3f}"
    )
    print(f"default alpha: {result.alpha:g}  (override with --alpha in the jobs that use it)")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, train, print where the teacher is and how good it is."""
    command = ["python", "jobs/train_teacher.py", *(sys.argv[1:] if argv is None else argv)]

    def run(config: TeacherTrainingConfig):
        from histokd.teachers.training import train_teacher

        config.command = command  # stored with the teacher: how it was made
        return train_teacher(config)

    return run_job(TeacherTrainingConfig, run, argv, description=__doc__, report=_report)


if __name__ == "__main__":
    sys.exit(main())
