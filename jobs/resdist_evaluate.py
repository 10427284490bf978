"""Resolution-based distillation: test-set evaluation, DiPalma Tables 5-8 and Fig. 3.

    python jobs/resdist_evaluate.py --data data.csv --models runs/teacher runs/baseline-1.25x runs/kd-1.25x \\
        --dataset-name "celiac disease"

Accuracy, F1, precision and recall (one-vs-rest, macro-averaged) and top-1 accuracy of every
model on the labelled test regions at its own magnification, each with a 95% interval from
10,000 bootstrap resamples, and GFLOPs per forward pass. Writes STORAGE/RUN/results.{csv,md},
accuracy_vs_gflops.png and evaluations.json, also to MLflow.
"""

from __future__ import annotations

import sys

from histokd.cli import parse_config
from histokd.resdist.config import EvaluateConfig


def main(argv: list[str] | None = None) -> int:
    config = parse_config(EvaluateConfig, argv, description=__doc__)
    from histokd.resdist.report import run_evaluation

    try:
        result = run_evaluation(config)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    for name, path in result.files.items():
        print(f"{name:>9}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
