r"""ABMIL (Ilse et al. 2018, gated attention) on exported features: the slide-level baseline.

    python jobs/train_mil.py --features runs/extract_features/features_csat-1a2b3c4d --labels slides.csv
    python jobs/train_mil.py --features /data/features/features_csat-1a2b3c4d/h5_files \
        --labels slides.csv --num-folds 5 --run-name mil_csat

--features is a features_<tag> folder of jobs/extract_features.py (or its h5_files); --labels
a CSV with columns slide,label[,patient] (slide: the file stem; no patient: the slide is its
own patient). k-fold cross-validation grouped by patient (stratified by label as whole
patients allow), a validation part of each training fold for early stopping; accuracy,
balanced accuracy, macro-F1 and AUROC per fold and pooled out of fold, with bootstrap
intervals. Writes STORAGE/RUN_NAME/summary.{json,md}, folds.csv, predictions.csv and logs to
MLflow.
"""

from __future__ import annotations

import sys

from histokd.cli import print_fields, run_job
from histokd.features.config import MilConfig


def _run(config: MilConfig):
    from histokd.features.mil import run_mil

    return config, run_mil(config)


def _report(outcome) -> None:
    config, result = outcome
    pooled = result.summary["pooled"]
    print()
    print(
        "pooled out-of-fold: "
        + ", ".join(
            f"{n} {pooled[n]['value']:.4f} [{pooled[n]['ci_low']:.4f}, {pooled[n]['ci_high']:.4f}]"
            for n in ("balanced_accuracy", "auroc")
        )
    )
    print_fields({
        "results": result.files["summary.md"],
        "MLflow": f"{config.tracking_uri}  run {result.mlflow_run_id}",
    })  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, cross-validate ABMIL, print the results; 2 on a bad setting."""
    return run_job(MilConfig, _run, argv, description=__doc__, report=_report)


if __name__ == "__main__":
    sys.exit(main())
