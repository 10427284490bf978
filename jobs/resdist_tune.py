"""Ray Tune over the student's magnification and the soft-loss temperature.

    python jobs/resdist_tune.py --data data.csv --teacher runs/teacher
    python jobs/resdist_tune.py --data data.csv --teacher runs/teacher --searched-magnifications 1.25 2.5 --temperatures 1 4

Every trial is a distillation job (its own TorchTrainer) scored on --score-splits (default: the
validation split). Writes STORAGE/RUN/search.csv, best first, also to MLflow; rerunning with the
same --run-name resumes the search.
"""

from __future__ import annotations

import sys

from histokd.cli import parse_config
from histokd.resdist.search import DistillSearchConfig


def main(argv: list[str] | None = None) -> int:
    config = parse_config(DistillSearchConfig, argv, description=__doc__)
    from histokd.resdist.search import run_search

    try:
        rows = run_search(config)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    for row in rows:
        print(
            f"{row['magnification']:>6g}x  T={row['temperature']:<4g} {config.score} {row[config.score]:.3f}  {row['gflops']:.3g} GFLOPs"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
