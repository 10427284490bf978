"""RCKD pretraining (Kim et al. 2023): a StarDist teacher's nuclei pseudo labels pretrain a
student backbone + U-Net decoder on unlabeled slides, on Ray.

    python jobs/rckd_pretrain.py                      # the embedded demo, offline, minutes
    python jobs/rckd_pretrain.py --slides /data/tcga --run-name tcga-csat
    ray job submit --working-dir . -- python jobs/rckd_pretrain.py --config run.yaml

With no --slides the demo preset applies: synthetic demo slides (written on first use), the
shipped demo StarDist teacher and small sizes. Otherwise every default is the paper's.
About --alpha: StarDist's probability is 1 at a nucleus centre falling to 0 at its edge, so the
paper's alpha 0.5 marks nucleus cores; 0.1-0.2 recovers whole nuclei.
Rerunning with the same --run-name resumes from the last checkpoint.
"""

from __future__ import annotations

import sys

from histokd.cli import print_fields, run_job
from histokd.pretrain.config import DEMO_PRESET, PretrainConfig


def _run(config: PretrainConfig):
    from histokd.pretrain.job import run_pretraining

    return run_pretraining(config)


def _report(result) -> None:
    last = result.history[-1] if result.history else {}
    print()
    print_fields({
        "backbone": result.backbone_path,
        "checkpoints": f"{result.run_dir}  (last: {result.checkpoint_path})",
        "MLflow": f"{result.tracking_uri}  run {result.mlflow_run_id}",
    })  # fmt: skip
    if last:
        print(
            f"hold-out foreground IoU vs teacher: {result.history[0]['holdout_foreground_iou']:.3f} (epoch 1) "
            f"-> {last['holdout_foreground_iou']:.3f} (epoch {last['epoch']})"
        )
    if result.label_share_summary:
        print(f"{result.label_share_summary}  (per slide: {result.run_dir}/label_share.csv)")


def main(argv: list[str] | None = None) -> int:
    return run_job(
        PretrainConfig, _run, argv, description=__doc__, presets={"demo": DEMO_PRESET},
        default_preset=lambda values: None if values.get("slides") else "demo", report=_report,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
