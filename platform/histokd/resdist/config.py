"""Settings of the resolution-distillation jobs: DiPalma et al. 2021's defaults (Sec. 3, 4.5), the
rest from the authors' public code (``../shared/RESOLUTION_KD.md``). No torch, timm or Ray here."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal

from histokd.cli import arg, check_ints, config_to_dict
from histokd.run import RunConfig, WorkerConfig, resolve_output_path

__all__ = ["DemoConfig", "DistillConfig", "DistillSearchConfig", "EvaluateConfig", "ResdistConfig",
           "SupervisedConfig"]  # fmt: skip

SPLITS = ("train", "val", "test", "aux")
SCORES = ("accuracy", "top1_accuracy", "f1", "precision", "recall")


# Tables 6-8: the region images' magnifications, the teacher's (10x) first, then the students'
_MAGNIFICATIONS = [10.0, 5.0, 2.5, 1.25, 0.625]
_STUDENTS = _MAGNIFICATIONS[1:]
_SEARCHED = _STUDENTS[::-1]  # a search's grid, low to high


def _from_grid(what: str, grid: str) -> Any:
    """A field every search trial takes from ``--grid``: giving it is an error."""
    return arg(None, f"not used (giving it is an error): every trial's {what} comes from --{grid}")


def _check(config: Any, *checks: tuple[str, bool, str]) -> None:
    """Raise naming the first field whose check failed: ``(field, ok, what is allowed)``."""
    for name, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{name}={getattr(config, name)!r}: {allowed}")


def _check_splits(*groups: list[str]) -> None:
    if not groups[0]:
        raise ValueError("train splits: give at least one")
    for name in sorted({s for group in groups for s in group} - set(SPLITS)):
        raise ValueError(f"split {name!r}: allowed: {', '.join(SPLITS)}")


def _model_path(path: str) -> str:
    """A model file, or the ``model.pt`` of a run folder, as an absolute path."""
    path = os.path.abspath(path)
    return os.path.join(path, "model.pt") if os.path.isdir(path) else path


class _Regions:
    """The data table and its region images, shared by the training and evaluation configs."""

    def _check_data(self) -> None:
        if not self.data:
            raise ValueError("data: give the data table (CSV); jobs/resdist_demo.py makes one")
        if not os.path.isfile(self.data):
            raise ValueError(f"data={self.data!r}: no such file")
        self.data = os.path.abspath(self.data)
        self.region_dir = self.region_dir and os.path.abspath(self.region_dir)

    @property
    def regions_root(self) -> str:
        return self.region_dir or os.path.join(self.storage_path, "regions")


@dataclass
class ResdistConfig(WorkerConfig, _Regions):
    """What every resolution-distillation training job shares (``select``: the weights kept,
    ``best`` of the lowest validation loss or ``last``; auto: best when validation is held out)."""

    mlflow_experiment: str = arg("histokd-resdist", "MLflow experiment name")
    data: str = arg("", "data table: CSV of slide, split, label[, x, y, width, height]")
    region_dir: str | None = arg(None, "folder of the region images; default: STORAGE/regions")
    max_bad_fraction: float = arg(0.01, "largest share of regions with unreadable images to skip")
    magnifications: list[float] = arg(help="of the region images", factory=_MAGNIFICATIONS.copy)
    class_names: list[str] = arg(help="class order; default: the sorted labels", factory=list)
    thumbnail_magnification: float = arg(1.25, "magnification tissue regions are found at")
    min_region_area_um2: float = arg(10_000.0, "smallest tissue area of a region, um^2")
    closing_um: float = arg(16.0, "radius of the closing that joins nearby tissue, um")
    padding_um: float = arg(8.0, "margin around each region's box, um")
    backbone: str = arg("resdist_resnet", "the paper's network, or a timm model", aliases=["arch"])
    num_groups: int = arg(32, "GroupNorm groups (public code: 32)")
    epochs: int = arg(100, "training epochs (Sec. 4.5.1: 100)")
    accumulation_steps: int = arg(32, "images per optimizer step (Sec. 3.5; public code: 32)")
    lr: float = arg(1e-3, "Adam learning rate (Sec. 4.5.1: 0.001)")
    weight_decay: float = arg(1e-4, "Adam weight decay (public code: 1e-4)")
    lr_gamma: float = arg(1.0, "learning-rate factor per epoch (public code: 1.0)")
    augment: bool = arg(True, "colour jitter, flips and 90-degree rotations (Sec. 3.2)")
    brightness: float = arg(0.5, "colour jitter brightness (public code: 0.5)")
    contrast: float = arg(0.5, "colour jitter contrast (public code: 0.5)")
    saturation: float = arg(0.5, "colour jitter saturation (public code: 0.5)")
    hue: float = arg(0.2, "colour jitter hue (public code: 0.2)")
    select: Literal["auto", "best", "last"] = arg("auto", "best: least val loss; auto: if held out")
    loader_workers: int = arg(0, "DataLoader processes per training worker")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_data()
        self.magnifications = sorted({float(m) for m in self.magnifications}, reverse=True)
        check_ints(self, ["epochs", "accumulation_steps", "num_groups"])
        check_ints(self, ["loader_workers"], minimum=0)
        jitter = ("brightness", "contrast", "saturation")
        bad = self.max_bad_fraction
        _check(
            self,
            ("magnifications", min(self.magnifications, default=0) > 0, "need positive values"),
            ("lr", self.lr > 0, "must be positive"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("lr_gamma", 0 < self.lr_gamma <= 1, "must be in (0, 1]"),
            ("max_bad_fraction", type(bad) in (int, float) and 0 <= bad <= 1, "must be in [0, 1]"),
            *((name, 0 <= getattr(self, name) <= 1, "must be in [0, 1]") for name in jitter),
            ("hue", 0 <= self.hue <= 0.5, "must be in [0, 0.5]"),
            ("select", self.select in ("auto", "best", "last"), "allowed: auto, best, last"),
            ("storage_path", not self.remote_storage, "use a shared file system path"),
        )
        self.region_finder()  # checks the region settings
        if self.backbone != "resdist_resnet":
            import timm

            from histokd.models import timm_name

            ok = timm.is_model(timm_name(self.backbone))
            _check(self, ("backbone", ok, "not a timm model; e.g. resdist_resnet, resnet18, csat"))

    def region_finder(self):
        """The tissue-region settings (a ``histokd.resdist.regions.RegionFinder``)."""
        from histokd.resdist.regions import RegionFinder

        return RegionFinder(
            self.thumbnail_magnification, self.min_region_area_um2, self.closing_um, self.padding_um
        )

    def check_magnification(self, name: str, value: float) -> None:
        """Raise naming ``name`` when ``value`` has no region images."""
        if float(value) not in self.magnifications:
            raise ValueError(
                f"{name}={value!r}: not among magnifications {self.magnifications}; add it there"
            )


@dataclass
class SupervisedConfig(ResdistConfig):
    """The teacher (Sec. 3.2, 4.5.1), or a baseline from scratch at a low magnification (4.5.2)."""

    run_name: str = arg("teacher", "run name; rerunning it resumes")
    magnification: float = arg(10.0, "input magnification (Sec. 4.5.1: 10x; RCC: 5x)")
    method: str = arg("teacher", "name in the tables: teacher or baseline")
    train_splits: list[str] = arg(help="splits trained on", factory=lambda: ["train"])
    val_splits: list[str] = arg(help="splits validated on", factory=lambda: ["val"])

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_magnification("magnification", self.magnification)
        _check_splits(self.train_splits, self.val_splits)


@dataclass
class DistillConfig(ResdistConfig):
    """A student at a low magnification distilled from a frozen teacher (Sec. 3.3, 4.5.3-4.5.4) on
    ``train_splits`` (labels ignored), then its last layer fine-tuned (Sec. 3.4,
    :attr:`do_finetune`) on the labelled ``finetune_splits``."""

    run_name: str = arg("kd", "run name; rerunning it resumes")
    teacher: str = arg("", "the teacher's model file or run folder")
    magnification: float = arg(1.25, "the student's magnification (Tables 6-8)")
    temperature: float = arg(1.0, "T of the soft loss, Eq. 2 (public code: 1.0)")
    resize_modes: list[str] = arg(help="g_k of Eq. 3, mean", factory=lambda: ["maxpool", "bicubic"])
    distance: Literal["mse", "l1"] = arg("mse", "pixel-loss distance (Eq. 3: mse)")
    public_code_maxpool_only: bool = arg(False, "public code's pixel loss (max-pool term, halved)")
    train_splits: list[str] = arg(help="distilled on (AD: aux)", factory=lambda: ["train", "val"])
    val_splits: list[str] = arg(help="splits of the validation loss", factory=list)
    finetune: Literal["auto", "yes", "no"] = arg("auto", "last layer (3.4); auto: other KD data")
    finetune_epochs: int = arg(100, "fine-tuning epochs ('until convergence', Sec. 3.4)")
    finetune_lr: float = arg(1e-3, "fine-tuning learning rate (Sec. 3.4 gives none)")
    finetune_splits: list[str] = arg(help="labelled splits tuned on", factory=lambda: ["train"])
    finetune_val_splits: list[str] = arg(help="fine-tuning's validation", factory=lambda: ["val"])
    method: str | None = arg(None, "name in the tables; default: KD, or KD (AD) on aux")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.teacher:
            raise ValueError("teacher: give the teacher's model file or run folder")
        self.teacher = _model_path(self.teacher)
        if not os.path.isfile(self.teacher):
            raise ValueError(f"teacher={self.teacher!r}: no such model file")
        self.check_magnification("magnification", self.magnification)
        check_ints(self, ["finetune_epochs"])
        modes = set(self.resize_modes)
        _check(
            self,
            ("temperature", self.temperature > 0, "must be positive"),
            (
                "resize_modes",
                modes and modes <= {"maxpool", "bicubic"},
                "allowed: maxpool, bicubic",
            ),
            ("distance", self.distance in ("mse", "l1"), "allowed: mse, l1"),
            ("finetune", self.finetune in ("auto", "yes", "no"), "allowed: auto, yes, no"),
            ("finetune_lr", self.finetune_lr > 0, "must be positive"),
        )
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
        """``KD (AD)`` when distilled on the auxiliary set, else ``KD`` (Tables 6-8)."""
        return self.method or ("KD (AD)" if "aux" in self.train_splits else "KD")


@dataclass
class DistillSearchConfig(DistillConfig):
    """A grid over student magnification x temperature (T of Eq. 2); every other field is the
    distillation's; a trial is scored on the labelled ``score_splits``."""

    run_name: str = arg("kd-search", "name of the search; rerunning it resumes")
    # every trial takes these two from the grid: refused when given, so no flag is silently ignored
    magnification: float | None = _from_grid("student magnification", "searched-magnifications")
    temperature: float | None = _from_grid("temperature", "temperatures")
    searched_magnifications: list[float] = arg(help="students (Tables 6-8)", factory=_SEARCHED.copy)
    temperatures: list[float] = arg(help="T of Eq. 2 searched", factory=lambda: [1.0, 2.0, 4.0])
    score_splits: list[str] = arg(help="labelled splits scoring a trial", factory=lambda: ["val"])
    score: str = arg("top1_accuracy", f"metric trials are ranked by: {', '.join(SCORES)}")
    max_concurrent_trials: int | None = arg(None, "trials at once; auto: as the CPUs allow")

    def __post_init__(self) -> None:
        grids = {"magnification": "searched_magnifications", "temperature": "temperatures"}
        for name, grid in grids.items():
            if getattr(self, name) is not None:
                raise ValueError(
                    f"{name}={getattr(self, name)!r}: a search takes every trial's {name} from "
                    f"{grid} and would ignore it; give the values as --{grid.replace('_', '-')}"
                )
        if not self.searched_magnifications or not self.temperatures:
            raise ValueError("searched_magnifications and temperatures: give at least one each")
        self.searched_magnifications = [float(m) for m in self.searched_magnifications]
        self.temperatures = [float(t) for t in self.temperatures]
        # DistillConfig checks one student's magnification and temperature: placeholders it takes
        self.magnification, self.temperature = (self.magnifications or [None])[0], 1.0
        try:
            super().__post_init__()
        finally:
            self.magnification = self.temperature = None
        for mag in self.searched_magnifications:
            self.check_magnification("searched_magnifications", mag)
        check_ints(self, ["max_concurrent_trials"], auto=True)
        _check(
            self,
            ("temperatures", min(self.temperatures) > 0, "must be positive"),
            # Ray Train's local mode cannot run in a Tune trial: each trial trains on its workers
            ("num_workers", self.num_workers != 0, "a search needs Ray Train workers: 1 or more"),
            ("score", self.score in SCORES, f"allowed: {', '.join(SCORES)}"),
        )

    def distill_fields(self) -> dict[str, Any]:
        """The distillation settings shared by every trial."""
        names = {f.name for f in dataclasses.fields(DistillConfig)}
        return {k: v for k, v in config_to_dict(self).items() if k in names}


@dataclass
class EvaluateConfig(RunConfig, _Regions):
    """Evaluation of trained models on the test set: the Tables 5-8 and Fig. 3 outputs."""

    run_name: str = arg("evaluation", "name of the evaluation (its folder and MLflow run)")
    mlflow_experiment: str = arg("histokd-resdist", "MLflow experiment name")
    model: list[str] = arg(help="model files or run folders", factory=list, aliases=["models"])
    data: str = arg("", "the data table the models were trained on")
    region_dir: str | None = arg(None, "folder of the region images; default: STORAGE/regions")
    dataset_name: str = arg("dataset", "title of the table and chart")
    splits: list[str] = arg(help="evaluated (Sec. 4.5: the test set)", factory=lambda: ["test"])
    bootstrap_resamples: int = arg(10_000, "resamples (Sec. 4.5: 10,000)", aliases=["n_resamples"])
    confidence: float = arg(0.95, "interval level (Sec. 4.5: 0.95)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model:
            raise ValueError("model: give at least one model file or run folder")
        self.model = [_model_path(m) for m in self.model]
        for path in (p for p in self.model if not os.path.isfile(p)):
            raise ValueError(f"model: {path!r} is neither a model file nor a run folder")
        self._check_data()
        check_ints(self, ["bootstrap_resamples"])
        _check(self, ("confidence", 0 < self.confidence < 1, "must be in (0, 1)"))
        _check_splits(self.splits)


@dataclass
class DemoConfig(RunConfig):
    """The offline demo (small on purpose; the paper's settings are the jobs' defaults).
    ``label_level`` ``slide``: each labelled slide is drawn with one dominant class (70% of it),
    its regions' label; ``region``: a region's label is its dominant class."""

    run_name: str = arg("resdist-demo", "name of the demo's MLflow run")
    storage_path: str = arg("runs/resdist_demo", "where the runs, tables and chart go")
    mlflow_experiment: str = arg("histokd-resdist", "MLflow experiment name")
    demo_dir: str = arg("demo_data/resdist", "where the synthetic slides go (reused)")
    labelled_slides: int = arg(30, "synthetic slides with labelled regions")
    aux_slides: int = arg(8, "synthetic slides of the unlabelled auxiliary set")
    val_slides: int = arg(5, "labelled slides held out for validation")
    test_slides: int = arg(10, "labelled slides held out for testing")
    slide_size: int = arg(2048, "side of each synthetic slide in pixels at 20x")
    teacher_magnification: float = arg(10.0, "teacher magnification (Sec. 4.5.1: 10x)")
    student_magnifications: list[float] = arg(help="students (Tables 6-8)", factory=_STUDENTS.copy)
    teacher_epochs: int = arg(20, "teacher epochs (paper: 100)")
    epochs: int = arg(12, "baseline and distillation epochs (paper: 100)")
    finetune_epochs: int = arg(10, "last-layer fine-tuning epochs after KD (AD)")
    accumulation_steps: int = arg(2, "images per optimizer step (public code: 32)")
    label_level: Literal["region", "slide"] = arg("region", "region's dominant class or slide's")
    min_purity: float = arg(0.75, "labelled regions whose dominant class covers less are left out")
    paper_jitter: bool = arg(False, "public code's colour jitter, not a mild one (0.1, hue 0.02)")
    temperature: float = arg(1.0, "soft-loss temperature (public code: 1.0)")
    bootstrap_resamples: int = arg(10_000, "resamples (paper: 10,000)", aliases=["n_resamples"])
    num_workers: int = arg(0, "Ray Train workers per run; 0: Ray Train's local mode (fast start)")
    cpus_per_worker: float = arg(1.0, "CPUs of each training worker")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ints(self, ["labelled_slides", "aux_slides", "val_slides", "test_slides",
                          "slide_size", "teacher_epochs", "epochs", "finetune_epochs",
                          "accumulation_steps", "bootstrap_resamples"])  # fmt: skip
        check_ints(self, ["num_workers"], minimum=0)
        mags = self.student_magnifications = [float(m) for m in self.student_magnifications]
        held_out = self.val_slides + self.test_slides
        teacher = self.teacher_magnification
        _check(
            self,
            ("labelled_slides", self.labelled_slides > held_out,
             f"need more than val_slides + test_slides = {held_out}"),
            ("label_level", self.label_level in ("region", "slide"), "allowed: region, slide"),
            ("min_purity", 0 <= self.min_purity <= 1, "must be in [0, 1]"),
            ("slide_size", self.slide_size >= 512, "must be at least 512"),
            ("teacher_magnification", 0 < teacher <= 20, "the slides are 20x: must be in (0, 20]"),
            ("student_magnifications", mags and all(0 < m < teacher for m in mags),
             f"each must be in (0, teacher_magnification={teacher:g})"),
        )  # fmt: skip
        self.demo_dir = resolve_output_path(self.demo_dir, "demo_dir")
