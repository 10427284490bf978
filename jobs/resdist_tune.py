"""Ray Tune over the student's magnification and the soft-loss temperature.

    python jobs/resdist_tune.py --data data.csv --teacher runs/teacher
    python jobs/resdist_tune.py --data data.csv --teacher runs/teacher --searched-magnifications 1.25 2.5 --temperatures 1 4

Every trial is a distillation job (its own TorchTrainer) scored on --score-splits (default: the
validation split). Writes STORAGE/RUN/search.csv, best first, also to MLflow; rerunning with the
same --run-name resumes the search.
"""

from __future__ import annotations

import sys

from histokd.cli import run_job
from histokd.resdist.config import DistillSearchConfig


def _run(config: DistillSearchConfig):
    from histokd.resdist.search import run_search

    rows = run_search(config)
    for row in rows:
        print(f"{row['magnification']:>6g}x  T={row['temperature']:<4g} {config.score} "
              f"{row[config.score]:.3f}  {row['gflops']:.3g} GFLOPs")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    return run_job(DistillSearchConfig, _run, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
