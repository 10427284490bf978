"""Resolution-based distillation, phase 1: the teacher, or a baseline (DiPalma et al. 2021).

    python jobs/resdist_teacher.py --data data.csv                        # teacher at 10x
    python jobs/resdist_teacher.py --data data.csv --magnification 5      # teacher at 5x (RCC)
    python jobs/resdist_teacher.py --data data.csv --magnification 1.25 --method baseline --run-name baseline-1.25x

Trains the GroupNorm ResNet with cross-entropy and Adam (lr 1e-3, 100 epochs, Sec. 4.5.1) on
whole tissue regions, one image at a time with gradients accumulated over 32 (Sec. 3.5), on
Ray Train. The data table (CSV: slide, split, label[, x, y, width, height]) is turned into
region images at every magnification once (STORAGE/regions). Writes STORAGE/RUN/model.pt (a
model file jobs/predict_slides.py reads) and an MLflow run; rerunning the same --run-name
resumes. jobs/resdist_demo.py makes a data table from synthetic slides.
"""

from __future__ import annotations

import sys

from histokd.cli import run_job
from histokd.resdist.config import SupervisedConfig


def _run(config: SupervisedConfig):
    from histokd.resdist.job import run_supervised

    return run_supervised(config)


def _report(result) -> None:
    kept, history = result.result["kept_epoch"], result.result["history"]
    print(f"\nmodel:  {result.model_path}  (epoch {kept}, {result.result['selected']})")
    if history and "val_accuracy" in history[-1]:
        print(f"validation accuracy, last epoch: {history[-1]['val_accuracy']:.3f}")
    print(f"MLflow run {result.mlflow_run_id}")


def main(argv: list[str] | None = None) -> int:
    return run_job(SupervisedConfig, _run, argv, description=__doc__, report=_report)


if __name__ == "__main__":
    sys.exit(main())
