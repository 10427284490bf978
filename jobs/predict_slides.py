r"""Whole-slide inference with a fine-tuned model: heatmaps, label masks and summaries per slide.

    python jobs/predict_slides.py --model runs/finetune --slides /data/slides \
        --magnification 20 --patch-size 256                 # the demo fine-tuning's patches
    python jobs/predict_slides.py --model runs/seg/split_0/best_model.pt --slides list.txt \
        --magnification 20 --output-magnification 5
    ray job submit --working-dir . -- python jobs/predict_slides.py --config predict.yaml

--model is a best_model.pt of jobs/finetune.py, or its run folder (the split with the lowest
validation loss), or the MLflow model that fine-tuning logged: runs:/RUN_ID/model,
models:/NAME/VERSION or models:/NAME@ALIAS (resolved against --mlflow-tracking-uri). The model file gives the task, backbone, classes and input size; give the
magnification of the training images (--magnification) and their side in pixels at that
magnification (--patch-size; default: the input size) when the file does not record them.
Tissue tiles are read so that each covers the training images' field, run through a Ray Data
actor pool (GPUs where the cluster has any), and stitched (overlapping tiles blended for
segmentation). Per slide, in STORAGE/RUN_NAME/slides/<slide_id>/: predictions.parquet,
heatmap.ome.tif, labels.ome.tif, overlay.png, heatmap.png, summary.json and predictions.geojson
(level-0 pixels: tiles with their class probabilities, outlines of each class's regions;
QuPath: File > Import objects, or drop it on the open slide). Rerunning with
the same --run-name skips finished slides; bad slides are listed in bad_slides.csv.
"""

from __future__ import annotations

import sys

from histokd.cli import print_fields, run_job
from histokd.inference.config import PredictConfig


def _run(config: PredictConfig):
    from histokd.inference.job import PredictError, run_prediction

    try:
        return config, run_prediction(config)
    except PredictError as exc:
        raise ValueError(str(exc)) from exc


def _report(outcome) -> None:
    config, result = outcome
    print()
    print_fields({
        "outputs": f"{result.run_dir}/slides  ({len(result.slides)} slides, "
        f"summary: {result.files['summary_table']})",
        "bad slides": f"{result.num_bad}  ({result.files['bad_slides']})",
        "MLflow": f"{config.tracking_uri}  run {result.mlflow_run_id}",
    })  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, run the inference, print where the outputs are; 2 on a bad setting."""
    return run_job(PredictConfig, _run, argv, description=__doc__, report=_report)


if __name__ == "__main__":
    sys.exit(main())
