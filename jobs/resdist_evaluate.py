"""Resolution-based distillation: test-set evaluation, DiPalma Tables 5-8 and Fig. 3.

    python jobs/resdist_evaluate.py --data data.csv --model runs/teacher runs/baseline-1.25x runs/kd-1.25x \\
        --dataset-name "celiac disease"

Accuracy, F1, precision and recall (one-vs-rest, macro-averaged) and top-1 accuracy of every
model on the labelled test regions at its own magnification, each with a 95% interval from
10,000 bootstrap resamples, and GFLOPs per forward pass. Writes STORAGE/RUN/results.{csv,md},
accuracy_vs_gflops.png and evaluations.json, also to MLflow.
"""

from __future__ import annotations

import sys

from histokd.cli import run_job
from histokd.resdist.config import EvaluateConfig


def _run(config: EvaluateConfig):
    from histokd.resdist.evaluation import run_evaluation

    return run_evaluation(config)


def _report(result) -> None:
    print("\n" + "\n".join(f"{name:>9}: {path}" for name, path in result.files.items()))


def main(argv: list[str] | None = None) -> int:
    return run_job(EvaluateConfig, _run, argv, description=__doc__, report=_report)


if __name__ == "__main__":
    sys.exit(main())
