"""The whole-slide inference job's settings."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from histokd.cli import check_ints
from histokd.inference.stitching import BLEND_WINDOWS
from histokd.run import RunConfig
from histokd.tissue import TissueFilter

__all__ = ["PredictConfig"]


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class PredictConfig(RunConfig):
    """Whole-slide inference with a fine-tuned model (`histokd.inference.run_prediction`).

    The model file gives the task, backbone, classes and input size. The magnification and
    size of the training images come from the file where it records them, else from
    ``magnification`` and ``patch_size`` here.
    """

    # --- what ------------------------------------------------------------------------------
    model: str = field(
        default="",
        metadata=_help(
            "best_model.pt of the fine-tuning job, or its run folder (the split with the lowest validation loss)"
        ),
    )
    slides: list[str] = field(
        default_factory=list,
        metadata=_help("slide files, folders (searched recursively) or .txt lists"),
    )
    run_name: str = field(
        default="predict",
        metadata=_help(
            "run name; outputs go to STORAGE/RUN_NAME, and a rerun skips slides finished before"
        ),
    )
    # --- what the model was trained on ------------------------------------------------------
    magnification: float | None = field(
        default=None,
        metadata=_help("magnification of the training images (e.g. 20); default: the model file's"),
    )
    patch_size: int | None = field(
        default=None,
        metadata=_help(
            "side in pixels of a training image at --magnification before it was resized to the model's input size; default: the model file's, else the input size"
        ),
    )
    class_names: list[str] = field(
        default_factory=list,
        metadata=_help("class names, one per model output; default: the model file's"),
    )
    base_magnification: float | None = field(
        default=None,
        metadata=_help(
            "level-0 magnification of slides that record neither objective power nor MPP"
        ),
    )
    # --- tiling and stitching ---------------------------------------------------------------
    overlap: float | None = field(
        default=None,
        metadata=_help(
            "fraction of a tile's side shared with its neighbour, in [0, 1); auto: 0.25 for segmentation, 0 for classification"
        ),
    )
    blend: Literal["cosine", "linear", "none"] = field(
        default="cosine",
        metadata=_help(
            "weight window of overlapping tiles: cosine (Hann), linear (tent) or none (plain mean)"
        ),
    )
    output_magnification: float = field(
        default=2.5,
        metadata=_help(
            "magnification of the heatmap and label mask (at most --magnification); 2.5x is 4 um per pixel"
        ),
    )
    min_tissue_fraction: float = field(
        default=0.1,
        metadata=_help(
            "least tissue fraction of a tile's footprint on the thumbnail mask; 0 predicts every tile"
        ),
    )
    tissue_hue_range: list[float] = field(
        default_factory=lambda: [250.0, 345.0],
        metadata=_help("hues in degrees counted as tissue (H&E: 250 345; any stain: 0 360)"),
    )
    # --- cluster ------------------------------------------------------------------------------
    batch_size: int = field(default=32, metadata=_help("tiles per model call"))
    num_workers: int | None = field(
        default=None,
        metadata=_help(
            "model actors; auto: one per GPU, or 1 on a CPU cluster", aliases=["num_actors"]
        ),
    )
    gpus_per_worker: float = field(
        default=1.0,
        metadata=_help(
            "GPU share of each model actor where the cluster has GPUs (0.5 puts two on a GPU)",
            aliases=["num_gpus"],
        ),
    )
    precision: Literal["auto", "fp32", "bf16"] = field(
        default="auto", metadata=_help("autocast precision; auto: bf16 on GPU, fp32 on CPU")
    )
    # --- outputs ------------------------------------------------------------------------------
    overwrite: bool = field(
        default=False, metadata=_help("predict slides again even when their outputs exist")
    )
    overlay_max_side: int = field(
        default=2048, metadata=_help("longest side of the overlay PNGs in pixels")
    )
    mlflow_experiment: str = field(
        default="histokd-predict", metadata=_help("MLflow experiment name")
    )
    mlflow_overlays: int = field(
        default=4, metadata=_help("overlay PNGs of the first slides logged to MLflow")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.slides, str):
            self.slides = [self.slides]
        if self.magnification is not None and not self.magnification > 0:
            raise ValueError(
                f"magnification={self.magnification!r}: must be positive (e.g. 20) or None (the model file's)"
            )
        if self.patch_size is not None and (
            isinstance(self.patch_size, bool)
            or not isinstance(self.patch_size, int)
            or self.patch_size <= 0
        ):
            raise ValueError(
                f"patch_size={self.patch_size!r}: must be a positive integer or None (the model file's)"
            )
        if self.base_magnification is not None and not self.base_magnification > 0:
            raise ValueError(
                f"base_magnification={self.base_magnification!r}: must be positive or None"
            )
        if self.overlap is not None and not 0 <= self.overlap < 1:
            raise ValueError(f"overlap={self.overlap!r}: must be in [0, 1) or None (auto)")
        if self.blend not in BLEND_WINDOWS:
            raise ValueError(f"blend={self.blend!r}: allowed: {', '.join(BLEND_WINDOWS)}")
        if not self.output_magnification > 0:
            raise ValueError(
                f"output_magnification={self.output_magnification!r}: must be positive (e.g. 2.5)"
            )
        if not 0 <= self.min_tissue_fraction <= 1:
            raise ValueError(f"min_tissue_fraction={self.min_tissue_fraction!r}: must be in [0, 1]")
        self.tissue_hue_range = [float(h) for h in self.tissue_hue_range]
        self.tissue_filter()  # checks the hue range
        check_ints(self, ["batch_size", "overlay_max_side"])
        check_ints(self, ["num_workers"], auto=True)
        if not 0 < self.gpus_per_worker <= 1:
            raise ValueError(
                f"gpus_per_worker={self.gpus_per_worker!r}: the GPU share of an actor must be in (0, 1]"
            )
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision={self.precision!r}: allowed: auto, fp32, bf16")
        check_ints(self, ["mlflow_overlays"], minimum=0)
        if self.model:
            if not os.path.exists(self.model):
                raise ValueError(
                    f"model={self.model!r}: no such file or folder; give a best_model.pt of the fine-tuning job or its run folder"
                )
            self.model = os.path.abspath(self.model)

    def tissue_filter(self) -> TissueFilter:
        """The tissue thresholds of the tile selection."""
        if len(self.tissue_hue_range) != 2:
            raise ValueError(
                f"tissue_hue_range={self.tissue_hue_range!r}: give two hues in degrees (start end)"
            )
        try:
            return TissueFilter(
                hue_range=tuple(self.tissue_hue_range), min_tissue_fraction=self.min_tissue_fraction
            )
        except ValueError as exc:
            raise ValueError(f"tissue_hue_range={self.tissue_hue_range!r}: {exc}") from exc
