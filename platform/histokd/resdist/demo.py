"""The offline demo of resolution-based distillation on synthetic slides (minutes on 2 CPUs).

What it does, in the paper's order (DiPalma Sec. 3.1, 4.5):

1. Writes synthetic H&E slides (``histokd.synthetic``, 20x scans) whose tissue is broken into
   pieces (many lumens), and finds the tissue regions on them as the paper does with tissueloc.
   Each region's label is the tissue class (stroma, tumor, lymphocyte) covering most of it,
   read from the slides' ground truth: a synthetic region-level label, impure where a region
   spans several classes (labelled regions whose dominant class covers less than 75% of the
   tissue are left out). With ``--label-level slide`` every region of a slide carries the
   slide's label instead: the labelled slides are drawn with one dominant class each (70% of
   their class regions) and that class is the label of all their regions, as the paper's
   slide-level labels are, noisy where a region is of another class. Slides are split into training,
   validation and test slides; a second set of slides is the unlabelled auxiliary set.
2. Trains the teacher at 10x (cross-entropy, Adam 1e-3).
3. At each student magnification (default 5x, 2.5x, 1.25x and 0.625x): a baseline from
   scratch, KD on the labelled training and validation regions (labels ignored), and KD (AD) on
   the auxiliary set followed by fine-tuning of the last layer on the labelled training set.
4. Evaluates every model on the test regions (bootstrap intervals, GFLOPs) and writes the
   Tables 5-8-style table and the Fig. 3-style chart, also to MLflow.

The sizes are small so that everything runs in minutes: tiny slides, few epochs, gradient
accumulation over 2 images instead of 32, a mild colour jitter. The numbers show the pipeline works; they are not
the paper's experiment.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from histokd.cli import check_ints
from histokd.cluster import init_ray

__all__ = ["DemoConfig", "DemoResult", "make_demo_data", "run_demo"]


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class DemoConfig:
    """Settings of the demo (small on purpose; the paper's are the jobs' defaults)."""

    storage_path: str = field(
        default="runs/resdist_demo", metadata=_help("where the runs, tables and chart go")
    )
    demo_dir: str = field(
        default="demo_data/resdist",
        metadata=_help("where the synthetic slides go (reused when present)"),
    )
    labelled_slides: int = field(
        default=30, metadata=_help("synthetic slides with labelled regions")
    )
    aux_slides: int = field(
        default=8, metadata=_help("synthetic slides of the unlabelled auxiliary set")
    )
    val_slides: int = field(default=5, metadata=_help("labelled slides held out for validation"))
    test_slides: int = field(default=10, metadata=_help("labelled slides held out for testing"))
    slide_size: int = field(
        default=2048, metadata=_help("side of each synthetic slide in pixels at 20x (0.5 um/px)")
    )
    seed: int = field(default=0, metadata=_help("seed of the slides, the splits and the training"))
    teacher_magnification: float = field(
        default=10.0, metadata=_help("teacher magnification (DiPalma Sec. 4.5.1: 10x)")
    )
    student_magnifications: list[float] = field(
        default_factory=lambda: [5.0, 2.5, 1.25, 0.625],
        metadata=_help("student magnifications (Tables 6-8)"),
    )
    teacher_epochs: int = field(default=20, metadata=_help("teacher epochs (paper: 100)"))
    epochs: int = field(default=12, metadata=_help("baseline and distillation epochs (paper: 100)"))
    finetune_epochs: int = field(
        default=10, metadata=_help("last-layer fine-tuning epochs after KD (AD)")
    )
    accumulation_steps: int = field(
        default=2,
        metadata=_help(
            "images per optimizer step (paper's public code: 32; with few images, fewer per step leaves more steps)"
        ),
    )
    label_level: Literal["region", "slide"] = field(
        default="region",
        metadata=_help(
            "region: each region is labelled with its own dominant class (regions under --min-purity left out); slide: the labelled slides are drawn with one dominant class each (70%% of their class regions) and every region of a slide carries that class as its label, as the paper's slide-level labels (noisy where a region is of another class)"
        ),
    )
    min_purity: float = field(
        default=0.75,
        metadata=_help(
            "labelled regions whose dominant class covers less of their tissue are left out"
        ),
    )
    paper_jitter: bool = field(
        default=False,
        metadata=_help(
            "the public code's colour jitter (0.5, 0.5, 0.5, hue 0.2) instead of a mild one (0.1, 0.1, 0.1, hue 0.02): the synthetic classes differ in colour, which hue shifts of up to 72 degrees hide from a network trained for a few epochs"
        ),
    )
    temperature: float = field(
        default=1.0, metadata=_help("soft-loss temperature (public code: 1.0)")
    )
    n_resamples: int = field(
        default=10_000, metadata=_help("bootstrap resamples of the test set (paper: 10,000)")
    )
    num_workers: int = field(
        default=0,
        metadata=_help(
            "Ray Train workers per run; 0 (default): Ray Train's local mode in this process, which saves each of the 17 runs the start-up of a worker group (20-25 s on 2 busy CPUs)"
        ),
    )
    cpus_per_worker: float = field(default=1.0, metadata=_help("CPUs of each training worker"))
    mlflow_tracking_uri: str | None = field(
        default=None, metadata=_help("MLflow tracking URI; default: sqlite:///STORAGE/mlflow.db")
    )

    def __post_init__(self) -> None:
        check_ints(self, ["labelled_slides", "aux_slides", "val_slides", "test_slides", "slide_size", "teacher_epochs",
                          "epochs", "finetune_epochs", "accumulation_steps", "n_resamples"])  # fmt: skip
        if self.labelled_slides < self.val_slides + self.test_slides + 1:
            raise ValueError(
                f"labelled_slides={self.labelled_slides}: need more than val_slides + test_slides = {self.val_slides + self.test_slides}"
            )
        if self.label_level not in ("region", "slide"):
            raise ValueError(f"label_level={self.label_level!r}: allowed: region, slide")
        if not 0 <= self.min_purity <= 1:
            raise ValueError(f"min_purity={self.min_purity!r}: must be in [0, 1]")
        if self.slide_size < 512:
            raise ValueError(f"slide_size={self.slide_size}: must be at least 512")
        self.student_magnifications = [float(m) for m in self.student_magnifications]
        if not self.student_magnifications or any(
            not 0 < m < self.teacher_magnification for m in self.student_magnifications
        ):
            raise ValueError(
                f"student_magnifications={self.student_magnifications}: each must be in (0, teacher_magnification={self.teacher_magnification:g})"
            )
        if not 0 < self.teacher_magnification <= 20:
            raise ValueError(
                f"teacher_magnification={self.teacher_magnification!r}: the demo slides are 20x scans; must be in (0, 20]"
            )
        if (
            isinstance(self.num_workers, bool)
            or not isinstance(self.num_workers, int)
            or self.num_workers < 0
        ):
            raise ValueError(f"num_workers={self.num_workers!r}: must be an integer >= 0")
        self.storage_path = str(Path(self.storage_path).absolute())
        self.demo_dir = str(Path(self.demo_dir).absolute())


#: Synthetic slides whose tissue falls into pieces (lumens), so that a slide has several regions,
#: and whose three class areas are large (about one third of a slide each), so most pieces are pure.
_SLIDE_FIELDS = {"lumen_fraction": 0.45, "tissue_fraction": 0.6, "region_size_um": 2000.0}
#: With slide-level labels: the share of class regions of a slide's dominant class.
_DOMINANT_SHARE = 0.7
#: Region search on the demo slides (1 mm wide): smaller regions than on real biopsies count.
_MIN_AREA_UM2 = 5_000.0


def _class_counts(slide, region, scale: int = 8) -> np.ndarray:
    """Ground-truth tissue pixels of each class in a region (at 1/``scale`` of level 0)."""
    size = (max(1, region.width // scale), max(1, region.height // scale))
    truth = slide.read_truth(
        region.x, region.y, region.width, region.height, kind="regions", size=size
    )
    return np.bincount(truth[truth > 0], minlength=len(slide.class_names) + 1)[1:]


def _dominant(counts: np.ndarray) -> tuple[int, float]:
    """(class index, share of the tissue) of the class covering most; (-1, 0) without tissue."""
    total = counts.sum()
    return (int(counts.argmax()), float(counts.max() / total)) if total else (-1, 0.0)


def make_demo_data(config: DemoConfig) -> tuple[Path, dict[str, Any]]:
    """Write the synthetic slides and the data table (``data.csv``) of the demo.

    Returns:
        The table's path and a summary (regions per split and class).
    """
    from histokd.resdist.regions import RegionFinder, find_tissue_regions
    from histokd.synthetic import DEFAULT_CLASSES, make_demo_slides

    root = Path(config.demo_dir)
    size = {"width": config.slide_size, "height": config.slide_size}
    if config.label_level == "region":
        labelled = make_demo_slides(
            root / "labelled", n=config.labelled_slides, seed=config.seed, **size, **_SLIDE_FIELDS
        )
    else:  # one dominant class per slide (in turn), so that a slide's label says something about its regions
        n_classes = len(DEFAULT_CLASSES)
        labelled, drawn = [], []
        for k in range(n_classes):
            weights = tuple(
                _DOMINANT_SHARE if j == k else (1 - _DOMINANT_SHARE) / (n_classes - 1)
                for j in range(n_classes)
            )
            count = len(range(k, config.labelled_slides, n_classes))
            labelled += make_demo_slides(root / f"labelled-dominant-{k + 1}", n=count, seed=config.seed + 100 * (k + 1),
                                         class_weights=weights, **size, **_SLIDE_FIELDS)  # fmt: skip
            drawn += [k] * count
    aux = make_demo_slides(
        root / "aux", n=config.aux_slides, seed=config.seed + 1000, **size, **_SLIDE_FIELDS
    )
    order = np.random.default_rng(config.seed).permutation(len(labelled))
    split_of = {}
    for rank, i in enumerate(order):
        split_of[i] = (
            "test"
            if rank < config.test_slides
            else "val"
            if rank < config.test_slides + config.val_slides
            else "train"
        )
    finder = RegionFinder(min_area_um2=_MIN_AREA_UM2)
    rows = []
    for group, slides in (("labelled", labelled), ("aux", aux)):
        for i, slide in enumerate(slides):
            split = split_of[i] if group == "labelled" else "aux"
            regions = [
                (region, _class_counts(slide, region))
                for region in find_tissue_regions(slide.path, finder)
            ]
            # slide level: one label per slide, the class it was drawn dominant in (its "diagnosis")
            slide_label = (
                slide.class_names[drawn[i]]
                if config.label_level == "slide" and group == "labelled"
                else None
            )
            for region, counts in regions:
                k, purity = _dominant(counts)
                if k < 0 or (
                    split != "aux" and config.label_level == "region" and purity < config.min_purity
                ):
                    continue
                name = slide.class_names[k]
                rows.append({
                    "slide": str(Path(slide.path).relative_to(root)), "split": split,
                    "label": "" if split == "aux" else slide_label or name,  # the auxiliary set is unlabelled (Sec. 4.2)
                    "x": region.x, "y": region.y, "width": region.width, "height": region.height,
                    "reference_label": name, "purity": round(purity, 3),
                })  # fmt: skip
    table = root / "data.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary: dict[str, dict[str, int]] = {}
    for row in rows:
        summary.setdefault(row["split"], {}).setdefault(row["reference_label"], 0)
        summary[row["split"]][row["reference_label"]] += 1
    return table, summary


@dataclass
class DemoResult:
    """What the demo produced."""

    table_markdown: str
    files: dict[str, str]
    models: dict[str, str]
    seconds: dict[str, float]
    data_summary: dict[str, Any]


def run_demo(config: DemoConfig) -> DemoResult:
    """Run the whole demo; rerunning reuses the slides and every finished model."""
    from histokd.resdist.config import DistillConfig, EvaluateConfig, SupervisedConfig
    from histokd.resdist.job import prepare_region_set, run_distill, run_supervised
    from histokd.resdist.report import run_evaluation
    from histokd.tracking import MLflowRun

    seconds: dict[str, float] = {}
    started = time.monotonic()
    if config.num_workers > 0:
        init_ray()  # a cluster named by RAY_ADDRESS, else a new local one
    table, summary = make_demo_data(config)
    seconds["data"] = time.monotonic() - started
    print(f"demo data: {table}; regions per split and class: {summary}", flush=True)
    storage = Path(config.storage_path)
    tracking_uri = config.mlflow_tracking_uri or f"sqlite:///{storage}/mlflow.db"
    parent = MLflowRun(
        tracking_uri,
        "histokd-resdist",
        "resdist-demo",
        artifact_location=str(storage / "mlartifacts"),
    )
    parent.log_params({k: v for k, v in vars(config).items()})
    parent.set_tags({"histokd.job": "resdist_demo"})
    mags = [config.teacher_magnification, *config.student_magnifications]
    common: dict[str, Any] = dict(
        data=str(table), storage_path=str(storage), magnifications=mags, min_region_area_um2=_MIN_AREA_UM2,
        accumulation_steps=config.accumulation_steps, seed=config.seed, num_workers=config.num_workers,
        cpus_per_worker=config.cpus_per_worker, mlflow_tracking_uri=tracking_uri,
    )  # fmt: skip
    if not config.paper_jitter:
        common.update(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02)
    t = time.monotonic()
    region_set = prepare_region_set(
        SupervisedConfig(**common, run_name="teacher", magnification=config.teacher_magnification)
    )
    seconds["regions"] = time.monotonic() - t
    models: dict[str, str] = {}

    def timed(key: str, fn, cfg) -> None:
        t0 = time.monotonic()
        models[key] = fn(cfg, parent_run_id=parent.run_id).model_path
        seconds[key] = time.monotonic() - t0

    timed("teacher", run_supervised, SupervisedConfig(**common, run_name="teacher", magnification=config.teacher_magnification,
                                                       epochs=config.teacher_epochs))  # fmt: skip
    for mag in config.student_magnifications:
        tag = f"{mag:g}x"
        timed(f"baseline-{tag}", run_supervised,
              SupervisedConfig(**common, run_name=f"baseline-{tag}", magnification=mag, method="baseline", epochs=config.epochs))  # fmt: skip
        timed(f"kd-{tag}", run_distill,
              DistillConfig(**common, run_name=f"kd-{tag}", teacher=models["teacher"], magnification=mag, epochs=config.epochs,
                            temperature=config.temperature, train_splits=["train", "val"], val_splits=[]))  # fmt: skip
        timed(f"kd-aux-{tag}", run_distill,
              DistillConfig(**common, run_name=f"kd-aux-{tag}", teacher=models["teacher"], magnification=mag, epochs=config.epochs,
                            temperature=config.temperature, train_splits=["aux"], val_splits=["val"],
                            finetune_epochs=config.finetune_epochs))  # fmt: skip
    t = time.monotonic()
    evaluation = run_evaluation(
        EvaluateConfig(models=list(models.values()), data=str(table), storage_path=str(storage), run_name="evaluation",
                       dataset_name="synthetic demo slides", n_resamples=config.n_resamples, mlflow_tracking_uri=tracking_uri),
        parent_run_id=parent.run_id,
    )  # fmt: skip
    seconds["evaluation"] = time.monotonic() - t
    seconds["total"] = time.monotonic() - started
    data_summary = {"regions": region_set.counts(), "table": str(table)}
    (storage / "demo_summary.json").write_text(json.dumps({"seconds": seconds, "models": models, "data": data_summary,
                                                            "files": evaluation.files}, indent=2))  # fmt: skip
    parent.log_metrics({f"seconds_{k.replace('.', '_')}": v for k, v in seconds.items()})
    for path in evaluation.files.values():
        parent.log_artifact(path)
    parent.log_artifact(storage / "demo_summary.json")
    parent.finish("FINISHED")
    return DemoResult(
        Path(evaluation.files["markdown"]).read_text(),
        evaluation.files,
        models,
        seconds,
        data_summary,
    )
