"""The offline demo of resolution-based distillation (DiPalma et al. 2021) on synthetic slides.

    python jobs/resdist_demo.py                    # minutes on 2 CPUs
    python jobs/resdist_demo.py --num-workers 1    # every run on Ray Train workers (slower start-up)

Synthetic 20x slides broken into tissue pieces; each region labelled by the tissue class covering
most of it. A teacher at 10x; at 5x, 2.5x, 1.25x and 0.625x a baseline from scratch, KD on the
labelled regions, and KD on an unlabelled auxiliary set followed by last-layer fine-tuning.
Writes STORAGE/evaluation/results.{csv,md} (Tables 5-8 style) and accuracy_vs_gflops.png
(Fig. 3 style), also to MLflow (sqlite:///STORAGE/mlflow.db). Small sizes on purpose; rerunning
reuses the slides and every finished model.
"""

from __future__ import annotations

import sys

from histokd.cli import run_job
from histokd.resdist.config import DemoConfig


def _run(config: DemoConfig):
    from histokd.demos.resdist import run_demo

    return run_demo(config)


def _report(result) -> None:
    print(f"\n{result.table_markdown}\nfiles: " + ", ".join(result.files.values()))
    print("seconds:", ", ".join(f"{k} {v:.0f}" for k, v in result.seconds.items()))


def main(argv: list[str] | None = None) -> int:
    return run_job(DemoConfig, _run, argv, description=__doc__, report=_report)


if __name__ == "__main__":
    sys.exit(main())
