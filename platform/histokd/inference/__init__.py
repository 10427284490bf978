"""Whole-slide inference with fine-tuned models: tiles -> Ray Data actor pool -> maps per slide.

* `run_prediction`: a fine-tuned model (``best_model.pt`` of `histokd.finetune`) over a list
  or folder of slides; per slide a Parquet table of tile predictions, class-probability and
  label OME-TIFFs, PNG overlays on the thumbnail and a JSON summary; reruns skip finished
  slides; bad slides are reported, not fatal.
* `load_task_model`: the fine-tuned model of a model file, rebuilt from its config.
* `SlideCanvas`, `blend_window`: overlapping tiles blended into slide-sized maps.
"""

from histokd.lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "config": ["PredictConfig"],
        "job": ["PredictError", "PredictResult", "resolve_model", "run_prediction"],
        "model_file": ["ModelFileError", "TaskModelInfo", "build_model", "find_best_model",
                       "load_task_model"],
        "stitching": ["BLEND_WINDOWS", "NO_LABEL", "SlideCanvas", "blend_window"],
        "tiling": ["SlideTiles", "lattice", "plan_tiles"],
    },
)  # fmt: skip
