"""The offline demo of resolution-based distillation on synthetic slides (minutes on 2 CPUs).

In the paper's order (DiPalma Sec. 3.1, 4.5):

1. Synthetic 20x H&E slides (``histokd.demos.synthetic``) whose tissue falls into pieces, and their
   tissue regions found as tissueloc would. A region's label is the class (stroma, tumor,
   lymphocyte) covering most of it in the slides' ground truth; labelled regions whose dominant
   class covers less than ``min_purity`` of the tissue are left out. With ``--label-level
   slide`` each labelled slide is drawn with one dominant class, the label of all its regions
   (the paper's slide-level labels, noisy where a region is of another class). Slides are split
   into training, validation and test slides; other slides are the unlabelled auxiliary set.
2. The teacher at 10x (cross-entropy, Adam 1e-3).
3. At each student magnification: a baseline from scratch, KD on the labelled regions (labels
   ignored), and KD (AD) on the auxiliary set followed by last-layer fine-tuning.
4. Every model evaluated on the test regions: the Tables 5-8 and Fig. 3 outputs, also to MLflow.

Tiny slides, few epochs, accumulation over 2 images and a mild colour jitter, so it runs in
minutes: the numbers show the pipeline works; they are not the paper's experiment.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histokd.resdist.config import DemoConfig

__all__ = ["DemoConfig", "DemoResult", "make_demo_data", "run_demo"]

#: Slides whose tissue falls into pieces (lumens), so that a slide has several regions, and whose
#: three class areas are large (about a third of a slide each), so that most pieces are pure.
_SLIDE_FIELDS = {"lumen_fraction": 0.45, "tissue_fraction": 0.6, "region_size_um": 2000.0}
_DOMINANT_SHARE = 0.7  # slide-level labels: the share of a slide's dominant class
_MIN_AREA_UM2 = 5_000.0  # the demo slides are 1 mm wide: smaller regions than on biopsies count


def make_demo_data(config: DemoConfig) -> tuple[Path, dict[str, Any]]:
    """Write the synthetic slides and the data table (``data.csv``) of the demo.

    Returns:
        The table's path and the regions per split and class (by their dominant class).
    """
    import pandas as pd

    from histokd.demos.synthetic import DEFAULT_CLASSES, make_demo_slides
    from histokd.resdist.regions import RegionFinder, find_tissue_regions

    root = Path(config.demo_dir)
    common = dict(width=config.slide_size, height=config.slide_size, **_SLIDE_FIELDS)
    n, k_classes = config.labelled_slides, len(DEFAULT_CLASSES)
    if config.label_level == "region":
        labelled = make_demo_slides(root / "labelled", n=n, seed=config.seed, **common)
        drawn = [None] * n
    else:  # one dominant class per slide, in turn: its label says something about its regions
        labelled, drawn = [], []
        for k in range(k_classes):
            weights = [_DOMINANT_SHARE if j == k else (1 - _DOMINANT_SHARE) / (k_classes - 1) for j in range(k_classes)]  # fmt: skip
            count = len(range(k, n, k_classes))
            labelled += make_demo_slides(root / f"labelled-dominant-{k + 1}", n=count,
                                         seed=config.seed + 100 * (k + 1), class_weights=tuple(weights), **common)  # fmt: skip
            drawn += [k] * count
    aux = make_demo_slides(root / "aux", n=config.aux_slides, seed=config.seed + 1000, **common)
    rank = np.argsort(np.random.default_rng(config.seed).permutation(len(labelled)))
    held_out = config.test_slides + config.val_slides
    splits = ["test" if r < config.test_slides else "val" if r < held_out else "train" for r in rank]  # fmt: skip
    finder = RegionFinder(min_area_um2=_MIN_AREA_UM2)
    rows = []
    slides = [*zip(labelled, splits, drawn, strict=True), *((s, "aux", None) for s in aux)]
    for slide, split, dominant in slides:
        for region in find_tissue_regions(slide.path, finder):
            size = (max(1, region.width // 8), max(1, region.height // 8))  # ground truth at 1/8
            truth = slide.read_truth(region.x, region.y, region.width, region.height, kind="regions", size=size)  # fmt: skip
            counts = np.bincount(truth[truth > 0], minlength=len(slide.class_names) + 1)[1:]
            if not counts.sum():
                continue
            purity, name = counts.max() / counts.sum(), slide.class_names[int(counts.argmax())]
            if split != "aux" and dominant is None and purity < config.min_purity:
                continue
            label = "" if split == "aux" else name if dominant is None else slide.class_names[dominant]  # fmt: skip
            rows.append({"slide": str(Path(slide.path).relative_to(root)), "split": split, "label": label,
                         "x": region.x, "y": region.y, "width": region.width, "height": region.height,
                         "reference_label": name, "purity": round(float(purity), 3)})  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "data.csv", index=False)
    summary: dict[str, dict[str, int]] = {}
    for row in rows:
        counts = summary.setdefault(row["split"], {})
        counts[row["reference_label"]] = counts.get(row["reference_label"], 0) + 1
    return root / "data.csv", summary


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
    from histokd.cluster import init_ray
    from histokd.resdist.config import DistillConfig, EvaluateConfig, SupervisedConfig
    from histokd.resdist.evaluation import run_evaluation
    from histokd.resdist.job import prepare_region_set, run_distill, run_supervised
    from histokd.run import open_mlflow_run

    seconds: dict[str, float] = {}
    started = time.monotonic()
    if config.num_workers > 0:
        init_ray(config.ray_address)
    table, summary = make_demo_data(config)
    seconds["data"] = time.monotonic() - started
    print(f"demo data: {table}; regions per split and class: {summary}", flush=True)
    parent = open_mlflow_run(config, "resdist_demo")
    runs = {k: getattr(config, k) for k in ("storage_path", "seed", "ray_address", "mlflow_experiment", "num_workers",
                                            "cpus_per_worker", "accumulation_steps")}  # fmt: skip
    common = dict(runs, data=str(table), magnifications=[config.teacher_magnification, *config.student_magnifications],
                  min_region_area_um2=_MIN_AREA_UM2, mlflow_tracking_uri=config.tracking_uri)  # fmt: skip
    if not config.paper_jitter:  # hue shifts up to 72 degrees hide the synthetic classes' colours
        common.update(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02)
    teacher = dict(common, run_name="teacher", magnification=config.teacher_magnification, epochs=config.teacher_epochs)  # fmt: skip
    t = time.monotonic()
    region_set = prepare_region_set(SupervisedConfig(**teacher))
    seconds["regions"] = time.monotonic() - t
    jobs = [("teacher", run_supervised, teacher)]
    kd = dict(common, teacher=str(Path(config.storage_path, "teacher", "model.pt")), epochs=config.epochs,
              temperature=config.temperature)  # fmt: skip
    for mag in config.student_magnifications:
        tag = f"{mag:g}x"
        jobs += [
            (f"baseline-{tag}", run_supervised, dict(common, run_name=f"baseline-{tag}", magnification=mag,
                                                     method="baseline", epochs=config.epochs)),
            (f"kd-{tag}", run_distill, dict(kd, run_name=f"kd-{tag}", magnification=mag, train_splits=["train", "val"], val_splits=[])),
            (f"kd-aux-{tag}", run_distill, dict(kd, run_name=f"kd-aux-{tag}", magnification=mag, train_splits=["aux"],
                                                val_splits=["val"], finetune_epochs=config.finetune_epochs)),
        ]  # fmt: skip
    models: dict[str, str] = {}
    for key, run, settings in jobs:  # each config built once the teacher's file is there
        t = time.monotonic()
        job_config = (SupervisedConfig if run is run_supervised else DistillConfig)(**settings)
        models[key] = run(job_config, parent_run_id=parent.run_id).model_path
        seconds[key] = time.monotonic() - t
    t = time.monotonic()
    evaluation = run_evaluation(
        EvaluateConfig(**{k: common[k] for k in ("storage_path", "seed", "mlflow_experiment", "mlflow_tracking_uri")},
                       model=list(models.values()), data=str(table), dataset_name="synthetic demo slides",
                       bootstrap_resamples=config.bootstrap_resamples),
        parent_run_id=parent.run_id,
    )  # fmt: skip
    seconds["evaluation"] = time.monotonic() - t
    seconds["total"] = time.monotonic() - started
    data_summary = {"regions": region_set.counts(), "table": str(table)}
    summary_file = Path(config.storage_path) / "demo_summary.json"
    summary_file.write_text(json.dumps({"seconds": seconds, "models": models, "data": data_summary,
                                        "files": evaluation.files}, indent=2))  # fmt: skip
    parent.log_metrics({f"seconds_{k.replace('.', '_')}": v for k, v in seconds.items()})
    for path in [*evaluation.files.values(), summary_file]:
        parent.log_artifact(path)
    parent.finish("FINISHED")
    markdown = Path(evaluation.files["markdown"]).read_text()
    return DemoResult(markdown, evaluation.files, models, seconds, data_summary)
