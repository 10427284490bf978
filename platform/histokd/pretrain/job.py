"""The RCKD pretraining driver: manifest -> teacher stream -> TorchTrainer -> backbone file.

RCKD Algorithm 1 on Ray: the manifest fixes the patches (GetPatches, SelectTissuePatches,
RandomSampling), a Ray Data actor pool runs the teacher on them once, before training, into the
record cache (resized image and pseudo label per patch), and Ray Train's TorchTrainer trains the
student with DDP over the workers, every epoch streaming the records. With
``teacher_placement="trainer"`` the stream only reads patches and each training worker runs the
teacher itself, on its own device, before each step. Rerunning with the same run name resumes
from the last checkpoint; the MLflow run of that name continues too.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from histokd.cli import config_to_dict, save_config
from histokd.cluster import init_ray
from histokd.pretrain.config import PretrainConfig
from histokd.run import check_storage_path, holds_run_lock, open_mlflow_run

__all__ = ["PretrainResult", "log_backbone_model", "run_pretraining", "split_holdout"]

log = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    """Where a pretraining run left its outputs."""

    backbone_path: str
    run_dir: str
    checkpoint_path: str | None
    mlflow_run_id: str
    tracking_uri: str
    history: list[dict]
    num_train_patches: int
    num_holdout_patches: int
    label_share: list[dict] = field(
        default_factory=list
    )  # per slide: the pseudo labels' nucleus share
    label_share_summary: str = ""


def split_holdout(table: pa.Table, fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """A fixed hold-out slice: chosen by a hash of each patch id, so it never depends on the
    sampling order or the number of patches (at least one patch on each side)."""
    import hashlib

    ids = table.column("patch_id").to_pylist()
    scores = np.array(
        [
            int.from_bytes(
                hashlib.blake2b(f"{seed}:{pid}".encode(), digest_size=8).digest(), "little"
            )
            / 2**64
            for pid in ids
        ]
    )
    holdout = scores < fraction
    if not holdout.any():
        holdout[np.argmin(scores)] = True
    if holdout.all():
        holdout[np.argmax(scores)] = False
    return table.filter(pa.array(~holdout)), table.filter(pa.array(holdout))


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def _demo_slides(config: PretrainConfig) -> list[str]:
    """The synthetic demo slides, written on first use."""
    from histokd.demos.synthetic import make_demo_slides

    slides = make_demo_slides(config.demo_dir, n=4, seed=config.seed)
    return [str(s.path) for s in slides]


@holds_run_lock
def run_pretraining(config: PretrainConfig) -> PretrainResult:
    """Run (or resume) RCKD pretraining end to end.

    Raises:
        ValueError: A bad setting, found before any cluster work.
        RuntimeError: Training failed after the allowed restarts.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from histokd.console import train_log_level
    from histokd.manifest import ManifestConfig, balance_line, build_manifest, read_manifest
    from histokd.pretrain.label_share import read_label_share, summary_line
    from histokd.pretrain.loop import CHECKPOINT_FILE, LABEL_SHARE_FILE, train_fn_per_worker
    from histokd.teachers.registry import check_teacher_loads
    from histokd.teachers.stream import patch_dataset, pseudo_label_dataset

    check_storage_path(config.storage_path)
    _ = config.tracking_uri  # a remote storage needs a tracking server: fail before any work
    check_teacher_loads(config.teacher, **config.teacher_kwargs())  # in seconds, not in an actor
    work_dir = config.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, work_dir / "config.yaml")

    init_ray(config.ray_address)
    started = time.monotonic()
    slides = config.slides or _demo_slides(config)

    manifest = build_manifest(
        slides,
        work_dir / "manifest",
        ManifestConfig(
            mpp=config.mpp,
            patch_size=config.patch_size,
            num_patches=config.num_patches,
            seed=config.seed,
            assume_mpp=config.assume_mpp,
            sampling=config.sampling,
            max_patches_per_slide=config.max_patches_per_slide,
        ),
    )
    table = read_manifest(manifest.manifest_path)
    train_table, holdout_table = split_holdout(table, config.holdout_fraction, config.seed)
    pq.write_table(train_table, work_dir / "manifest" / "train.parquet")
    pq.write_table(holdout_table, work_dir / "manifest" / "holdout.parquet")
    print(
        f"manifest: {table.num_rows} patches ({train_table.num_rows} train, {holdout_table.num_rows} hold-out) "
        f"from {manifest.num_slides - manifest.num_bad_slides} slides; {manifest.num_bad_slides} bad slides "
        f"listed in {manifest.bad_slides_path}",
        flush=True,
    )
    balance, lopsided = balance_line(manifest.summary.get("patches_per_slide", {}))
    print(balance, flush=True)
    if lopsided:
        print(
            "warning: one slide gives over half of the patches; balance them with "
            "--max-patches-per-slide (and --sampling proportional)",
            flush=True,
        )
    from_objective = manifest.summary.get("num_slides_mpp_from_objective", 0)
    if from_objective:
        print(
            f"warning: {from_objective} slide(s) record no MPP: their pixel size is 10 / objective "
            f"power (see {manifest.manifest_path.with_name('manifest.json')})",
            flush=True,
        )

    # One progress bar per dataset (per-operator bars from the split coordinator flood logs).
    ray.data.DataContext.get_current().enable_operator_progress_bars = False
    gpus = _cluster_gpus()
    use_gpu = config.use_gpu if config.use_gpu is not None else gpus > 0
    if use_gpu and gpus == 0:
        # An autoscaling cluster may have no GPU node up yet: plan for GPUs anyway, so the
        # teacher actors and trainers ask for their shares and the autoscaler adds nodes.
        gpus = float(num_workers_hint(config))
    num_workers = config.num_workers or (max(1, int(gpus)) if use_gpu else 1)
    # leave the training workers their CPUs: the stream sizes itself from what is left
    reserved_cpus = num_workers * config.cpus_per_worker
    if config.teacher_placement == "trainer":  # read tasks only; the workers label (TrainerTeacher)
        make_stream = functools.partial(
            patch_dataset,
            input_size=config.input_size,
            batch_size=config.teacher_batch_size,
            reserved_cpus=reserved_cpus,
        )
    else:
        make_stream = functools.partial(
            pseudo_label_dataset,
            teacher=config.teacher,
            teacher_kwargs=config.teacher_kwargs(),
            input_size=config.input_size,
            cache_dir=_record_cache_dir(config),
            record_format=config.record_format,
            jpeg_quality=config.jpeg_quality,
            batch_size=config.teacher_batch_size,
            num_actors=config.teacher_actors,
            num_gpus=config.teacher_gpus if gpus > 0 else 0.0,
            resources=config.teacher_resources,
            reserved_cpus=reserved_cpus,
        )
    train_ds = make_stream(str(work_dir / "manifest" / "train.parquet"))
    holdout_ds = make_stream(str(work_dir / "manifest" / "holdout.parquet"))
    if config.teacher_placement == "actors":
        _report_record_cache(config)

    params = config_to_dict(config)
    tracking = open_mlflow_run(config, "rckd_pretrain", params=params)
    if tracking.resumed:
        print(f"MLflow: continuing run {tracking.run_id}", flush=True)

    steps_per_epoch = int(
        np.ceil(train_table.num_rows / max(1, config.batch_size // num_workers) / num_workers)
    )
    loop_config = dict(params)
    loop_config.update(
        mlflow_run_id=tracking.run_id,
        tracking_uri=config.tracking_uri,
        run_dir=str(work_dir) if "://" not in config.storage_path else config.run_dir,
        num_train_patches=train_table.num_rows,
        steps_per_epoch=steps_per_epoch,
        teacher_kwargs=config.teacher_kwargs(),  # for a teacher in the workers (teacher_placement)
    )
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker=_worker_resources(config, use_gpu, gpus),
        ),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=config.storage_path,
            failure_config=FailureConfig(max_failures=config.max_failures),
            logging_config=LoggingConfig(log_level=train_log_level()),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
        ),
        datasets={"train": train_ds, "holdout": holdout_ds},
    )
    try:
        result = trainer.fit()
    except Exception:
        tracking.finish("FAILED")
        raise
    if result.error:
        tracking.finish("FAILED")
        raise RuntimeError(f"pretraining failed: {result.error}")
    if result.checkpoint is None:
        raise RuntimeError("pretraining produced no checkpoint")

    import torch

    from histokd.models import SegmentationModel

    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    history = json.loads(state["history"])
    model = SegmentationModel(config.backbone, num_classes=2)
    model.load_state_dict(state["model"])
    backbone_path = work_dir / "backbone.pth"
    model.save_backbone(backbone_path)
    finished = int(state["epoch"]) >= config.epochs
    (work_dir / "history.json").write_text(json.dumps(history, indent=2))
    curves = _plot_history(history, work_dir / "curves.png")
    tracking.log_artifact(backbone_path, "backbone")
    log_backbone_model(config, tracking, backbone_path)
    tracking.log_artifact(work_dir / "config.yaml")
    tracking.log_artifact(curves)
    tracking.log_artifact(manifest.bad_slides_path, "manifest")
    share_path = work_dir / LABEL_SHARE_FILE
    label_share = read_label_share(share_path) if share_path.is_file() else []
    share_summary = summary_line(label_share, config.empty_patch_share, config.empty_slide_fraction)
    if share_path.is_file():
        tracking.log_artifact(share_path)
    tracking.log_metrics({"wall_seconds": time.monotonic() - started}, step=int(state["epoch"]))
    tracking.finish("FINISHED" if finished else "KILLED")
    return PretrainResult(
        backbone_path=str(backbone_path),
        run_dir=config.run_dir,
        checkpoint_path=result.checkpoint.path,
        mlflow_run_id=tracking.run_id,
        tracking_uri=config.tracking_uri,
        history=history,
        num_train_patches=train_table.num_rows,
        num_holdout_patches=holdout_table.num_rows,
        label_share=label_share,
        label_share_summary=share_summary,
    )


def log_backbone_model(config: PretrainConfig, tracking, backbone_path: str | os.PathLike):
    """The pretrained backbone as the run's MLflow model ``backbone``: images -> pooled features
    of its deepest level (`histokd.models.BackboneFeatures`), with ``backbone.pth`` inside;
    registered as ``config.register_model`` when that is set. None where it could not be
    logged (a warning)."""
    from histokd.models import BackboneFeatures
    from histokd.tracking import log_pytorch_model

    model = BackboneFeatures(config.backbone, backbone_file=backbone_path).eval()
    metadata = {
        "source": "histokd rckd_pretrain", "task": "features", "backbone": config.backbone,
        "input_size": config.input_size, "num_features": model.num_features, "mpp": config.mpp,
        "magnification": 10.0 / config.mpp if config.mpp else None,
        "patch_size": config.patch_size, "teacher": config.teacher,
        "output": "global average pool of the deepest feature map, B x num_features",
    }  # fmt: skip
    return log_pytorch_model(
        tracking, model, input_size=config.input_size, metadata=metadata,
        model_file=backbone_path, name="backbone", register=config.register_model,
    )  # fmt: skip


def _record_cache_dir(config: PretrainConfig) -> str:
    """The record cache folder: ``--record-cache``, else ``records/`` in the run folder.

    Raises:
        ValueError: The storage path is a URI (the run folder's work files stay on the head's
            disk) on a cluster of several nodes, and no ``--record-cache`` is given: the teacher
            actors and read tasks on the other nodes could not reach the records.
    """
    if config.record_cache:
        return config.record_cache
    if config.remote_storage and config.teacher_placement == "actors":
        import ray

        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        if nodes > 1:
            raise ValueError(
                f"storage_path={config.storage_path!r} keeps the job's work files on the head's disk, where the "
                f"other {nodes - 1} node(s) cannot read the record cache: give --record-cache on a "
                "filesystem every node mounts (an NFS path)"
            )
    return str(config.work_dir / "records")


def _report_record_cache(config: PretrainConfig) -> None:
    """Print the record cache's size (records, MB, bytes per record, the disk of 400k records).

    Caches of earlier versions held labels only (``pseudo_labels/``); records need the images
    too, so that folder is not read any more and a note says it can go.
    """
    from histokd.teachers.cache import RecordCache

    cache = RecordCache.for_teacher(
        _record_cache_dir(config), config.teacher, config.teacher_kwargs(), config.input_size,
        config.record_format, config.jpeg_quality,
    )  # fmt: skip
    print(cache.size_line(), flush=True)
    old = config.work_dir / "pseudo_labels"
    if old.is_dir():
        print(
            f"note: {old} holds the label-only cache of an earlier version, which the record cache "
            "replaces; it is no longer read and can be deleted",
            flush=True,
        )


def num_workers_hint(config: PretrainConfig) -> int:
    """GPUs to plan for when none are up yet: one per training worker."""
    return config.num_workers or 1


def _worker_resources(config: PretrainConfig, use_gpu: bool, gpus: float) -> dict[str, float]:
    """A training worker's resources. On GPUs it takes what the teacher actors leave of one
    GPU (``1 - teacher_gpus``), so a teacher actor and a trainer share each GPU; with the
    teacher in the workers (``teacher_placement="trainer"``) there are no actors and a worker
    takes its whole GPU. Custom resources (``trainer_resources``) pin the workers to the nodes
    that offer them."""
    resources = {**config.trainer_resources, "CPU": config.cpus_per_worker}
    if use_gpu and gpus > 0:
        whole = config.teacher_placement == "trainer" or config.teacher_gpus >= 1
        resources["GPU"] = 1.0 if whole else 1.0 - config.teacher_gpus
    return resources


def _plot_history(history: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot(epochs, [h["loss"] for h in history], label="train")
    axes[0].plot(epochs, [h["holdout_loss"] for h in history], label="hold-out")
    axes[0].set_title("pixel cross-entropy (RCKD Eq. 3)")
    axes[0].legend()
    axes[1].plot(epochs, [h["holdout_foreground_iou"] for h in history], label="foreground IoU")
    axes[1].plot(epochs, [h["holdout_pixel_accuracy"] for h in history], label="pixel accuracy")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("student vs pseudo labels (hold-out)")
    axes[1].legend()
    axes[2].plot(epochs, [h["lr"] for h in history])
    axes[2].set_title("learning rate (LARS)")
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
