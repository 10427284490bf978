"""Resolution-based distillation, phases 2-3: a low-magnification student learns from the teacher.

    python jobs/resdist_distill.py --data data.csv --teacher runs/teacher --magnification 1.25 --run-name kd-1.25x
    python jobs/resdist_distill.py --data data.csv --teacher runs/teacher --magnification 1.25 \\
        --train-splits aux --val-splits val --run-name kd-aux-1.25x            # KD (AD) + fine-tuning
    python jobs/resdist_distill.py ... --backbone resnet18                     # a zoo student (beyond the paper)

Loss (Eqs. 1-3): KL(teacher/T || student/T) x T^2 plus the mean over max-pool and bicubic
resizing of the MSE between the frozen teacher's last feature map, shrunk to the student's, and
the student's. Labels are ignored. When the distillation set is not the labelled training set
(--train-splits aux), the student's last layer is then fine-tuned on it (Sec. 3.4; --finetune).
--public-code-maxpool-only reproduces the authors' code's pixel loss. Writes STORAGE/RUN/model.pt
and an MLflow run; rerunning with the same --run-name resumes.
"""

from __future__ import annotations

import sys

from histokd.cli import run_job
from histokd.resdist.config import DistillConfig


def _run(config: DistillConfig):
    from histokd.resdist.job import run_distill

    return run_distill(config)


def _report(result) -> None:
    print(f"\nstudent: {result.model_path}\nMLflow run {result.mlflow_run_id}")


def main(argv: list[str] | None = None) -> int:
    return run_job(DistillConfig, _run, argv, description=__doc__, report=_report)


if __name__ == "__main__":
    sys.exit(main())
