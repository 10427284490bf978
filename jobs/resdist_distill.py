"""Resolution-based distillation, phases 2-3: a low-magnification student learns from the teacher.

    python jobs/resdist_distill.py --data data.csv --teacher runs/teacher --magnification 1.25 --run-name kd-1.25x
    python jobs/resdist_distill.py --data data.csv --teacher runs/teacher --magnification 1.25 \\
        --train-splits aux --val-splits val --run-name kd-aux-1.25x            # KD (AD) + fine-tuning
    python jobs/resdist_distill.py ... --arch resnet18                         # a zoo student (beyond the paper)

Loss (Eqs. 1-3): KL(teacher/T || student/T) x T^2 plus the mean over max-pool and bicubic
resizing of the MSE between the frozen teacher's last feature map, shrunk to the student's, and
the student's. Labels are ignored. When the distillation set is not the labelled training set
(--train-splits aux), the student's last layer is then fine-tuned on it (Sec. 3.4; --finetune).
--public-code-maxpool-only reproduces the authors' code's pixel loss. Writes STORAGE/RUN/model.pt
and an MLflow run; rerunning with the same --run-name resumes.
"""

from __future__ import annotations

import sys

from histokd.cli import parse_config
from histokd.resdist.config import DistillConfig


def main(argv: list[str] | None = None) -> int:
    config = parse_config(DistillConfig, argv, description=__doc__)
    from histokd.resdist.job import run_distill

    try:
        result = run_distill(config)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    print(f"{config.method_name} student at {config.magnification:g}x: {result.model_path}")
    print(f"MLflow: {config.tracking_uri}  run {result.mlflow_run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
