"""The fine-tuning job's settings, with RCKD's defaults and where each comes from."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from histokd.cli import check_ints
from histokd.run import WorkerConfig

__all__ = ["DEMO_PRESET", "FinetuneConfig", "init_kind", "resolve_init_label"]


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


def init_kind(init: str) -> str:
    """``random``, ``backbone_file`` or ``timm`` for an ``init`` value."""
    if init == "random":
        return "random"
    return "timm" if init.startswith("timm:") else "backbone_file"


def resolve_init_label(init: str, label: str | None) -> str:
    """The initialisation's name in tables, in the paper's words (Table 3)."""
    if label:
        return label
    return {"random": "Random Weight", "backbone_file": "RCKD", "timm": "timm weights"}[
        init_kind(init)
    ]


@dataclass
class FinetuneConfig(WorkerConfig):
    """Fine-tuning on a downstream task (Kim et al. 2023, Sec. 2.2.2, Algorithm 2, Sec. 3.1).

    Defaults are the paper's. With no ``data`` the job uses the demo task (patches of synthetic
    slides, written on first use) and the demo preset's small sizes.
    """

    # --- where ------------------------------------------------------------------------------
    data: str = field(
        default="",
        metadata=_help("dataset folder or CSV (layouts: docs/datasets.md); empty: the demo task"),
    )
    task: Literal["classification", "segmentation"] = field(
        default="classification",
        metadata=_help("classification (linear + softmax head) or segmentation (U-Net decoder)"),
    )
    run_name: str = field(
        default="finetune",
        metadata=_help("run name; rerunning it skips finished splits and resumes the others"),
    )
    demo_dir: str = field(
        default="demo_data/tasks",
        metadata=_help("where the demo tasks are written when no data is given"),
    )
    # --- model (RCKD Sec. 2.2.2) ------------------------------------------------------------
    backbone: str = field(
        default="csat",
        metadata=_help(
            "backbone: csat, csat_nosat, resnet18, resnet18_sat, efficientnet_b0, convnextv2_atto"
        ),
    )
    init: str = field(
        default="random",
        metadata=_help(
            "initial weights: random, a backbone file (RCKD pretraining writes STORAGE/RUN/backbone.pth), or timm:FILE (timm weights from a local file)"
        ),
    )
    init_label: str | None = field(
        default=None,
        metadata=_help(
            "name of the initialisation in tables (default: Random Weight, RCKD for a backbone file, timm weights)"
        ),
    )
    magnification: float | None = field(
        default=None,
        metadata=_help(
            "magnification the images were cut at, recorded in the model file for whole-slide inference; default: the dataset's dataset.json (docs/datasets.md)"
        ),
    )
    patch_size: int | None = field(
        default=None,
        metadata=_help(
            "side in pixels of an image at --magnification, recorded in the model file; default: dataset.json's, else the images' common side"
        ),
    )
    input_size: int = field(
        default=384,
        metadata=_help(
            "images are resized to this square side (RCKD Sec. 3.1: 384, best of {224, 384})"
        ),
    )
    positional_encoding: Literal["frozen", "trained"] = field(
        default="frozen",
        metadata=_help(
            "CSAT's positional encodings frozen or trained (RCKD Sec. 3.1: frozen was best)"
        ),
    )
    drop_rate: float = field(
        default=0.0, metadata=_help("dropout before the linear classifier (not in RCKD)")
    )
    # --- optimisation (RCKD Sec. 3.1, Eqs. 5 and 7) -----------------------------------------
    lr: float = field(
        default=1e-4,
        metadata=_help("SGD learning rate (RCKD Sec. 3.1: 1e-4, best of {1e-3, 1e-4})"),
    )
    momentum: float = field(default=0.9, metadata=_help("SGD momentum (not stated in RCKD)"))
    weight_decay: float = field(
        default=1e-4, metadata=_help("SGD weight decay (not stated in RCKD)")
    )
    batch_size: int = field(
        default=64, metadata=_help("global batch size over a split's workers (RCKD: 64)")
    )
    epochs: int = field(
        default=200, metadata=_help("most epochs (RCKD: 200)", aliases=["max_epochs"])
    )
    patience: int = field(
        default=20,
        metadata=_help("stop after this many epochs without a lower validation loss (RCKD: 20)"),
    )
    min_delta: float = field(
        default=0.0, metadata=_help("how much lower a validation loss must be to count as lower")
    )
    focal_alpha: float = field(
        default=0.25,
        metadata=_help("focal loss alpha, the same for every class (RCKD Eq. 5: 0.25)"),
    )
    focal_gamma: float = field(default=2.0, metadata=_help("focal loss gamma (RCKD Eq. 5: 2)"))
    augment: bool = field(
        default=True,
        metadata=_help("flips, 90-degree rotations and a mild colour jitter on training images"),
    )
    color_jitter: float = field(
        default=0.1, metadata=_help("brightness/contrast/saturation factors drawn from [1-x, 1+x]")
    )
    hue_jitter: float = field(
        default=0.02, metadata=_help("hue shift drawn from [-x, x] of the hue circle")
    )
    # --- splits (RCKD Sec. 2.1.2, Algorithm 2) ----------------------------------------------
    num_splits: int = field(
        default=5, metadata=_help("data splits, each trained and tested once (RCKD: N_fold = 5)")
    )
    split_ratios: list[float] = field(
        default_factory=lambda: [0.6, 0.2, 0.2],
        metadata=_help(
            "train:val:test ratios without fixed lists (RCKD: 6:2:2); with a fixed test list train:val is split by the first two"
        ),
    )
    seed: int = field(default=0, metadata=_help("training seed; split i trains with seed + i"))
    split_seed: int = field(
        default=0, metadata=_help("seed of the splits (split i uses SeedSequence([seed, i]))")
    )
    ignore_index: int = field(
        default=255, metadata=_help("mask value of unlabelled pixels (segmentation)")
    )
    cache_images: bool | None = field(
        default=None, metadata=_help("keep resized images in memory; auto: when they fit in 2 GiB")
    )
    loader_workers: int = field(
        default=0, metadata=_help("DataLoader processes per training worker")
    )
    # --- evaluation -------------------------------------------------------------------------
    bootstrap_resamples: int = field(
        default=10_000, metadata=_help("bootstrap resamples of the test set for the 95%% interval")
    )
    confidence: float = field(
        default=0.95, metadata=_help("confidence level of the bootstrap interval")
    )
    # --- cluster ----------------------------------------------------------------------------
    num_workers: int = field(
        default=1,
        metadata=_help(
            "Ray Train workers of each split (DDP); 0: Ray Train's local mode, in the driver process, one split at a time (debugging, tests)",
            aliases=["workers_per_split"],
        ),
    )
    gpus_per_worker: float = field(
        default=1.0, metadata=_help("GPU share of a worker; 0.2 puts five splits on one GPU")
    )
    max_parallel_splits: int | None = field(
        default=None,
        metadata=_help("splits trained at once; auto: as many as the cluster's resources hold"),
    )
    precision: Literal["auto", "fp32", "bf16"] = field(
        default="auto", metadata=_help("autocast precision; auto: bf16 on GPU, fp32 on CPU")
    )
    max_failures: int = field(
        default=1, metadata=_help("worker-group restarts of a split from its last checkpoint")
    )
    fail_at_epoch: int | None = field(
        default=None,
        metadata=_help(
            "test only: one worker raises once in this epoch of each split", cli="hidden"
        ),
    )
    mlflow_experiment: str = field(
        default="histokd-finetune", metadata=_help("MLflow experiment name")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ints(
            self,
            [
                "input_size",
                "batch_size",
                "epochs",
                "patience",
                "num_splits",
                "bootstrap_resamples",
            ],
        )
        check_ints(
            self,
            ["num_workers", "loader_workers", "split_seed"],
            minimum=0,
        )
        check_ints(self, ["max_parallel_splits"], auto=True)
        if self.magnification is not None and (
            isinstance(self.magnification, bool) or not self.magnification > 0
        ):
            raise ValueError(
                f"magnification={self.magnification!r}: must be positive (e.g. 20) or None (the dataset's)"
            )
        if self.patch_size is not None and (
            isinstance(self.patch_size, bool)
            or not isinstance(self.patch_size, int)
            or self.patch_size <= 0
        ):
            raise ValueError(
                f"patch_size={self.patch_size!r}: must be a positive integer or None (the dataset's)"
            )
        if self.input_size < 32:
            raise ValueError(
                f"input_size={self.input_size}: must be at least 32 (the backbones downsample by 32)"
            )
        if self.task not in ("classification", "segmentation"):
            raise ValueError(f"task={self.task!r}: allowed: classification, segmentation")
        if self.positional_encoding not in ("frozen", "trained"):
            raise ValueError(
                f"positional_encoding={self.positional_encoding!r}: allowed: frozen, trained"
            )
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision={self.precision!r}: allowed: auto, fp32, bf16")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r}: must be positive")
        if not 0 <= self.momentum < 1 or not self.weight_decay >= 0:
            raise ValueError(
                f"momentum={self.momentum!r}, weight_decay={self.weight_decay!r}: need 0 <= momentum < 1 and weight_decay >= 0"
            )
        if not self.focal_alpha > 0 or not self.focal_gamma >= 0:
            raise ValueError(
                f"focal_alpha={self.focal_alpha!r}, focal_gamma={self.focal_gamma!r}: need alpha > 0 and gamma >= 0 (RCKD: 0.25, 2)"
            )
        if not 0 <= self.drop_rate < 1 or not self.min_delta >= 0:
            raise ValueError(
                f"drop_rate={self.drop_rate!r}, min_delta={self.min_delta!r}: need 0 <= drop_rate < 1 and min_delta >= 0"
            )
        if not 0 <= self.color_jitter < 1 or not 0 <= self.hue_jitter <= 0.5:
            raise ValueError(
                f"color_jitter={self.color_jitter!r}, hue_jitter={self.hue_jitter!r}: need 0 <= color_jitter < 1 and 0 <= hue_jitter <= 0.5"
            )
        self.split_ratios = [float(r) for r in self.split_ratios]
        if (
            len(self.split_ratios) != 3
            or any(r < 0 for r in self.split_ratios)
            or self.split_ratios[0] <= 0
            or self.split_ratios[1] <= 0
        ):
            raise ValueError(
                f"split_ratios={self.split_ratios!r}: need 3 ratios train val test with train, val > 0 (RCKD: 0.6 0.2 0.2)"
            )
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence={self.confidence!r}: must be in (0, 1)")
        if not 0 < self.gpus_per_worker <= 1:
            raise ValueError(f"gpus_per_worker={self.gpus_per_worker!r}: must be in (0, 1]")
        from histokd.models import BACKBONES

        if self.backbone not in BACKBONES:
            raise ValueError(
                f"backbone={self.backbone!r}: unknown; allowed: {', '.join(BACKBONES)}"
            )
        kind = init_kind(self.init)
        if kind != "random":
            path = self.init[len("timm:") :] if kind == "timm" else self.init
            if not os.path.isfile(path):
                raise ValueError(
                    f"init={self.init!r}: no such file {path!r}; allowed: random, a backbone file, or timm:FILE"
                )
            absolute = os.path.abspath(path)
            self.init = f"timm:{absolute}" if kind == "timm" else absolute
        if self.data:
            if not os.path.exists(self.data):
                raise ValueError(f"data={self.data!r}: no such folder or CSV file")
            self.data = os.path.abspath(self.data)
        self.demo_dir = os.path.abspath(self.demo_dir)

    @property
    def init_name(self) -> str:
        """The initialisation's name in tables."""
        return resolve_init_label(self.init, self.init_label)


# Small enough to run end to end offline on a 2-core CPU in minutes: 256 px patches at 20x from
# synthetic slides, resized to 96 px, a few dozen epochs with a higher learning rate than the
# paper's (random and RCKD initialisations alike need it at this size).
DEMO_PRESET: dict = {
    "input_size": 96,
    "batch_size": 32,
    "epochs": 40,
    "patience": 8,
    "lr": 0.01,
    "bootstrap_resamples": 2000,
}
