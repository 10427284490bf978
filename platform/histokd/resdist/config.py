"""Settings of the resolution-distillation jobs, with the paper's defaults and their sources.

DiPalma et al. 2021 give the method and some settings (Sec. 3, 4.5); the network size and the
remaining training settings come from the authors' public code as recorded in
``../shared/RESOLUTION_KD.md`` (cited as "public code" below).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from histokd.cli import RunStorage
from histokd.resdist.regions import RegionFinder

__all__ = [
    "DEFAULT_MAGNIFICATIONS",
    "DistillConfig",
    "EvaluateConfig",
    "ResdistConfig",
    "SupervisedConfig",
    "default_method",
]

#: Teacher 10x and the students' 5x, 2.5x, 1.25x and 0.625x (DiPalma Sec. 4.5.1, Tables 6-8).
DEFAULT_MAGNIFICATIONS = [10.0, 5.0, 2.5, 1.25, 0.625]


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


def _positive_int(name: str, value: Any, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}: must be an integer >= {low}")


@dataclass
class ResdistConfig(RunStorage):
    """What every resolution-distillation training job shares."""

    # --- data ---------------------------------------------------------------------------------
    data: str = field(
        default="",
        metadata=_help(
            "data table (CSV: slide, split, label[, x, y, width, height]); see histokd.resdist.region_set"
        ),
    )
    region_dir: str | None = field(
        default=None, metadata=_help("folder of the region images; default: STORAGE/regions")
    )
    magnifications: list[float] = field(
        default_factory=lambda: list(DEFAULT_MAGNIFICATIONS),
        metadata=_help(
            "magnifications the region images are made at (Sec. 4.1, Tables 6-8: 10 5 2.5 1.25 0.625)"
        ),
    )
    class_names: list[str] = field(
        default_factory=list,
        metadata=_help("class order; default: the sorted labels of the data table"),
    )
    base_magnification: float | None = field(
        default=None, metadata=_help("level-0 magnification of slides that record none")
    )
    thumbnail_magnification: float = field(
        default=1.25,
        metadata=_help(
            "magnification of the view tissue regions are found on (tissueloc works on a low-resolution level)"
        ),
    )
    min_region_area_um2: float = field(
        default=10_000.0,
        metadata=_help("smallest tissue area of a region in um^2 (tissueloc's min_tissue_size)"),
    )
    closing_um: float = field(
        default=16.0,
        metadata=_help("radius of the closing that joins nearby tissue into one region, um"),
    )
    padding_um: float = field(default=8.0, metadata=_help("margin around each region's box, um"))
    # --- training (Sec. 4.5.1 and the public code) ----------------------------------------------
    arch: str = field(
        default="resdist_resnet",
        metadata=_help(
            "network: resdist_resnet (the paper's GroupNorm ResNet) or any timm/histokd zoo model (beyond the paper)"
        ),
    )
    num_groups: int = field(default=32, metadata=_help("GroupNorm groups (public code: 32)"))
    epochs: int = field(default=100, metadata=_help("training epochs (Sec. 4.5.1: 100)"))
    accumulation_steps: int = field(
        default=32,
        metadata=_help(
            "images per optimizer step, by gradient accumulation over single images (Sec. 3.5; public code: 32)"
        ),
    )
    lr: float = field(default=1e-3, metadata=_help("Adam learning rate (Sec. 4.5.1: 0.001)"))
    weight_decay: float = field(
        default=1e-4, metadata=_help("Adam weight decay (public code: 1e-4)")
    )
    lr_gamma: float = field(
        default=1.0, metadata=_help("learning rate factor per epoch (public code: 1.0, constant)")
    )
    augment: bool = field(
        default=True, metadata=_help("colour jitter, flips and 90-degree rotations (Sec. 3.2)")
    )
    brightness: float = field(
        default=0.5, metadata=_help("colour jitter brightness (public code: 0.5)")
    )
    contrast: float = field(
        default=0.5, metadata=_help("colour jitter contrast (public code: 0.5)")
    )
    saturation: float = field(
        default=0.5, metadata=_help("colour jitter saturation (public code: 0.5)")
    )
    hue: float = field(default=0.2, metadata=_help("colour jitter hue (public code: 0.2)"))
    select: Literal["auto", "best", "last"] = field(
        default="auto",
        metadata=_help(
            "weights kept: best (lowest validation loss), last, or auto (best when there is a validation set outside the training splits)"
        ),
    )
    seed: int = field(
        default=0, metadata=_help("seed of initialisation, shuffling and augmentation")
    )
    # --- cluster ------------------------------------------------------------------------------
    run_name: str = field(
        default="resdist",
        metadata=_help("run name; rerunning with the same name resumes from its last checkpoint"),
    )
    storage_path: str = field(
        default="runs", metadata=_help("where runs, checkpoints, region images and models go")
    )
    num_workers: int = field(
        default=1,
        metadata=_help(
            "Ray Train workers (DDP); 0 runs Ray Train's local mode in the driver process"
        ),
    )
    use_gpu: bool | None = field(
        default=None, metadata=_help("train on GPUs; auto: if the cluster has any")
    )
    cpus_per_worker: float = field(
        default=1.0,
        metadata=_help("CPUs reserved by each training worker (also its torch threads)"),
    )
    loader_workers: int = field(
        default=0, metadata=_help("DataLoader processes per training worker")
    )
    max_failures: int = field(
        default=3,
        metadata=_help("worker-group restarts from the last checkpoint before the run fails"),
    )
    # --- tracking -----------------------------------------------------------------------------
    mlflow_tracking_uri: str | None = field(
        default=None, metadata=_help("MLflow tracking URI; default: sqlite:///STORAGE/mlflow.db")
    )
    mlflow_experiment: str = field(
        default="histokd-resdist", metadata=_help("MLflow experiment name")
    )

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError(
                "data: give the data table (CSV); jobs/resdist_demo.py makes one from synthetic slides"
            )
        if not os.path.isfile(self.data):
            raise ValueError(f"data={self.data!r}: no such file")
        self.data = os.path.abspath(self.data)
        self.magnifications = sorted({float(m) for m in self.magnifications}, reverse=True)
        if not self.magnifications or any(not m > 0 for m in self.magnifications):
            raise ValueError(f"magnifications={self.magnifications}: need positive values")
        for name in ("epochs", "accumulation_steps", "num_groups"):
            _positive_int(name, getattr(self, name))
        for name in ("loader_workers", "max_failures", "num_workers"):
            _positive_int(name, getattr(self, name), allow_zero=True)
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r}: must be positive")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay={self.weight_decay!r}: must be >= 0")
        if not 0 < self.lr_gamma <= 1:
            raise ValueError(f"lr_gamma={self.lr_gamma!r}: must be in (0, 1]")
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be in [0, 1]")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue={self.hue!r}: must be in [0, 0.5]")
        if self.select not in ("auto", "best", "last"):
            raise ValueError(f"select={self.select!r}: allowed: auto, best, last")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker={self.cpus_per_worker!r}: must be positive")
        if not self.run_name or "/" in self.run_name:
            raise ValueError(f"run_name={self.run_name!r}: must be non-empty and contain no '/'")
        self.region_finder()  # validates the region settings
        self._check_arch()
        if "://" in self.storage_path:
            raise ValueError(
                f"storage_path={self.storage_path!r}: resolution distillation writes region images and models next to the runs; use a shared file system path"
            )
        self.storage_path = os.path.abspath(self.storage_path)  # Ray needs absolute paths
        if self.region_dir is not None:
            self.region_dir = os.path.abspath(self.region_dir)

    def _check_arch(self) -> None:
        from histokd.resdist.model import RESDIST_ARCH

        if self.arch == RESDIST_ARCH:
            return
        import timm

        import histokd.models  # noqa: F401  (registers the zoo's models)

        if not timm.is_model(self.arch):
            raise ValueError(
                f"arch={self.arch!r}: not a timm model; use {RESDIST_ARCH} (the paper's) or e.g. resnet18, csat"
            )

    def region_finder(self) -> RegionFinder:
        """The tissue-region settings."""
        return RegionFinder(
            thumbnail_magnification=self.thumbnail_magnification, min_area_um2=self.min_region_area_um2,
            closing_um=self.closing_um, padding_um=self.padding_um,
        )  # fmt: skip

    @property
    def regions_root(self) -> str:
        """Folder of the region images."""
        return self.region_dir or os.path.join(self.storage_path, "regions")

    def check_magnification(self, name: str, value: float) -> None:
        """Raise naming ``name`` when ``value`` has no region images."""
        if float(value) not in self.magnifications:
            raise ValueError(
                f"{name}={value!r}: not among magnifications {self.magnifications}; add it there"
            )


@dataclass
class SupervisedConfig(ResdistConfig):
    """A network trained with cross-entropy on labelled regions.

    The teacher (Sec. 3.2, 4.5.1), or a baseline trained from scratch at a lower magnification
    (Sec. 4.5.2).
    """

    run_name: str = field(
        default="teacher", metadata=_help("run name; rerunning with the same name resumes")
    )
    magnification: float = field(
        default=10.0,
        metadata=_help("input magnification (Sec. 4.5.1: 10x teacher for CD and LUAD, 5x for RCC)"),
    )
    method: str = field(
        default="teacher", metadata=_help("name in the tables: teacher or baseline")
    )
    train_splits: list[str] = field(
        default_factory=lambda: ["train"], metadata=_help("splits trained on")
    )
    val_splits: list[str] = field(
        default_factory=lambda: ["val"],
        metadata=_help("splits validated on (weights of the lowest validation loss are kept)"),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_magnification("magnification", self.magnification)
        _check_splits(self.train_splits, self.val_splits)


@dataclass
class DistillConfig(ResdistConfig):
    """A student at a lower magnification distilled from a frozen teacher.

    Sec. 3.3, 4.5.3-4.5.4, optionally followed by fine-tuning its last layer (Sec. 3.4).
    """

    run_name: str = field(
        default="kd", metadata=_help("run name; rerunning with the same name resumes")
    )
    teacher: str = field(
        default="", metadata=_help("the teacher's model file (model.pt) or run folder")
    )
    magnification: float = field(
        default=1.25, metadata=_help("the student's magnification (Tables 6-8: 0.625 1.25 2.5 5)")
    )
    temperature: float = field(
        default=1.0, metadata=_help("T of the soft loss, Eq. 2 (public code: 1.0)")
    )
    resize_modes: list[str] = field(
        default_factory=lambda: ["maxpool", "bicubic"],
        metadata=_help("g_k of Eq. 3 that are averaged (paper: maxpool bicubic)"),
    )
    distance: Literal["mse", "l1"] = field(
        default="mse", metadata=_help("pixel-loss distance (Eq. 3: mse)")
    )
    public_code_maxpool_only: bool = field(
        default=False,
        metadata=_help(
            "reproduce the public code's pixel loss (max-pool term only, halved) instead of Eq. 3"
        ),
    )
    train_splits: list[str] = field(
        default_factory=lambda: ["train", "val"],
        metadata=_help(
            "splits distilled on, labels ignored (Sec. 4.5.3 KD: train val; Sec. 4.5.4 KD (AD): aux)"
        ),
    )
    val_splits: list[str] = field(
        default_factory=list,
        metadata=_help(
            "splits for the validation distillation loss (and fine-tuning's validation)"
        ),
    )
    finetune: Literal["auto", "yes", "no"] = field(
        default="auto",
        metadata=_help(
            "fine-tune the last layer on the labelled training set at the student's magnification (Sec. 3.4); auto: only when the distillation set is not the labelled training set"
        ),
    )
    finetune_epochs: int = field(
        default=100,
        metadata=_help(
            "fine-tuning epochs ('until convergence', Sec. 3.4; the weights of the lowest validation loss are kept)"
        ),
    )
    finetune_lr: float = field(
        default=1e-3,
        metadata=_help(
            "Adam learning rate of the fine-tuning (Sec. 3.4 gives none: the training rate)"
        ),
    )
    finetune_splits: list[str] = field(
        default_factory=lambda: ["train"],
        metadata=_help("labelled splits the last layer is fine-tuned on"),
    )
    finetune_val_splits: list[str] = field(
        default_factory=lambda: ["val"], metadata=_help("splits validating the fine-tuning")
    )
    method: str | None = field(
        default=None,
        metadata=_help("name in the tables; default: KD, or KD (AD) when distilling on aux"),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.teacher:
            raise ValueError(
                "teacher: give the teacher's model file or run folder (jobs/resdist_teacher.py writes it)"
            )
        self.teacher = os.path.abspath(self.teacher)
        if os.path.isdir(self.teacher):
            self.teacher = os.path.join(self.teacher, "model.pt")
        if not os.path.isfile(self.teacher):
            raise ValueError(f"teacher={self.teacher!r}: no such model file")
        self.check_magnification("magnification", self.magnification)
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r}: must be positive")
        if not self.resize_modes or any(m not in ("maxpool", "bicubic") for m in self.resize_modes):
            raise ValueError(
                f"resize_modes={self.resize_modes}: allowed: maxpool, bicubic (one or both)"
            )
        if self.distance not in ("mse", "l1"):
            raise ValueError(f"distance={self.distance!r}: allowed: mse, l1")
        if self.finetune not in ("auto", "yes", "no"):
            raise ValueError(f"finetune={self.finetune!r}: allowed: auto, yes, no")
        _positive_int("finetune_epochs", self.finetune_epochs)
        if not self.finetune_lr > 0:
            raise ValueError(f"finetune_lr={self.finetune_lr!r}: must be positive")
        _check_splits(self.train_splits, self.val_splits)
        _check_splits(self.finetune_splits, self.finetune_val_splits)

    @property
    def do_finetune(self) -> bool:
        """Sec. 3.4: fine-tune only when the distillation data is not the labelled training set."""
        if self.finetune != "auto":
            return self.finetune == "yes"
        return not set(self.finetune_splits) <= set(self.train_splits)

    @property
    def method_name(self) -> str:
        """The method's name in the tables."""
        return self.method or default_method(self.train_splits)


def default_method(train_splits: list[str]) -> str:
    """``KD (AD)`` when the distillation uses the auxiliary set, else ``KD`` (Tables 6-8)."""
    return "KD (AD)" if "aux" in train_splits else "KD"


@dataclass
class EvaluateConfig(RunStorage):
    """Evaluation of trained models on the test set: the Tables 5-8 and Fig. 3 outputs."""

    models: list[str] = field(
        default_factory=list, metadata=_help("model files (model.pt) or run folders to evaluate")
    )
    data: str = field(default="", metadata=_help("the data table the models were trained on"))
    region_dir: str | None = field(
        default=None, metadata=_help("folder of the region images; default: STORAGE/regions")
    )
    storage_path: str = field(default="runs", metadata=_help("where the evaluation folder goes"))
    run_name: str = field(
        default="evaluation", metadata=_help("name of the evaluation (its folder and MLflow run)")
    )
    dataset_name: str = field(default="dataset", metadata=_help("title of the table and chart"))
    splits: list[str] = field(
        default_factory=lambda: ["test"],
        metadata=_help("splits evaluated (Sec. 4.5: the labelled test set)"),
    )
    n_resamples: int = field(
        default=10_000, metadata=_help("bootstrap resamples of the test set (Sec. 4.5: 10,000)")
    )
    confidence: float = field(default=0.95, metadata=_help("interval level (Sec. 4.5: 0.95)"))
    seed: int = field(default=0, metadata=_help("bootstrap seed"))
    mlflow_tracking_uri: str | None = field(
        default=None, metadata=_help("MLflow tracking URI; default: sqlite:///STORAGE/mlflow.db")
    )
    mlflow_experiment: str = field(
        default="histokd-resdist", metadata=_help("MLflow experiment name")
    )

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("models: give at least one model file or run folder")
        resolved = []
        for entry in self.models:
            path = os.path.abspath(entry)
            path = os.path.join(path, "model.pt") if os.path.isdir(path) else path
            if not os.path.isfile(path):
                raise ValueError(
                    f"models: {entry!r} is neither a model file nor a run folder with model.pt"
                )
            resolved.append(path)
        self.models = resolved
        if not self.data or not os.path.isfile(self.data):
            raise ValueError(f"data={self.data!r}: no such file")
        self.data = os.path.abspath(self.data)
        _positive_int("n_resamples", self.n_resamples)
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence={self.confidence!r}: must be in (0, 1)")
        _check_splits(self.splits, [])
        self.storage_path = os.path.abspath(self.storage_path)
        if self.region_dir is not None:
            self.region_dir = os.path.abspath(self.region_dir)

    @property
    def regions_root(self) -> str:
        """Folder of the region images."""
        return self.region_dir or os.path.join(self.storage_path, "regions")


def _check_splits(train: list[str], val: list[str]) -> None:
    from histokd.resdist.region_set import SPLITS

    if not train:
        raise ValueError("train splits: give at least one")
    for name in list(train) + list(val):
        if name not in SPLITS:
            raise ValueError(f"split {name!r}: allowed: {', '.join(SPLITS)}")
