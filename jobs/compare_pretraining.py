"""Compare initialisations and backbones on downstream tasks (RCKD Tables 3-4, Fig. 10).

    python jobs/compare_pretraining.py --inits csat=runs/rckd/backbone.pth   # demo task
    python jobs/compare_pretraining.py --backbones csat resnet18 \\
        --inits csat=runs/tcga-csat/backbone.pth resnet18=runs/tcga-r18/backbone.pth \\
        --timm-weights "SPT on ImageNet@resnet18=/w/resnet18.a1_in1k.safetensors" \\
        --datasets Lymph=/data/lymph BACH=/data/bach --segmentation-datasets GlaS=/data/glas

Every backbone x initialisation x dataset is one fine-tuning job (five splits). Writes
STORAGE/RUN/comparison.{csv,md,png}: the tables (accuracy / mIoU per dataset, averages, backbone
parameters and GMAC at --input-size) and the ball chart (accuracy vs GMAC, size by parameters,
colour by initialisation), also to MLflow.

    python jobs/compare_pretraining.py --inits csat=runs/rckd/backbone.pth \
        --protocols finetune linear knn --label-fractions 0.01 0.1 1.0

adds the field's frozen-backbone protocols (linear: logistic regression on the backbone's
pooled features, C chosen on validation; knn: 20 nearest neighbours by cosine distance) and
label fractions (the same stratified training rows for every initialisation): a table row per
backbone x initialisation x protocol x fraction, and comparison_fractions.png.
"""

from __future__ import annotations

import sys

from histokd.cli import run_job
from histokd.finetune.compare import CompareConfig
from histokd.finetune.config import DEMO_PRESET


def _run(config: CompareConfig):
    from histokd.finetune.compare import run_comparison

    return run_comparison(config)


def _report(result) -> None:
    print()
    print(open(result.files["markdown"]).read())
    print(f"chart: {result.files.get('chart', '(no classification dataset)')}")
    if "fraction_chart" in result.files:
        print(f"by label fraction: {result.files['fraction_chart']}")


def _default_preset(values: dict) -> str | None:
    return None if values.get("datasets") or values.get("segmentation_datasets") else "demo"


def main(argv: list[str] | None = None) -> int:
    return run_job(
        CompareConfig, _run, argv, description=__doc__, presets={"demo": {"finetune": DEMO_PRESET}},
        default_preset=_default_preset, report=_report,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
