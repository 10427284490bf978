"""The whole-slide inference job's settings."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal

from histokd.cli import arg, check_ints, check_positive
from histokd.inference.stitching import BLEND_WINDOWS
from histokd.run import RunConfig
from histokd.tissue import TissueFilter

__all__ = ["PredictConfig"]


@dataclass
class PredictConfig(RunConfig):
    """Whole-slide inference with a fine-tuned model (`histokd.inference.run_prediction`).

    The model file gives the task, backbone, classes and input size. The magnification and
    size of the training images come from the file where it records them, else from
    ``magnification`` and ``patch_size`` here.

    Attributes:
        model: ``best_model.pt`` of the fine-tuning job, or its run folder (then the split with
            the lowest validation loss), or the MLflow model the fine-tuning job logged:
            ``runs:/RUN_ID/model``, ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``, resolved
            against ``mlflow_tracking_uri``.
        patch_size: The side in pixels of a training image at ``magnification``, before it was
            resized to the model's input size; default: the model file's, else the input size.
        mpp: The training images' um/px, the same as ``magnification`` (``10 / mpp``); give
            either.
        assume_mpp: um per level-0 pixel of slides that record no MPP, TIFF resolution or
            objective power; ``base_magnification`` is the older way to say it.
        overlap: The fraction of a tile's side shared with its neighbour, in [0, 1).
        blend: The weight window of overlapping tiles: ``cosine`` (Hann), ``linear`` (tent) or
            ``none`` (a plain mean).
        min_tissue_fraction: The least tissue fraction of a tile's footprint on the thumbnail
            mask.
        tissue_hue_range: Hues in degrees counted as tissue (H&E: 250 345; any stain: 0 360).
        num_workers, gpus_per_worker: Model actors, and the GPU share of each where the cluster
            has GPUs.
        stain_norm: ``model``: the stain normalisation the model file records (fine-tuning's
            ``--stain-norm``), so tiles look as the training images did; ``none`` or
            ``macenko`` (to ``stain_reference``, default the usual reference stains) replace it.
    """

    # --- what ------------------------------------------------------------------------------
    model: str = arg(
        "", "best_model.pt, a fine-tuning run folder, runs:/RUN_ID/PATH or models:/NAME/VERSION"
    )
    slides: list[str] = arg(help="slide files, folders (recursive) or .txt lists", factory=list)
    run_name: str = arg("predict", "outputs go to STORAGE/RUN_NAME; a rerun skips finished slides")
    # --- what the model was trained on ------------------------------------------------------
    magnification: float | None = arg(None, "training images' (e.g. 20); default: the model file's")
    mpp: float | None = arg(None, "training images' um/px instead (0.5 = 20x)")
    patch_size: int | None = arg(None, "training image side, unresized; default: the model file's")
    class_names: list[str] = arg(help="one per output; default: the model file's", factory=list)
    assume_mpp: float | None = arg(None, "um/px of slides recording no MPP, resolution or power")
    base_magnification: float | None = arg(None, "older way to give --assume-mpp: 10 / this")
    stain_norm: Literal["model", "none", "macenko"] = arg(
        "model", "stain normalisation; model: the model file's"
    )
    stain_reference: str | None = arg(None, "reference tile of --stain-norm macenko")
    # --- tiling and stitching ---------------------------------------------------------------
    overlap: float | None = arg(None, "share of a tile's side; auto: 0.25 for segmentation, else 0")
    blend: Literal["cosine", "linear", "none"] = arg("cosine", "weight window: Hann, tent or mean")
    output_magnification: float = arg(2.5, "heatmap and mask, <= --magnification (2.5x: 4 um/px)")
    min_tissue_fraction: float = arg(0.1, "least tissue share of a tile on the thumbnail; 0: all")
    tissue_hue_range: list[float] = arg(help="tissue hues, degrees", factory=lambda: [250.0, 345.0])
    # --- cluster ------------------------------------------------------------------------------
    batch_size: int = arg(32, "tiles per model call")
    num_workers: int | None = arg(None, "actors; auto: one per GPU, or 1", aliases=["num_actors"])
    gpus_per_worker: float = arg(1.0, "GPU share per actor; 0.5: two per GPU", aliases=["num_gpus"])
    precision: Literal["auto", "fp32", "bf16"] = arg("auto", "autocast; auto: GPU bf16, else fp32")
    # --- outputs ------------------------------------------------------------------------------
    overwrite: bool = arg(False, "predict slides again even when their outputs exist")
    overlay_max_side: int = arg(2048, "longest side of the overlay PNGs in pixels")
    mlflow_experiment: str = arg("histokd-predict", "MLflow experiment name")
    mlflow_overlays: int = arg(4, "overlay PNGs of the first slides logged to MLflow")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.slides, str):
            self.slides = [self.slides]
        from histokd.slides import resolve_assume_mpp, resolve_target_mpp

        # the rest of the job speaks magnifications: mpp and assume_mpp convert to them
        mpp = resolve_target_mpp(self.mpp, self.magnification, default=None)
        if mpp is not None:
            self.mpp, self.magnification = mpp, 10.0 / mpp
        assume_mpp = resolve_assume_mpp(self.assume_mpp, self.base_magnification)
        if assume_mpp is not None:
            self.assume_mpp, self.base_magnification = assume_mpp, 10.0 / assume_mpp
        check_positive(self, ["magnification"], example="20", auto="None (the model file's)")
        check_ints(self, ["patch_size"], auto="None (the model file's)")
        check_positive(self, ["base_magnification"], auto="None")
        if self.overlap is not None and not 0 <= self.overlap < 1:
            raise ValueError(f"overlap={self.overlap!r}: must be in [0, 1) or None (auto)")
        if self.blend not in BLEND_WINDOWS:
            raise ValueError(f"blend={self.blend!r}: allowed: {', '.join(BLEND_WINDOWS)}")
        check_positive(self, ["output_magnification"], example="2.5")
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
        if self.stain_norm not in ("model", "none", "macenko"):
            raise ValueError(f"stain_norm={self.stain_norm!r}: allowed: model, none, macenko")
        if self.stain_reference is not None and self.stain_norm != "macenko":
            raise ValueError(
                f"stain_reference={self.stain_reference!r} is for stain_norm='macenko', not {self.stain_norm!r}"
            )
        if self.stain_reference is not None and not os.path.isfile(self.stain_reference):
            raise ValueError(f"stain_reference={self.stain_reference!r}: no such image file")
        from histokd.tracking import MODEL_URI_FORMS

        if self.model.startswith(("runs:", "models:")):  # resolved against MLflow by the job
            if not re.fullmatch(r"runs:/[^/]+/.+|models:/[^/@]+(/[^/]+|@[^/@]+)?", self.model):
                raise ValueError(
                    f"model={self.model!r}: not an MLflow model URI; allowed: {MODEL_URI_FORMS}, "
                    "or a best_model.pt or run folder"
                )
        elif self.model:
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
