"""Fine-tune and evaluate a backbone on a downstream task (RCKD Sec. 2.2.2, Algorithm 2).

    python jobs/finetune.py                                    # the demo task, offline, minutes
    python jobs/finetune.py --init runs/rckd/backbone.pth      # RCKD backbone on the demo task
    python jobs/finetune.py --data /data/lymph --backbone csat --init runs/tcga/backbone.pth
    python jobs/finetune.py --data /data/glas --task segmentation --init timm:/w/resnet18.safetensors --backbone resnet18

Five seeded 6:2:2 splits (stratified) unless the dataset has fixed lists; each split is a Ray
Train run, splits run in parallel as resources allow. Focal loss (alpha 0.25, gamma 2), SGD,
batch 64, at most 200 epochs, early stopping after 20 epochs without a lower validation loss,
the best epoch tested. Writes STORAGE/RUN/summary.{json,md}, splits.csv and logs to MLflow.
Rerunning with the same --run-name skips finished splits. Layouts: docs/datasets.md.
"""

from __future__ import annotations

import sys

from histokd.cli import print_fields, run_job
from histokd.finetune.config import DEMO_PRESET, FinetuneConfig


def _run(config: FinetuneConfig):
    from histokd.finetune.job import run_finetune

    return config, run_finetune(config)


def _report(outcome) -> None:
    config, result = outcome
    primary, entry = result.summary["primary_metric"], result.primary
    arm = result.summary.get("primary_arm") or {"protocol": "finetune", "label_fraction": 1.0}
    if (arm["protocol"], arm["label_fraction"]) != ("finetune", 1.0):  # no full fine-tuning ran
        primary = f"{primary} ({arm['protocol']} @ {100 * arm['label_fraction']:g} %)"
    print(
        f"\n{config.backbone} ({config.init_name}) test {primary} over "
        f"{result.summary['num_splits']} splits: {entry['mean']:.4f} ± {entry['std']:.4f}  "
        f"(95% CI of the mean [{entry['ci_low']:.4f}, {entry['ci_high']:.4f}])"
    )
    print_fields({
        "results": result.files["summary_md"],
        "MLflow": f"{result.tracking_uri}  run {result.mlflow_run_id}",
    })  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return run_job(
        FinetuneConfig, _run, argv, description=__doc__, presets={"demo": DEMO_PRESET},
        default_preset=lambda values: None if values.get("data") else "demo", report=_report,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
