"""The per-worker training loop of RCKD pretraining (Ray Train).

Each worker reads its shard of the labelled patch stream, trains backbone + U-Net decoder on
the teacher's pseudo labels with pixel-wise cross-entropy (RCKD Eq. 3) under LARS with linear
warm-up, evaluates on the fixed hold-out slice, and reports once per epoch. Rank 0 writes the
checkpoint (model, optimizer, scheduler, epoch, history), so a restarted or resumed run
continues at the next epoch with the same state.

With ``teacher_placement="trainer"`` the stream carries no labels: the worker's own
:class:`~histokd.teachers.stream.TrainerTeacher` labels each batch (train and hold-out) on the
worker's device before it is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from histokd.run import all_gather, all_reduce_sum
from histokd.tracking import log_epoch_metrics, worker_mlflow_client

log = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FILE",
    "LABEL_SHARE_FILE",
    "EpochStats",
    "build_student",
    "patch_checksum",
    "train_fn_per_worker",
]

CHECKPOINT_FILE = "checkpoint.pt"
LABEL_SHARE_FILE = "label_share.csv"  # per slide: the pseudo labels' nucleus share (label_share.py)


def patch_checksum(patch_ids) -> int:
    """Order-free sum of 32-bit hashes of patch ids: equal sums and counts mean the same set
    with overwhelming probability, and sums add across workers."""
    total = 0
    for pid in patch_ids:
        pid = pid.decode() if isinstance(pid, bytes) else str(pid)
        total += int.from_bytes(hashlib.blake2b(pid.encode(), digest_size=4).digest(), "little")
    return total


@dataclass
class EpochStats:
    """What one epoch measured, summed over workers where it adds up."""

    epoch: int
    loss: float
    holdout_loss: float
    holdout_pixel_accuracy: float
    holdout_foreground_iou: float
    holdout_label_foreground: float
    lr: float
    patches: int
    patches_per_second: float
    seconds: float
    patch_checksum: int
    extra: dict[str, Any] = field(default_factory=dict)


def _writable_tensor(array: Any) -> torch.Tensor:
    """A tensor on the batch's array, or on a copy of it when read-only: Ray Data hands out
    views of Arrow buffers, which torch must not write through (it would warn)."""
    array = np.asarray(array)
    return torch.as_tensor(array if array.flags.writeable else array.copy())


def _to_tensors(
    batch: dict,
    device: torch.device,
    channels_last: bool,
    label: torch.Tensor | None = None,
    augment=None,
    augment_on_device: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The image in [0, 1] (the model normalises it) and the pseudo label (the batch's, or
    ``label`` when given), through ``augment(image, label)`` when given: on the device, or on
    the CPU before the image moves there."""
    image = _writable_tensor(batch["image"])
    if label is None:
        label = _writable_tensor(batch["pseudo_label"]).to(device, non_blocking=True)
    if augment is None or augment_on_device:
        image = image.to(device, non_blocking=True)
    image = image.permute(0, 3, 1, 2).float().div_(255.0)
    if augment is not None:
        image, label = augment(image, label)
        image = image.to(device, non_blocking=True)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    return image, label.long()


def build_student(backbone: str, init: str | None = "random") -> torch.nn.Module:
    """RCKD's student: backbone + U-Net decoder for the two-class pseudo labels (Sec. 2.2.1).

    Args:
        backbone: One of ``histokd.models.BACKBONES``.
        init: The backbone's initial weights (``--init``): ``random``, ``imagenet`` (RCKD,
            following USI), a weights file or ``hf-hub:ORG/NAME``, loaded with every key checked.
    """
    from histokd.models import SegmentationModel

    return SegmentationModel(backbone, num_classes=2, init=init)


def train_fn_per_worker(config: dict) -> None:
    """Ray Train worker function: RCKD pretraining of one student.

    Args:
        config: The resolved ``PretrainConfig`` as a dict, plus ``mlflow_run_id``,
            ``tracking_uri``, ``run_dir``, ``num_train_patches`` and ``steps_per_epoch``
            set by the driver.
    """
    from histokd.cluster import quiet_train_reports

    quiet_train_reports()
    import ray.train
    import ray.train.torch
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    from histokd.augment import Augmentation, augment_on_device
    from histokd.losses import pixel_cross_entropy
    from histokd.metrics import BinaryConfusion, binary_confusion
    from histokd.pretrain.label_share import LabelShare
    from histokd.pretrain.overlay import save_overlay
    from histokd.resume import inject_fault, report_checkpoint, restore_checkpoint

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    use_cuda = device.type == "cuda"
    precision = config["precision"]
    if precision == "auto":
        precision = "bf16" if use_cuda else "fp32"
    autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    channels_last = use_cuda
    torch.manual_seed(config["seed"])

    # The teacher in this worker (teacher_placement="trainer"), built at its first batch; else
    # the labels come with the stream from the teacher actors.
    trainer_teacher = None
    if config.get("teacher_placement", "actors") == "trainer":
        from histokd.teachers.stream import TrainerTeacher

        trainer_teacher = TrainerTeacher(
            config["teacher"],
            config["teacher_kwargs"],
            config["input_size"],
            config["teacher_batch_size"],
            device,
        )

    def pseudo_label(batch: dict) -> torch.Tensor | None:
        return trainer_teacher(batch) if trainer_teacher is not None else None

    model = build_student(config["backbone"], config.get("init"))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    raw_model = model.module if hasattr(model, "module") else model

    epochs = config["epochs"]
    steps_per_epoch = max(1, config["steps_per_epoch"])
    per_worker_batch = max(1, config["batch_size"] // world)
    # RCKD Sec. 2.2.1: LARS from a learning rate of 0, 10 warm-up epochs of 100.
    optimizer = create_optimizer_v2(
        model,
        "lars",
        lr=config["lr"],
        weight_decay=config["weight_decay"],
        momentum=config["momentum"],
    )
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=epochs * steps_per_epoch,
        warmup_t=config["warmup_epochs"] * steps_per_epoch,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    start_epoch, history, best_iou, step = 1, [], -1.0, 0
    _, state = restore_checkpoint(CHECKPOINT_FILE, rank=rank)
    if state is not None:
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
        step = int(state["step"])
        history = json.loads(state["history"])
        best_iou = float(state["best_iou"])
        if rank == 0:
            print(f"resuming from epoch {start_epoch - 1}", flush=True)

    mlflow_client = worker_mlflow_client(config) if rank == 0 else None

    train_shard = ray.train.get_dataset_shard("train")
    holdout_shard = ray.train.get_dataset_shard("holdout")
    run_dir = config["run_dir"]
    augmentation = Augmentation.from_config(config)
    on_device = augment_on_device(config["augment_device"], device)
    run_start = time.monotonic()
    for epoch in range(start_epoch, epochs + 1):
        model.train()
        # the draws on the CPU, seeded by epoch and rank: the same patches on CPU and device
        augment_rng = torch.Generator().manual_seed(config["seed"] + 7919 * epoch + rank)

        def augment(image, label, rng=augment_rng):
            return augmentation(image, label, generator=rng)

        epoch_start = time.monotonic()
        loss_sum, seen, checksum = 0.0, 0, 0
        shares = LabelShare(config["empty_patch_share"])
        batches = train_shard.iter_batches(
            batch_size=per_worker_batch,
            batch_format="numpy",
            prefetch_batches=config["dataloader_prefetch"],
            local_shuffle_buffer_size=4 * per_worker_batch,
            local_shuffle_seed=config["seed"] * 1000 + epoch,
        )
        for i, batch in enumerate(batches):
            if i == 1:  # mid-epoch, with data flowing
                inject_fault(config, epoch, rank, world, run_dir)
            image, label = _to_tensors(
                batch, device, channels_last, pseudo_label(batch),
                augment if augmentation.enabled else None, on_device,
            )  # fmt: skip
            shares.add(batch["slide"], label.float().mean(dim=(1, 2)).cpu().numpy())
            if i == 0 and epoch == start_epoch and rank == 0 and augmentation.enabled:
                _log_augment_examples(batch["image"], image, config, mlflow_client)
            with torch.autocast(
                device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                logits = model(image)
            loss = pixel_cross_entropy(logits, label)  # RCKD Eq. 3
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            n = int(label.shape[0])
            loss_sum += float(loss.detach()) * n
            seen += n
            checksum += patch_checksum(batch["patch_id"])

        # Hold-out: student against pseudo labels, counts summed over workers.
        model.eval()
        confusion, holdout_loss, holdout_n = BinaryConfusion(), 0.0, 0
        overlay_images, overlay_labels, overlay_preds = [], [], []
        with torch.no_grad():
            for batch in holdout_shard.iter_batches(
                batch_size=per_worker_batch, batch_format="numpy"
            ):
                image, label = _to_tensors(batch, device, channels_last, pseudo_label(batch))
                with torch.autocast(
                    device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
                ):
                    logits = model(image)
                holdout_loss += float(pixel_cross_entropy(logits, label)) * int(label.shape[0])
                holdout_n += int(label.shape[0])
                prediction = logits.argmax(1)
                confusion = confusion + binary_confusion(prediction, label)
                if rank == 0 and len(overlay_images) < config["overlays"]:
                    keep = config["overlays"] - len(overlay_images)
                    overlay_images.extend(np.asarray(batch["image"])[:keep])
                    overlay_labels.extend(label[:keep].cpu().numpy().astype(np.uint8))
                    overlay_preds.extend(prediction[:keep].cpu().numpy().astype(np.uint8))
        sums = all_reduce_sum(
            torch.tensor(
                [
                    loss_sum,
                    seen,
                    checksum,
                    holdout_loss,
                    holdout_n,
                    *confusion.as_tensor().tolist(),
                ],
                dtype=torch.float64,
                device=device,
            )
        ).cpu()
        loss_sum, seen, checksum, holdout_loss, holdout_n = sums[:5].tolist()
        shares = _gather_label_shares(shares, world)
        confusion = BinaryConfusion.from_tensor(sums[5:])
        seconds = time.monotonic() - epoch_start
        stats = EpochStats(
            epoch=epoch,
            loss=loss_sum / max(seen, 1),
            holdout_loss=holdout_loss / max(holdout_n, 1),
            holdout_pixel_accuracy=confusion.pixel_accuracy,
            holdout_foreground_iou=confusion.foreground_iou,
            # the teacher's nuclei share of the hold-out: the same in both teacher placements
            holdout_label_foreground=(confusion.tp + confusion.fn)
            / max(1, confusion.tp + confusion.fp + confusion.fn + confusion.tn),
            lr=float(optimizer.param_groups[0]["lr"]),
            patches=int(seen),
            patches_per_second=seen / max(seconds, 1e-9),
            seconds=seconds,
            patch_checksum=int(checksum),
        )
        history.append({k: v for k, v in stats.__dict__.items() if k != "extra"})
        is_best = stats.holdout_foreground_iou > best_iou
        best_iou = max(best_iou, stats.holdout_foreground_iou)
        metrics = {k: v for k, v in history[-1].items()}
        metrics["best_holdout_foreground_iou"] = best_iou
        metrics["train_label_nucleus_share"] = shares.mean_share

        if rank == 0:
            elapsed = time.monotonic() - run_start
            done = epoch - start_epoch + 1
            eta = elapsed / done * (epochs - epoch)
            print(
                f"epoch {epoch}/{epochs}  loss {stats.loss:.4f}  holdout loss {stats.holdout_loss:.4f} "
                f"acc {stats.holdout_pixel_accuracy:.3f} IoU {stats.holdout_foreground_iou:.3f}  "
                f"lr {stats.lr:.4g}  nuclei {shares.mean_share:.1%}  {stats.patches} patches "
                f"{stats.patches_per_second:.1f}/s  {seconds:.1f} s  ETA {_fmt_seconds(eta)}",
                flush=True,
            )
            share_path = shares.write_csv(os.path.join(run_dir, LABEL_SHARE_FILE))
            if epoch == start_epoch:  # the labels are the teacher's: the same every epoch
                _warn_empty_slides(shares, config)
                if mlflow_client is not None:
                    mlflow_client.log_artifact(config["mlflow_run_id"], str(share_path))

        def state(epoch=epoch, step=step, best_iou=best_iou):
            return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step,
                    "best_iou": best_iou, "history": json.dumps(history), "backbone": config["backbone"]}  # fmt: skip

        overlay = (overlay_images, overlay_labels, overlay_preds)

        def write_files(folder, epoch=epoch, is_best=is_best, stats=stats, metrics=metrics,
                        overlay=overlay):  # fmt: skip
            if is_best:
                _save_best(raw_model, run_dir, stats)
            overlay_path = None
            if overlay[0] and (
                epoch in (1, epochs, config.get("stop_after_epoch")) or epoch % 5 == 0
            ):
                overlay_path = save_overlay(
                    *(np.stack(part) for part in overlay),
                    os.path.join(folder, f"overlay_epoch_{epoch:03d}.png"),
                    title=f"epoch {epoch}: image | teacher pseudo label | student",
                )  # fmt: skip
            if mlflow_client is not None:
                _log_mlflow(mlflow_client, config, metrics, epoch, overlay_path)

        report_checkpoint(metrics, state, CHECKPOINT_FILE, rank, write_files)
        if config.get("stop_after_epoch") == epoch:
            if rank == 0:
                print(
                    f"stopping after epoch {epoch} as asked (stop_after_epoch); rerun to resume",
                    flush=True,
                )
            break


def _log_augment_examples(before, after: torch.Tensor, config: dict, client) -> None:
    """Once per run: a few training patches before | after augmentation, as a PNG in the run
    folder and in the MLflow run."""
    from histokd.augment import EXAMPLES_FILE, save_augment_examples

    path = os.path.join(config["run_dir"], EXAMPLES_FILE)
    if os.path.exists(path):  # a resumed run drew them before
        return
    n = min(4, len(after))
    try:
        save_augment_examples(np.asarray(before[:n]), after[:n], path,
                              title=f"before | after augmentation ({' '.join(config['augment'])})")  # fmt: skip
        if client is not None:
            client.log_artifact(config["mlflow_run_id"], path)
    except Exception as exc:  # noqa: BLE001 - pictures must never kill a training run
        log.warning("augmentation examples not written: %s", exc)


def _gather_label_shares(shares, world: int):
    """Every worker's per-slide label counts, merged (on each worker)."""
    if world == 1:
        return shares
    return type(shares)(shares.empty_patch_share).merge(all_gather(shares.counts))


def _warn_empty_slides(shares, config: dict) -> None:
    """One line per slide whose pseudo labels are mostly empty, naming it."""
    for row in shares.mostly_empty(config["empty_slide_fraction"]):
        print(
            f"warning: {row['slide']}: {row['empty_patches']}/{row['patches']} patches have pseudo labels with "
            f"less than {config['empty_patch_share']:.1%} nucleus pixels (mean {row['mean_nucleus_share']:.2%}); "
            "is the teacher right on this tissue? check it with jobs/check_teacher.py (scale, normalisation, alpha)",
            flush=True,
        )


def _save_best(model: torch.nn.Module, run_dir: str, stats: EpochStats) -> None:
    """The best model by hold-out IoU, beside the rolling checkpoints (which keep the last N)."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(run_dir)
    fs.create_dir(f"{root}/best", recursive=True)
    with tempfile.NamedTemporaryFile(suffix=".pt") as tmp:
        torch.save(
            {
                "model": model.state_dict(),
                "epoch": stats.epoch,
                "holdout_foreground_iou": stats.holdout_foreground_iou,
            },
            tmp.name,
        )
        with open(tmp.name, "rb") as src, fs.open_output_stream(f"{root}/best/model.pt") as dst:
            dst.write(src.read())


def _log_mlflow(client, config: dict, metrics: dict, epoch: int, overlay_path: str | None) -> None:
    """Per-epoch metrics (the patch checksum is a test aid, not a metric) and the overlay."""
    log_epoch_metrics(
        client, config, {k: v for k, v in metrics.items() if k != "patch_checksum"}, epoch
    )
    if overlay_path:
        try:
            client.log_artifact(config["mlflow_run_id"], overlay_path, artifact_path="overlays")
        except Exception as exc:  # noqa: BLE001 - tracking must never kill a training run
            log.warning("MLflow overlay upload failed at epoch %d: %s", epoch, exc)


def _fmt_seconds(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
