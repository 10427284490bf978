"""The fine-tuning driver: dataset -> splits -> one Ray Train run per split -> summary + MLflow.

RCKD Algorithm 2 on Ray. Every split is its own ``TorchTrainer`` run (named
``RUN_NAME-split{i}``), and the splits are fitted from a thread pool so that as many run at
once as the cluster holds. A split that finished before (its ``result.json`` is in the run
folder) is not trained again, and one that was interrupted resumes from its last checkpoint,
so rerunning a job with the same run name completes it. The per-split results are summarised
(mean, standard deviation, bootstrap intervals; `histokd.finetune.evaluation`) and written as
JSON, CSV and Markdown into the run folder and into MLflow (one parent run per job, a child
run per split).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histokd.cli import config_to_dict, save_config
from histokd.cluster import init_ray
from histokd.finetune.config import FinetuneConfig
from histokd.finetune.datasets import TaskDataset, check_task_dataset, load_task_dataset
from histokd.finetune.splits import Split, make_splits, subsample_train
from histokd.resume import (
    DamagedFile,
    check_folder,
    load_verified,
    write_sidecar,
    write_text_atomic,
)
from histokd.run import check_storage_path, holds_run_lock, open_mlflow_run

__all__ = ["FinetuneResult", "log_task_model", "prepare_dataset", "run_finetune", "split_slots"]

log = logging.getLogger(__name__)

_CACHE_LIMIT_BYTES = 2 * 2**30


@dataclass
class FinetuneResult:
    """What a fine-tuning job produced.

    Attributes:
        run_dir: Local folder with config.yaml, splits.json, split_*/result.json, summary.*.
        summary: See `histokd.finetune.evaluation.summarize_splits`, plus the run's settings.
        split_results: Each split's ``result.json``.
        mlflow_run_id: The job's MLflow (parent) run.
        tracking_uri: MLflow tracking URI.
        files: Name -> path of the written tables.
    """

    run_dir: str
    summary: dict[str, Any]
    split_results: list[dict[str, Any]]
    mlflow_run_id: str | None
    tracking_uri: str | None
    files: dict[str, str] = field(default_factory=dict)

    @property
    def primary(self) -> dict[str, float]:
        """Mean, std and interval of the task's metric (accuracy or mIoU)."""
        return self.summary["metrics"][self.summary["primary_metric"]]


def prepare_dataset(config: FinetuneConfig) -> TaskDataset:
    """The configured dataset, or the demo task (written on first use) when ``data`` is empty."""
    if config.data:
        return load_task_dataset(config.data, config.task, config.group_by)
    from histokd.demos.tasks import make_demo_tasks

    tasks = make_demo_tasks(config.demo_dir)
    folder = tasks.classification_dir if config.task == "classification" else tasks.segmentation_dir
    return load_task_dataset(folder, config.task, config.group_by)


def resolve_scale(config: FinetuneConfig, dataset: TaskDataset) -> tuple[float | None, int | None]:
    """The images' magnification and side there, recorded in the model files for inference.

    The config wins, then the dataset's ``dataset.json``; the side falls back to the images'
    common side when they are all one square size. The magnification may stay unknown
    (None): inference then asks for it.
    """
    magnification = (
        config.magnification if config.magnification is not None else dataset.magnification
    )
    patch_size = config.patch_size if config.patch_size is not None else dataset.patch_size
    if patch_size is None:
        patch_size = dataset.common_side()
    return magnification, patch_size


def image_sizes(config: FinetuneConfig, dataset: TaskDataset) -> str:
    """The images' side for the start line, or the range of their sizes and how they are made
    square: ``of mixed sizes: 480x640 to 1000x1000 px (resize: squash)``."""
    if config.patch_size:
        return f"{config.patch_size} px"
    (w0, h0), (w1, h1) = dataset.size_range()
    return f"of mixed sizes: {w0}x{h0} to {w1}x{h1} px (resize: {config.resize})"


def split_slots(config: FinetuneConfig, use_gpu: bool) -> int:
    """How many splits the cluster can train at once."""
    import ray

    if config.num_workers == 0:  # local mode runs in the driver process, one at a time
        return 1
    total = ray.cluster_resources()
    per_split_cpu = config.num_workers * config.cpus_per_worker
    slots = int(total.get("CPU", 0) // per_split_cpu) if per_split_cpu else 1
    if use_gpu:
        slots = min(
            slots, int(total.get("GPU", 0) // (config.num_workers * config.gpus_per_worker))
        )
    return max(1, slots)


def _cache_images(config: FinetuneConfig, n: int) -> bool:
    if config.cache_images is not None:
        return config.cache_images
    return n * config.input_size**2 * 3 <= _CACHE_LIMIT_BYTES


@holds_run_lock
def run_finetune(
    config: FinetuneConfig,
    *,
    dataset: TaskDataset | None = None,
    on_split_done: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None,
    parallel_splits: int | None = None,
    parent_run_id: str | None = None,
    tracking: bool = True,
) -> FinetuneResult:
    """Fine-tune and evaluate on every split (RCKD Algorithm 2), or finish an interrupted job.

    Args:
        config: The job's settings.
        dataset: The dataset (default: `prepare_dataset`).
        on_split_done: Called from the driver after each split with its result and all results
            so far (the Tune search reports from here).
        parallel_splits: Splits trained at once (default: ``config.max_parallel_splits`` or
            `split_slots`).
        parent_run_id: MLflow run to nest this job's run under (the Tune search's).
        tracking: Log to MLflow.

    Raises:
        ValueError: A bad dataset or setting.
        RuntimeError: A split failed after its allowed restarts.
    """
    import ray

    from histokd.finetune.evaluation import summarize_splits

    check_storage_path(config.storage_path)
    dataset = dataset if dataset is not None else prepare_dataset(config)
    if dataset.task != config.task:
        raise ValueError(
            f"task={config.task!r} but the dataset {dataset.source} is a {dataset.task} dataset"
        )
    dataset = check_task_dataset(dataset, config.max_bad_fraction, config.work_dir)
    splits = make_splits(
        len(dataset), labels=dataset.labels if config.task == "classification" else None, num_splits=config.num_splits,
        ratios=config.split_ratios, seed=config.split_seed, fixed=dataset.fixed, groups=dataset.groups,
    )  # fmt: skip
    for split in splits:
        if len(split.val) == 0 or len(split.test) == 0:
            raise ValueError(
                f"split {split.index} has {len(split.val)} validation and {len(split.test)} test samples "
                f"(dataset {dataset.source}, {len(dataset)} samples, split_ratios={config.split_ratios}); need at least one of each"
            )
    magnification, patch_size = resolve_scale(config, dataset)
    config = dataclasses.replace(config, magnification=magnification, patch_size=patch_size)
    if magnification is None:
        log.warning(
            "%s: the magnification of the images is unknown (no --magnification, no dataset.json): the model "
            "files will not record it, and whole-slide inference will need --magnification", dataset.source,
        )  # fmt: skip
    from histokd.stain import stain_normalization

    stain = stain_normalization(config.stain_norm, config.stain_reference)  # a bad tile fails here
    work_dir = config.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, work_dir / "config.yaml")
    (work_dir / "splits.json").write_text(json.dumps(
        {"source": dataset.source, "class_names": list(dataset.class_names), "images": dataset.images,
         "splits": [s.as_dict() for s in splits]}, indent=1,
    ))  # fmt: skip

    init_ray(config.ray_address)
    use_gpu = (
        config.use_gpu if config.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    )
    parallel = parallel_splits or config.max_parallel_splits or split_slots(config, use_gpu)

    run = None
    if tracking:
        params = {**config_to_dict(config), "num_samples": len(dataset),
                  "class_names": ",".join(dataset.class_names)}  # fmt: skip
        run = open_mlflow_run(config, "finetune", parent_run_id=parent_run_id, params=params)
        run.set_tags({"histokd.init": config.init_name})
    cache = _cache_images(config, len(dataset))
    _write_augment_examples(config, dataset, splits[0], work_dir, stain, run)
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    print(
        f"fine-tuning {config.backbone} ({config.init_name}) on {dataset.source}: {len(dataset)} images, "
        f"{dataset.num_classes} classes, {len(splits)} splits, {parallel} at a time; images "
        f"{image_sizes(config, dataset)} at {f'{config.magnification:g}x' if config.magnification else 'unknown magnification'}",
        flush=True,
    )
    arm_results: dict[tuple[str, float], list[dict[str, Any]]] = {
        (p, f): [] for p in config.protocols for f in config.label_fractions
    }
    tuned = config.label_fractions if "finetune" in config.protocols else []
    jobs = [(split, f) for f in sorted(tuned, reverse=True) for split in splits]
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(jobs)))) as pool:
        futures = [
            pool.submit(_fit_split, config, dataset, split, work_dir, use_gpu, cache, run, stain, f)
            for split, f in jobs
        ]
        try:
            for future in as_completed(futures):
                result = future.result()
                fraction = result.get("label_fraction", 1.0)
                with lock:
                    arm_results[("finetune", fraction)].append(result)
                print(
                    f"split {result['split']}{_fraction_tag(fraction)} done: test {_primary_name(config)} "
                    f"{result['test'][_primary_name(config)]:.4f} (best epoch {result['best_epoch']}, "
                    f"stopped at {result['stopped_epoch']})",
                    flush=True,
                )
                if on_split_done is not None and fraction == 1.0:
                    with lock:
                        results.append(result)
                        done = sorted(results, key=lambda r: r["split"])
                    on_split_done(result, done)
            if {"linear", "knn"} & set(config.protocols):
                from histokd.finetune.probe import run_probes

                probed = run_probes(config, dataset, splits, work_dir, use_gpu, stain)
                arm_results.update(probed)
        except BaseException as exc:
            for future in futures:
                future.cancel()
            if not isinstance(exc, Exception):  # Ctrl-C, SIGTERM: cli.run_job ends MLflow's runs
                import ray

                ray.shutdown()  # ends the running splits' trainers, whose threads the pool awaits
            elif run is not None:
                run.finish("FAILED")
            raise
    for arm in arm_results.values():
        arm.sort(key=lambda r: r["split"])
    # the job's headline: full fine-tuning where it ran (today's shape), else the first
    # protocol at its largest label fraction
    primary_arm = ("finetune", 1.0)
    if primary_arm not in arm_results:
        primary_arm = (config.protocols[0], max(config.label_fractions))
    results = arm_results[primary_arm]

    def summarize(arm: list[dict[str, Any]]) -> dict[str, Any]:
        return summarize_splits(arm, n_resamples=config.bootstrap_resamples,
                                confidence=config.confidence, seed=config.seed)  # fmt: skip

    summary = summarize(results)
    summary["arms"] = [
        {"protocol": p, "label_fraction": f,
         "train_samples": [int(r.get("sizes", {}).get("train", 0)) for r in arm],
         **(summary if (p, f) == primary_arm else summarize(arm))}
        for (p, f), arm in arm_results.items()
    ]  # fmt: skip
    summary["primary_arm"] = {"protocol": primary_arm[0], "label_fraction": primary_arm[1]}
    for arm in summary["arms"]:
        print(arm_line(arm), flush=True)
    summary.update(
        backbone=config.backbone, init=config.init, init_label=config.init_name, input_size=config.input_size,
        lr=config.lr, positional_encoding=config.positional_encoding, dataset=dataset.source,
        class_names=list(dataset.class_names), wall_seconds=time.monotonic() - started,
    )  # fmt: skip
    if summary.get("single_class_predictions"):
        log.warning(
            "single-class predictions: split(s) %s predict one class for every test image "
            "(flagged in summary.json and summary.md)",
            ", ".join(str(s) for s in summary["single_class_splits"]),
        )
    from histokd.finetune.report import write_split_tables

    files = write_split_tables(summary, work_dir)
    from histokd.finetune.report import write_test_figures

    files.update(write_test_figures(summary, results, work_dir))
    if run is not None:
        _log_summary(run, summary, files)
        log_task_model(config, run, work_dir)
        run.finish("FINISHED")
    return FinetuneResult(
        run_dir=str(work_dir), summary=summary, split_results=results,
        mlflow_run_id=run.run_id if run else None, tracking_uri=config.tracking_uri if run else None, files=files,
    )  # fmt: skip


def _fraction_tag(fraction: float) -> str:
    """`` at 10 % labels`` for a label fraction below 1, else nothing."""
    return "" if fraction == 1.0 else f" at {100 * fraction:g} % labels"


def arm_line(arm: dict[str, Any]) -> str:
    """One console line of a (protocol, label fraction) summary: ``linear @ 10 %: accuracy
    0.912 [0.880, 0.940], balanced 0.900, AUROC 0.970``."""
    metrics = arm["metrics"]

    def value(name: str) -> str:
        return f"{metrics[name]['mean']:.3f}" if name in metrics else "n/a"

    head = f"{arm['protocol']} @ {100 * arm['label_fraction']:g} %: "
    if "accuracy" not in metrics or arm["task"] != "classification":
        return head + f"{arm['primary_metric']} {value(arm['primary_metric'])}"
    acc = metrics["accuracy"]
    line = (f"{head}accuracy {acc['mean']:.3f} [{acc['ci_low']:.3f}, {acc['ci_high']:.3f}], "
            f"balanced {value('balanced_accuracy')}, AUROC {value('auroc')}")  # fmt: skip
    return line + (" (single-class predictions)" if arm.get("single_class_predictions") else "")


def _primary_name(config: FinetuneConfig) -> str:
    return "accuracy" if config.task == "classification" else "miou"


def _fit_split(
    config: FinetuneConfig,
    dataset: TaskDataset,
    split: Split,
    work_dir: Path,
    use_gpu: bool,
    cache: bool,
    parent,
    stain: dict[str, Any] | None = None,
    fraction: float = 1.0,
) -> dict[str, Any]:
    """Train, early-stop and test one split as its own Ray Train run (or reuse its result).

    At a label ``fraction`` below 1 it trains on the split's subsampled training rows
    (`subsample_train`), early-stopped on the whole validation part, in its own folder
    ``split_{i}/finetune@{fraction}``; at 1 the split's folder is the one of earlier releases.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from histokd.console import train_log_level
    from histokd.finetune.loop import BEST_MODEL_FILE, RESULT_FILE, train_fn_per_worker

    split_dir = work_dir / f"split_{split.index}"
    name = f"{config.run_name}-split{split.index}"
    train = split.train
    if fraction != 1.0:
        split_dir, name = split_dir / f"finetune@{fraction:g}", f"{name}-labels{fraction:g}"
        train = subsample_train(split, dataset.labels, fraction, config.split_seed)
    result_path = split_dir / RESULT_FILE
    reused = load_verified(result_path, _load_split_result, f"result of split {split.index}")
    if reused is not None and reused.get("label_fraction", 1.0) == fraction:
        print(
            f"split {split.index}{_fraction_tag(fraction)}: finished before, reusing {result_path}",
            flush=True,
        )
        return reused
    split_dir.mkdir(parents=True, exist_ok=True)
    child = None
    if parent is not None:
        params = {"split": split.index, "train": len(train), "val": len(split.val),
                  "test": len(split.test), "label_fraction": fraction}  # fmt: skip
        child = open_mlflow_run(
            config, "finetune", run_name=name, parent_run_id=parent.run_id, params=params
        )
        child.set_tags({"histokd.split": str(split.index)})
    loop_config = config_to_dict(config)
    loop_config.update(
        num_classes=dataset.num_classes,
        class_names=list(dataset.class_names),
        split_index=split.index,
        split_dir=str(split_dir),
        seed=config.seed + split.index,
        cache_images=cache,
        stain_normalization=stain,  # kept in the model file: inference normalises the same way
        data={
            "train": dataset.subset(train),
            "val": dataset.subset(split.val),
            "test": dataset.subset(split.test),
        },
        mlflow_run_id=child.run_id if child else None,
        tracking_uri=config.tracking_uri if child else None,
    )
    resources: dict[str, float] = {"CPU": config.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = config.gpus_per_worker
    if config.num_workers == 0:
        # Ray Train's local mode keeps no checkpoint files: the split's results go to its folder
        loop_config["local_result_dir"] = str(split_dir / "local_run")
        scaling = ScalingConfig(num_workers=0)
    else:
        scaling = ScalingConfig(
            num_workers=config.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        )
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=RunConfig(
            name=name,
            storage_path=config.storage_path,
            failure_config=FailureConfig(max_failures=config.max_failures),
            logging_config=LoggingConfig(log_level=train_log_level()),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    try:
        outcome = trainer.fit()
    except Exception:
        if child is not None:
            child.finish("FAILED")
        raise
    if outcome.error or outcome.checkpoint is None:
        if child is not None:
            child.finish("FAILED")
        raise RuntimeError(
            f"split {split.index} ({name}) failed: {outcome.error or 'no checkpoint'}"
        )
    with outcome.checkpoint.as_directory() as d:
        result = json.loads((Path(d) / RESULT_FILE).read_text())
        result["checkpoint"] = outcome.checkpoint.path
        result["best_model"] = f"{outcome.checkpoint.path}/{BEST_MODEL_FILE}"
        if child is not None:
            child.log_artifact(Path(d) / RESULT_FILE)
    # the record indices are positions in the split's test list: keep the dataset's indices too
    result["test_records"]["dataset_index"] = [
        int(split.test[i]) for i in result["test_records"]["index"]
    ]
    result.update(protocol="finetune", label_fraction=fraction)
    write_text_atomic(result_path, json.dumps(result))
    write_sidecar(result_path)
    if child is not None:
        child.log_metrics(
            {
                f"test_{k}": v
                for k, v in result["test"].items()
                if isinstance(v, (int, float)) and math.isfinite(v)
            }
        )
        child.finish("FINISHED")
    return result


def _write_augment_examples(
    config: FinetuneConfig, dataset: TaskDataset, split: Split, work_dir: Path, stain, run
) -> Path | None:
    """The first training images of ``split`` before | after their epoch-1 augmentation (as
    its training draws them), as a PNG in the run folder and the MLflow run."""
    if not config.augment:
        return None
    from histokd.augment import EXAMPLES_FILE, Augmentation, save_augment_examples
    from histokd.finetune.samples import ImageSamples

    part = dataset.subset(split.train[:4])
    kwargs = {"labels": part.get("labels"), "masks": part.get("masks"), "stain": stain,
              "resize": config.resize, "ignore_index": config.ignore_index}  # fmt: skip
    plain = ImageSamples(part["images"], config.input_size, **kwargs)
    augmented = ImageSamples(part["images"], config.input_size, seed=config.seed + split.index,
                             augmentation=Augmentation.from_config(config_to_dict(config)), **kwargs)  # fmt: skip
    import torch

    n = len(part["images"])
    before = torch.stack([plain[i][0] for i in range(n)])
    after = torch.stack([augmented[(1, i)][0] for i in range(n)])
    path = Path(save_augment_examples(
        before, after, str(work_dir / EXAMPLES_FILE),
        title=f"split {split.index}, epoch 1: before | after ({' '.join(config.augment)})",
    ))  # fmt: skip
    if run is not None:
        run.log_artifact(path)
    return path


def _load_split_result(path: Path) -> dict[str, Any]:
    """A split's ``result.json``, reused only while its model's checkpoint is whole too."""
    result = json.loads(path.read_text())
    checkpoint = Path(result.get("checkpoint") or "")
    if result.get("checkpoint") and "://" not in result["checkpoint"]:  # local: check the model
        from histokd.finetune.loop import BEST_MODEL_FILE

        if not (checkpoint / BEST_MODEL_FILE).is_file():
            raise DamagedFile(f"its model {checkpoint / BEST_MODEL_FILE} is missing")
        check_folder(checkpoint)
    return result


def log_task_model(config: FinetuneConfig, run, work_dir: Path):
    """The best split's model (the lowest validation loss: what ``predict_slides --model RUN_DIR``
    picks) as the run's MLflow model ``model``, with its ``best_model.pt`` inside; registered as
    ``config.register_model`` when that is set. None where it could not be logged (a warning)."""
    from histokd.inference.model_file import (
        ModelFileError,
        build_model,
        describe_checkpoint,
        find_best_model,
        load_checkpoint,
    )
    from histokd.tracking import log_pytorch_model

    try:
        path = find_best_model(work_dir)
        payload = load_checkpoint(path)
        info = describe_checkpoint(str(path), payload)
        model = build_model(info, payload["model"])
    except ModelFileError as exc:
        log.warning("MLflow model not logged: %s", exc)
        return None
    metadata = {key: value for key, value in info.as_dict().items() if key != "path"}
    metadata.update(
        source="histokd finetune", split=payload["config"].get("split_index"),
        mpp=10.0 / info.magnification if info.magnification else None,
    )  # fmt: skip
    return log_pytorch_model(
        run, model, input_size=info.input_size, metadata=metadata, model_file=path,
        register=config.register_model,
    )  # fmt: skip


def _log_summary(run, summary: dict[str, Any], files: dict[str, str]) -> None:
    metrics: dict[str, float] = {}
    for name, entry in summary["metrics"].items():
        for key in ("mean", "std", "ci_low", "ci_high"):
            value = entry.get(key)
            if value is not None and math.isfinite(value):
                metrics[f"test_{name}_{key}"] = value
    for arm in summary.get("arms", []):
        for name, entry in arm["metrics"].items():
            value = entry.get("mean")
            if value is not None and math.isfinite(value):
                arm_name = f"{arm['protocol']}_labels{arm['label_fraction']:g}"
                metrics[f"{arm_name}_test_{name}_mean"] = value
    metrics["wall_seconds"] = summary["wall_seconds"]
    run.log_metrics(metrics)
    for path in files.values():
        run.log_artifact(path)
