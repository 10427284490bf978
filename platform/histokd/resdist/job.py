"""Drivers of the resolution-distillation phases: region set -> TorchTrainer -> model file.

* :func:`run_supervised`: the teacher (Sec. 3.2) or a baseline (Sec. 4.5.2);
* :func:`run_distill`: knowledge distillation from a frozen teacher (Sec. 3.3), then, when the
  distillation set is not the labelled training set, fine-tuning of the last layer (Sec. 3.4).

Each phase is one Ray Train run (``TorchTrainer``, checkpoints under ``RUN/ray``); rerunning
with the same run name resumes an unfinished phase from its last checkpoint and reuses a
finished one. The result of a job is ``STORAGE/RUN/model.pt`` (weights, architecture,
magnification, input statistics, method name) and ``result.json``, and an MLflow run of the
same name with the settings, the per-epoch curves and those files.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histokd.cli import config_to_dict, save_config
from histokd.cluster import init_ray
from histokd.resdist.config import DistillConfig, ResdistConfig, SupervisedConfig
from histokd.resdist.region_set import RegionSet, build_region_set
from histokd.resdist.regions import magnification_tag
from histokd.resdist.training import MODEL_FILE

__all__ = ["TrainResult", "prepare_region_set", "run_distill", "run_supervised", "training_stats"]


@dataclass
class TrainResult:
    """Where a job left its model.

    Attributes:
        model_path: The final model file.
        run_dir: The job's folder.
        result: The last phase's ``result.json`` (history, kept epoch, sizes).
        mlflow_run_id: The job's MLflow run (None without tracking).
    """

    model_path: str
    run_dir: str
    result: dict[str, Any]
    mlflow_run_id: str | None


def prepare_region_set(config: ResdistConfig) -> RegionSet:
    """The region images of the data table at every configured magnification (built once)."""
    return build_region_set(
        config.data,
        config.regions_root,
        config.magnifications,
        config.region_finder(),
        class_names=config.class_names or None,
    )


def training_stats(
    region_set: RegionSet, splits: list[str], magnification: float
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the labelled ``splits`` at ``magnification`` (Sec. 3.2), cached."""
    from histokd.resdist.dataset import channel_stats

    tag = magnification_tag(magnification)
    cache = region_set.root / "stats" / f"{'+'.join(sorted(splits))}-{tag}.json"
    if cache.is_file():
        data = json.loads(cache.read_text())
        return data["mean"], data["std"]
    paths = [
        str(region_set.image_path(r.region_id, magnification))
        for r in region_set.select(splits, labelled=True)
    ]
    if not paths:
        raise ValueError(f"no labelled regions in splits {splits} to compute input statistics from")
    mean, std = channel_stats(paths)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"mean": mean, "std": std, "images": len(paths)}))
    return mean, std


#: Decoded region images a worker keeps in memory at most (3 bytes per pixel).
_CACHE_LIMIT_BYTES = 2 * 2**30


def _cache_images(
    items: list[dict[str, Any]], region_set: RegionSet, magnifications: list[float]
) -> bool:
    """Whether the decoded images of ``items`` at ``magnifications`` fit the cache limit."""
    from histokd.resdist.regions import TissueRegion

    by_id = {r.region_id: r for r in region_set.records}
    total = 0
    for item in items:
        r = by_id[item["region_id"]]
        box = TissueRegion(r.slide, 0, r.x, r.y, r.width, r.height, r.base_magnification)
        total += sum(3 * w * h for w, h in (box.size_at(m) for m in magnifications))
    return total <= _CACHE_LIMIT_BYTES


def _select(config: ResdistConfig, train_splits: list[str], val_splits: list[str]) -> str:
    if config.select != "auto":
        return config.select
    return "best" if val_splits and not set(val_splits) & set(train_splits) else "last"


def _tracking(config: ResdistConfig, job: str, parent_run_id: str | None):
    from histokd.tracking import MLflowRun

    run = MLflowRun(config.tracking_uri, config.mlflow_experiment, config.run_name,
                    artifact_location=str(Path(config.storage_path) / "mlartifacts"))  # fmt: skip
    run.log_params(config_to_dict(config))
    run.log_standard_tags()
    tags = {"histokd.job": job, "histokd.run_dir": config.run_dir}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run.set_tags(tags)
    return run


def _base_loop_config(config: ResdistConfig, region_set: RegionSet) -> dict[str, Any]:
    loop = config_to_dict(config)
    loop.update(num_classes=region_set.num_classes, class_names=list(region_set.class_names))
    return loop


def _fit(
    config: ResdistConfig, loop_config: dict[str, Any], phase_dir: Path, name: str
) -> tuple[str, dict[str, Any]]:
    """One phase as a Ray Train run; (model file, result) copied into ``phase_dir``."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from histokd.resdist.loop import RESULT_FILE, train_fn_per_worker

    model_path, result_path = phase_dir / MODEL_FILE, phase_dir / RESULT_FILE
    if model_path.is_file() and result_path.is_file():
        print(f"{name}: finished before, reusing {model_path}", flush=True)
        return str(model_path), json.loads(result_path.read_text())
    phase_dir.mkdir(parents=True, exist_ok=True)
    loop_config = dict(loop_config, run_name=name)
    if config.num_workers == 0:
        # Ray Train's local mode runs in this process and keeps no checkpoint files
        loop_config["local_result_dir"] = str(phase_dir / "local_run")
        scaling = ScalingConfig(num_workers=0)
    else:
        init_ray()
        use_gpu = (
            config.use_gpu
            if config.use_gpu is not None
            else ray.cluster_resources().get("GPU", 0) > 0
        )
        resources = {"CPU": config.cpus_per_worker}
        if use_gpu:
            resources["GPU"] = 1.0
        scaling = ScalingConfig(
            num_workers=config.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        )
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=RunConfig(
            name=phase_dir.name,
            storage_path=str(Path(config.run_dir) / "ray"),
            failure_config=FailureConfig(max_failures=config.max_failures),
            logging_config=LoggingConfig(
                log_level="WARNING"
            ),  # not a console line per checkpoint and report
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    outcome = trainer.fit()
    if outcome.error:
        raise RuntimeError(f"{name} failed: {outcome.error}")
    if config.num_workers == 0:
        source = Path(loop_config["local_result_dir"])
        shutil.copy2(source / MODEL_FILE, model_path)
        shutil.copy2(source / RESULT_FILE, result_path)
    else:
        if outcome.checkpoint is None:
            raise RuntimeError(f"{name} produced no checkpoint")
        with outcome.checkpoint.as_directory() as d:
            shutil.copy2(Path(d) / MODEL_FILE, model_path)
            shutil.copy2(Path(d) / RESULT_FILE, result_path)
    return str(model_path), json.loads(result_path.read_text())


def _finish(
    run, model_path: str, result_path: Path, work_dir: Path, result: dict[str, Any]
) -> None:
    final = Path(work_dir) / MODEL_FILE
    if Path(model_path) != final:
        shutil.copy2(model_path, final)
        shutil.copy2(result_path, Path(work_dir) / "result.json")
    if run is not None:
        run.log_artifact(final)
        run.log_artifact(Path(work_dir) / "result.json")
        run.log_artifact(Path(work_dir) / "config.yaml")
        run.log_metrics(
            {"train_seconds": result.get("train_seconds", 0.0), "kept_epoch": result["kept_epoch"]}
        )
        run.finish("FINISHED")


def run_supervised(
    config: SupervisedConfig, *, parent_run_id: str | None = None, tracking: bool = True
) -> TrainResult:
    """Train the teacher, or a baseline, with cross-entropy (Sec. 3.2, 4.5.1-4.5.2).

    Raises:
        ValueError: Bad data or settings.
        RuntimeError: Training failed after the allowed restarts.
    """
    work_dir = Path(config.run_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, work_dir / "config.yaml")
    region_set = prepare_region_set(config)
    tag = magnification_tag(config.magnification)
    stats = training_stats(region_set, config.train_splits, config.magnification)
    train = region_set.items(config.train_splits, [config.magnification], labelled=True)
    val = region_set.items(config.val_splits, [config.magnification], labelled=True)
    if not train:
        raise ValueError(f"{config.data}: no labelled regions in splits {config.train_splits}")
    run = _tracking(config, "resdist_supervised", parent_run_id) if tracking else None
    loop = _base_loop_config(config, region_set)
    loop.update(
        phase="supervised", views=[tag], stats={tag: stats}, data={"train": train, "val": val},
        cache_images=_cache_images(train + val, region_set, [config.magnification]),
        select=_select(config, config.train_splits, config.val_splits),
        meta={"arch": config.arch, "magnification": config.magnification, "method": config.method,
              "class_names": list(region_set.class_names), "data": config.data, "run_name": config.run_name},
        mlflow_run_id=run.run_id if run else None, tracking_uri=config.tracking_uri,
    )  # fmt: skip
    try:
        model_path, result = _fit(config, loop, work_dir / "supervised", config.run_name)
    except Exception:
        if run is not None:
            run.finish("FAILED")
        raise
    _finish(run, model_path, work_dir / "supervised" / "result.json", work_dir, result)
    return TrainResult(
        str(work_dir / MODEL_FILE), str(work_dir), result, run.run_id if run else None
    )


def run_distill(
    config: DistillConfig, *, parent_run_id: str | None = None, tracking: bool = True
) -> TrainResult:
    """Distil a low-magnification student from the teacher, then fine-tune it if Sec. 3.4 says so.

    Raises:
        ValueError: Bad data or settings (a student magnification not below the teacher's).
        RuntimeError: Training failed after the allowed restarts.
    """
    import torch

    work_dir = Path(config.run_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, work_dir / "config.yaml")
    teacher_meta = torch.load(config.teacher, map_location="cpu", weights_only=True)["meta"]
    teacher_mag = float(teacher_meta["magnification"])
    if not config.magnification < teacher_mag:
        raise ValueError(
            f"magnification={config.magnification:g}: the student's must be below the teacher's {teacher_mag:g}x ({config.teacher})"
        )
    config.check_magnification("the teacher's magnification", teacher_mag)
    region_set = prepare_region_set(config)
    if list(teacher_meta.get("class_names", region_set.class_names)) != list(
        region_set.class_names
    ):
        raise ValueError(
            f"teacher {config.teacher} has classes {teacher_meta.get('class_names')}; the data has {list(region_set.class_names)}"
        )
    teacher_tag, student_tag = (
        magnification_tag(teacher_mag),
        magnification_tag(config.magnification),
    )
    # the student's inputs are standardised like the labelled training set at its magnification (Sec. 3.2, 4.5)
    student_stats = training_stats(region_set, config.finetune_splits, config.magnification)
    views = [teacher_tag, student_tag]
    pair = [teacher_mag, config.magnification]
    train = region_set.items(config.train_splits, pair)  # labels ignored (Sec. 3.3)
    val = region_set.items(config.val_splits, pair)
    if not train:
        raise ValueError(f"{config.data}: no regions in splits {config.train_splits} to distil on")
    run = _tracking(config, "resdist_distill", parent_run_id) if tracking else None
    method = config.method_name
    meta = {"arch": config.arch, "magnification": config.magnification, "method": method, "teacher_magnification": teacher_mag,
            "class_names": list(region_set.class_names), "data": config.data, "run_name": config.run_name,
            "temperature": config.temperature}  # fmt: skip
    loop = _base_loop_config(config, region_set)
    loop.update(
        phase="distill", views=views, stats={teacher_tag: teacher_meta["stats"], student_tag: student_stats},
        data={"train": train, "val": val}, select=_select(config, config.train_splits, config.val_splits), meta=meta,
        cache_images=_cache_images(train + val, region_set, pair),
        mlflow_run_id=run.run_id if run else None, tracking_uri=config.tracking_uri,
    )  # fmt: skip
    try:
        model_path, result = _fit(config, loop, work_dir / "distill", config.run_name)
        result_path = work_dir / "distill" / "result.json"
        if config.do_finetune:
            ft_train = region_set.items(
                config.finetune_splits, [config.magnification], labelled=True
            )
            ft_val = region_set.items(
                config.finetune_val_splits, [config.magnification], labelled=True
            )
            if not ft_train:
                raise ValueError(
                    f"{config.data}: no labelled regions in splits {config.finetune_splits} to fine-tune on"
                )
            ft = dict(loop)
            ft.update(
                phase="finetune", init=model_path, views=[student_tag], stats={student_tag: student_stats},
                data={"train": ft_train, "val": ft_val}, epochs=config.finetune_epochs, lr=config.finetune_lr,
                cache_images=_cache_images(ft_train + ft_val, region_set, [config.magnification]),
                select=_select(config, config.finetune_splits, config.finetune_val_splits), meta=dict(meta, finetuned=True),
                metric_prefix="finetune_",
            )  # fmt: skip
            model_path, result = _fit(
                config, ft, work_dir / "finetune", f"{config.run_name}-finetune"
            )
            result_path = work_dir / "finetune" / "result.json"
    except Exception:
        if run is not None:
            run.finish("FAILED")
        raise
    _finish(run, model_path, result_path, work_dir, result)
    return TrainResult(
        str(work_dir / MODEL_FILE), str(work_dir), result, run.run_id if run else None
    )
