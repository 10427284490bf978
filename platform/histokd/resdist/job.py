"""Drivers of the resolution-distillation phases: region set -> TorchTrainer -> model file.

Each phase (supervised, distill, finetune) is one Ray Train run under ``RUN/ray``: rerunning a
run name resumes an unfinished phase and reuses a finished one. A job leaves ``RUN/model.pt`` (a
task-model file), ``result.json`` and an MLflow run of its name.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histokd.cli import config_to_dict, save_config
from histokd.resdist.config import DistillConfig, ResdistConfig, SupervisedConfig
from histokd.resdist.loop import MODEL_FILE, RESULT_FILE
from histokd.resdist.region_set import RegionSet, build_region_set, check_region_set, median_size
from histokd.resdist.regions import magnification_tag
from histokd.run import holds_run_lock

__all__ = ["TrainResult", "prepare_region_set", "run_distill", "run_supervised", "training_stats"]

#: Decoded region images a worker keeps in memory at most (3 bytes per pixel).
_CACHE_LIMIT_BYTES = 2 * 2**30


@dataclass
class TrainResult:
    """Where a job left its model, and the last phase's result (history, kept epoch, sizes)."""

    model_path: str
    run_dir: str
    result: dict[str, Any]
    mlflow_run_id: str


def prepare_region_set(config: ResdistConfig) -> RegionSet:
    """The region images of the data table at every configured magnification (built once),
    without the regions whose images cannot be read (``RUN/bad_images.csv``)."""
    region_set = build_region_set(config.data, config.regions_root, config.magnifications,
                                  config.region_finder(), class_names=config.class_names or None)  # fmt: skip
    return check_region_set(region_set, config.max_bad_fraction, config.run_dir)


def training_stats(region_set: RegionSet, splits: list[str], magnification: float) -> tuple[list, list]:  # fmt: skip
    """Per-channel mean and std of the labelled ``splits`` at ``magnification`` (Sec. 3.2), cached."""
    from histokd.resdist.dataset import channel_stats

    cache = region_set.root / "stats" / f"{'+'.join(sorted(splits))}-{magnification_tag(magnification)}.json"  # fmt: skip
    if cache.is_file():
        data = json.loads(cache.read_text())
        return data["mean"], data["std"]
    records = region_set.select(splits, labelled=True)
    if not records:
        raise ValueError(f"no labelled regions in splits {splits} to compute input statistics from")
    mean, std = channel_stats([str(region_set.image_path(r.region_id, magnification)) for r in records])  # fmt: skip
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"mean": mean, "std": std, "images": len(records)}))
    return mean, std


def _phase(region_set: RegionSet, phase: str, mags: list[float], stats: list, splits: list[str],
           val_splits: list[str], select: str, labelled: bool = True, **extra: Any) -> dict[str, Any]:  # fmt: skip
    """The worker loop's settings of one phase, on the regions of ``splits`` at ``mags``."""
    train = region_set.items(splits, mags, labelled)
    if not train:
        raise ValueError(f"{phase}: no {'labelled ' if labelled else ''}regions in splits {splits}")
    val = region_set.items(val_splits, mags, labelled)
    views = [magnification_tag(m) for m in mags]
    if select == "auto":  # the best epoch only where validation is held out of training
        select = "best" if val_splits and not set(val_splits) & set(splits) else "last"
    by_id = {r.region_id: r for r in region_set.records}
    pixels = sum(w * h for i in train + val for m in mags for w, h in [by_id[i["region_id"]].size_at(m)])  # fmt: skip
    return dict(phase=phase, views=views, stats=dict(zip(views, stats, strict=True)), select=select,
                data={"train": train, "val": val}, cache_images=3 * pixels <= _CACHE_LIMIT_BYTES, **extra)  # fmt: skip


def _meta(config: ResdistConfig, region_set: RegionSet, stats, splits: list[str], **extra) -> dict:
    """The model file's config: what inference needs, and what the tables name the model by."""
    mag = config.magnification
    return dict(
        backbone=config.backbone, num_classes=region_set.num_classes, magnification=mag,
        class_names=list(region_set.class_names), mean=list(stats[0]), std=list(stats[1]),
        # slides are tiled at the median training region's longer side
        input_size=max(median_size(region_set.select(splits, labelled=True), mag)),
        data=config.data, run_name=config.run_name, **extra,
    )  # fmt: skip


def _fit(config: ResdistConfig, loop: dict[str, Any], phase_dir: Path) -> dict[str, Any]:
    """One phase as a Ray Train run (reused when finished); its result, files in ``phase_dir``."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from histokd.cluster import init_ray
    from histokd.console import train_log_level
    from histokd.resdist.loop import train_fn_per_worker

    if (phase_dir / MODEL_FILE).is_file() and (phase_dir / RESULT_FILE).is_file():
        print(f"{loop['run_name']}: finished before, reusing {phase_dir / MODEL_FILE}", flush=True)
        return json.loads((phase_dir / RESULT_FILE).read_text())
    phase_dir.mkdir(parents=True, exist_ok=True)
    if config.num_workers == 0:  # Ray Train's local mode keeps no checkpoints: it writes here
        loop["local_result_dir"] = str(phase_dir)
        scaling = ScalingConfig(num_workers=0)
    else:
        init_ray(config.ray_address)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        use_gpu = config.use_gpu if config.use_gpu is not None else gpus > 0
        resources = {"CPU": config.cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}
        workers = config.num_workers or (gpus if use_gpu else 1)  # auto: one per GPU, else 1
        scaling = ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources)  # fmt: skip
    run_config = RunConfig(
        name=phase_dir.name, storage_path=str(Path(config.run_dir) / "ray"),
        failure_config=FailureConfig(max_failures=config.max_failures),
        logging_config=LoggingConfig(log_level=train_log_level()),
        checkpoint_config=CheckpointConfig(num_to_keep=1),
    )  # fmt: skip
    outcome = TorchTrainer(train_fn_per_worker, train_loop_config=loop, scaling_config=scaling,
                           run_config=run_config).fit()  # fmt: skip
    if outcome.error:
        raise RuntimeError(f"{loop['run_name']} failed: {outcome.error}")
    if config.num_workers != 0:
        with outcome.checkpoint.as_directory() as folder:
            for name in (MODEL_FILE, RESULT_FILE):
                shutil.copy2(Path(folder) / name, phase_dir / name)
    return json.loads((phase_dir / RESULT_FILE).read_text())


def _run(config: ResdistConfig, job: str, phases: list[dict], parent_run_id: str | None) -> TrainResult:  # fmt: skip
    """Run the phases in turn (each from the last one's model), then log the job to MLflow."""
    from histokd.run import open_mlflow_run

    work_dir = Path(config.run_dir)
    save_config(config, work_dir / "config.yaml")
    run = open_mlflow_run(config, job, parent_run_id=parent_run_id)
    base = dict(config_to_dict(config), mlflow_run_id=run.run_id, tracking_uri=config.tracking_uri)
    try:
        model_path = None
        for i, phase in enumerate(phases):
            name = config.run_name + ("" if i == 0 else f"-{phase['phase']}")
            result = _fit(config, dict(base, run_name=name, init=model_path, **phase), work_dir / phase["phase"])  # fmt: skip
            model_path = work_dir / phase["phase"] / MODEL_FILE
    except Exception:
        run.finish("FAILED")
        raise
    for name in (MODEL_FILE, RESULT_FILE):
        shutil.copy2(model_path.parent / name, work_dir / name)
    for name in (MODEL_FILE, RESULT_FILE, "config.yaml"):
        run.log_artifact(work_dir / name)
    run.log_metrics({"train_seconds": result["train_seconds"], "kept_epoch": result["kept_epoch"]})
    run.finish("FINISHED")
    return TrainResult(str(work_dir / MODEL_FILE), str(work_dir), result, run.run_id)


@holds_run_lock
def run_supervised(config: SupervisedConfig, *, parent_run_id: str | None = None) -> TrainResult:
    """Train the teacher, or a baseline, with cross-entropy (Sec. 3.2, 4.5.1-4.5.2); a ValueError
    for bad data or settings, a RuntimeError where training failed after the allowed restarts."""
    region_set = prepare_region_set(config)
    stats = training_stats(region_set, config.train_splits, config.magnification)
    meta = _meta(config, region_set, stats, config.train_splits, method=config.method)
    phase = _phase(region_set, "supervised", [config.magnification], [stats], config.train_splits,
                   config.val_splits, config.select, meta=meta)  # fmt: skip
    return _run(config, "resdist_supervised", [phase], parent_run_id)


@holds_run_lock
def run_distill(config: DistillConfig, *, parent_run_id: str | None = None) -> TrainResult:
    """Distil a low-magnification student from the teacher, then fine-tune it if Sec. 3.4 says
    so; errors as :func:`run_supervised`'s (a student magnification not below the teacher's)."""
    from histokd.inference.model_file import load_checkpoint

    teacher = load_checkpoint(config.teacher)["config"]
    teacher_mag = float(teacher["magnification"])
    if not config.magnification < teacher_mag:
        raise ValueError(f"magnification={config.magnification:g}: the student's must be below the teacher's "
                         f"{teacher_mag:g}x ({config.teacher})")  # fmt: skip
    config.check_magnification("the teacher's magnification", teacher_mag)
    region_set = prepare_region_set(config)
    if teacher["class_names"] != list(region_set.class_names):
        raise ValueError(f"teacher {config.teacher} has classes {teacher['class_names']}; "
                         f"the data has {list(region_set.class_names)}")  # fmt: skip
    # the student's inputs are standardised like the labelled training set at its magnification
    stats = training_stats(region_set, config.finetune_splits, config.magnification)
    meta = _meta(config, region_set, stats, config.finetune_splits, method=config.method_name,
                 teacher=config.teacher, teacher_magnification=teacher_mag, temperature=config.temperature)  # fmt: skip
    teacher_stats = (teacher["mean"], teacher["std"])
    phases = [_phase(region_set, "distill", [teacher_mag, config.magnification], [teacher_stats, stats],
                     config.train_splits, config.val_splits, config.select, labelled=False, meta=meta)]  # fmt: skip
    if config.do_finetune:
        phases.append(_phase(region_set, "finetune", [config.magnification], [stats], config.finetune_splits,
                             config.finetune_val_splits, config.select, meta=dict(meta, finetuned=True),
                             epochs=config.finetune_epochs, lr=config.finetune_lr, metric_prefix="finetune_"))  # fmt: skip
    return _run(config, "resdist_distill", phases, parent_run_id)
