r"""Per-patch features of a frozen backbone, one HDF5 file per slide (CLAM / TRIDENT layout).

    python jobs/extract_features.py --backbone runs/rckd/backbone.pth --slides /data/slides
    python jobs/extract_features.py --backbone runs/rckd/backbone.pth --slides s3://bucket/wsi/ \
        --output /data/features --mpp 0.5 --patch-size 256
    ray job submit --working-dir . -- python jobs/extract_features.py --config extract.yaml

--backbone is the backbone.pth of jobs/rckd_pretrain.py (its architecture from the config.yaml
beside it, else --arch) or a fine-tuning best_model.pt. Every slide's tissue grid of
--patch-size px at --mpp is read as pretraining reads patches, run through a Ray Data actor
pool (GPUs where the cluster has any), and average-pooled from the deepest feature map. Writes
OUTPUT/features_<tag>/h5_files/<slide>.h5: `features` (N x D float32) and `coords` (N x 2
level-0 x, y) with patch size and mpp attributes (histokd.features.extract). Rerunning skips
slides whose file is whole; bad slides are listed in STORAGE/RUN_NAME/bad_slides.csv.
"""

from __future__ import annotations

import sys

from histokd.cli import print_fields, run_job
from histokd.features.config import ExtractConfig


def _run(config: ExtractConfig):
    from histokd.features.extract import run_extraction

    return config, run_extraction(config)


def _report(outcome) -> None:
    config, result = outcome
    print()
    print_fields({
        "features": f"{result.features_dir}  ({len(result.files)} slides, D = {result.feature_dim})",
        "bad slides": f"{len(result.bad_slides)}  ({result.report['bad_slides']})",
        "MLflow": f"{config.tracking_uri}  run {result.mlflow_run_id}",
    })  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, extract the features, print where they are; 2 on a bad setting."""
    return run_job(ExtractConfig, _run, argv, description=__doc__, report=_report)


if __name__ == "__main__":
    sys.exit(main())
