"""Settings of feature export (`histokd.features.extract`) and of ABMIL (`histokd.features.mil`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from histokd.cli import arg, check_ints, check_positive
from histokd.run import RunConfig, resolve_output_path
from histokd.tissue import TissueFilter

__all__ = ["ExtractConfig", "MilConfig"]


@dataclass
class ExtractConfig(RunConfig):
    """Per-patch features of a frozen backbone, one HDF5 file per slide (`run_extraction`).

    Attributes:
        backbone: ``backbone.pth`` of ``jobs/rckd_pretrain.py`` (any backbone file), or a task
            model file (``best_model.pt`` of fine-tuning: its backbone is used).
        arch: The backbone's architecture (one of ``histokd.models.BACKBONES``); None: the
            ``config.yaml`` beside a backbone file, else the one architecture whose keys fit.
        output: Folder of ``features_<tag>/h5_files/``; None: the run folder.
        tag: Name of the feature set in ``features_<tag>``; None: ``<arch>-<sha256[:8]>`` of
            the backbone file.
        mpp: um/px at which patches are read (0.5: 20x, as RCKD pretrains).
        patch_size: Patch side in pixels at ``mpp`` (TRIDENT and CLAM: 256 at 20x).
    """

    backbone: str = arg("", "backbone.pth of rckd_pretrain (or a fine-tuning best_model.pt)")
    slides: list[str] = arg(
        help="slide files, folders (recursive), .txt lists or URLs", factory=list
    )
    arch: str | None = arg(None, "backbone architecture; auto: config.yaml beside it, else probed")
    output: str | None = arg(None, "folder of features_<tag>/h5_files; default: the run folder")
    tag: str | None = arg(None, "feature-set name; default: <arch>-<sha256 of the file>")
    run_name: str = arg(
        "extract_features", "run folder STORAGE/RUN_NAME; a rerun skips done slides"
    )
    mpp: float = arg(0.5, "um/px of the patches (0.5 = 20x)")
    patch_size: int = arg(256, "patch side in px at --mpp (TRIDENT, CLAM: 256)")
    assume_mpp: float | None = arg(None, "um/px of slides recording no MPP, resolution or power")
    min_tissue_fraction: float = arg(0.1, "least tissue share of a patch on the thumbnail mask")
    batch_size: int = arg(64, "patches per read task batch and per model call")
    num_workers: int | None = arg(
        None, "model actors; auto: one per GPU, or 1", aliases=["num_actors"]
    )
    gpus_per_worker: float = arg(1.0, "GPU share per actor where the cluster has GPUs")
    overwrite: bool = arg(False, "extract slides again even when their h5 file is complete")
    mlflow_experiment: str = arg("histokd-features", "MLflow experiment name")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.slides, str):
            self.slides = [self.slides]
        check_positive(self, ["mpp"], example="0.5")
        check_ints(self, ["patch_size", "batch_size"])
        check_ints(self, ["num_workers"], auto=True)
        check_positive(self, ["assume_mpp"], auto="None")
        if not 0 <= self.min_tissue_fraction <= 1:
            raise ValueError(f"min_tissue_fraction={self.min_tissue_fraction!r}: must be in [0, 1]")
        if not 0 < self.gpus_per_worker <= 1:
            raise ValueError(
                f"gpus_per_worker={self.gpus_per_worker!r}: the GPU share of an actor must be in (0, 1]"
            )
        if self.output and "://" in self.output:
            raise ValueError(
                f"output={self.output!r}: allowed: a local or shared-file-system folder"
            )
        if self.output:
            self.output = resolve_output_path(self.output, "output")
        if self.tag is not None and (not self.tag or "/" in self.tag or self.tag.startswith(".")):
            raise ValueError(
                f"tag={self.tag!r}: allowed: a non-empty name without '/' or a leading '.'"
            )
        if self.backbone:
            if not os.path.isfile(self.backbone):
                raise ValueError(
                    f"backbone={self.backbone!r}: no such file; give backbone.pth of rckd_pretrain "
                    "or a best_model.pt of fine-tuning"
                )
            self.backbone = os.path.abspath(self.backbone)

    def tissue_filter(self) -> TissueFilter:
        """The tissue threshold of the patch grid."""
        return TissueFilter(min_tissue_fraction=self.min_tissue_fraction)


@dataclass
class MilConfig(RunConfig):
    """ABMIL (Ilse et al. 2018, gated attention) on exported features, k-fold by patient.

    Attributes:
        features: A ``features_<tag>`` folder of `ExtractConfig`, or its ``h5_files``.
        labels: CSV with columns ``slide,label[,patient]``; a missing patient is the slide.
        num_folds: k of the cross-validation; folds are grouped by patient, stratified by
            label as far as whole patients allow.
        val_fraction: Share of each training fold's patients kept for early stopping.
        lr, weight_decay: Adam's (Ilse et al. 2018 Sec. 5: 5e-4 and 1e-4, betas 0.9, 0.999).
        hidden_dim, attention_dim: M and L of the gated attention (Ilse et al. Eq. 9).
        epochs, patience: At most ``epochs`` passes over the bags; stop after ``patience``
            epochs without a lower validation loss, and keep the best epoch's weights.
    """

    features: str = arg("", "features_<tag> folder of extract_features (or its h5_files)")
    labels: str = arg("", "CSV: slide,label[,patient]")
    run_name: str = arg("mil", "run folder STORAGE/RUN_NAME")
    num_folds: int = arg(5, "k of the patient-grouped cross-validation")
    val_fraction: float = arg(0.2, "share of each training fold's patients for early stopping")
    lr: float = arg(5e-4, "Adam learning rate (Ilse et al. 2018)")
    weight_decay: float = arg(1e-4, "Adam weight decay (Ilse et al. 2018)")
    hidden_dim: int = arg(128, "M: instance embedding size")
    attention_dim: int = arg(128, "L: gated-attention size (Ilse et al. Eq. 9)")
    dropout: float = arg(0.25, "dropout of the instance embeddings")
    epochs: int = arg(50, "most passes over the training bags")
    patience: int = arg(10, "epochs without a lower validation loss before stopping")
    bootstrap_resamples: int = arg(2000, "resamples of the bootstrap intervals")
    mlflow_experiment: str = arg("histokd-mil", "MLflow experiment name")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ints(self, ["num_folds"], minimum=2)
        check_ints(
            self, ["hidden_dim", "attention_dim", "epochs", "patience", "bootstrap_resamples"]
        )
        check_positive(self, ["lr"], example="5e-4")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay={self.weight_decay!r}: must be at least 0")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction!r}: must be in (0, 1)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r}: must be in [0, 1)")
        for name in ("features", "labels"):
            value = getattr(self, name)
            if value and not os.path.exists(value):
                raise ValueError(f"{name}={value!r}: no such file or folder")
            if value:
                setattr(self, name, os.path.abspath(value))
