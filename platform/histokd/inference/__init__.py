"""Whole-slide inference with fine-tuned models: tiles -> Ray Data actor pool -> maps per slide.

* `run_prediction`: a fine-tuned model (``best_model.pt`` of `histokd.finetune`) over a list
  or folder of slides; per slide a Parquet table of tile predictions, class-probability and
  label OME-TIFFs, PNG overlays on the thumbnail and a JSON summary; reruns skip finished
  slides; bad slides are reported, not fatal.
* `load_task_model`: the fine-tuned model of a model file, rebuilt from its config.
* `SlideCanvas`, `blend_window`: overlapping tiles blended into slide-sized maps.
"""

from histokd.inference.config import PredictConfig
from histokd.inference.job import PredictError, PredictResult, resolve_model, run_prediction
from histokd.inference.model_file import (
    ModelFileError,
    TaskModelInfo,
    build_model,
    find_best_model,
    load_task_model,
)
from histokd.inference.stitching import BLEND_WINDOWS, NO_LABEL, SlideCanvas, blend_window
from histokd.inference.tiling import SlideTiles, lattice, plan_tiles

__all__ = [
    "BLEND_WINDOWS",
    "NO_LABEL",
    "ModelFileError",
    "PredictConfig",
    "PredictError",
    "PredictResult",
    "SlideCanvas",
    "SlideTiles",
    "TaskModelInfo",
    "blend_window",
    "build_model",
    "find_best_model",
    "lattice",
    "load_task_model",
    "plan_tiles",
    "resolve_model",
    "run_prediction",
]
