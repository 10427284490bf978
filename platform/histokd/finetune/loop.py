"""The per-worker loop of one fine-tuning split (Ray Train): RCKD Algorithm 2, lines 8-15.

Each worker builds the task model (backbone from its initialisation + a new head), freezes or
trains the positional encodings, and trains with SGD on the focal loss (Eqs. 5 and 7). After
every epoch it measures the validation loss, keeps the weights of the epoch with the lowest
one, and stops after ``patience`` epochs without a lower one. The kept weights are then
evaluated on the test split. Rank 0 reports every epoch with a checkpoint (model, optimizer,
early-stopping state and the best weights), so a restarted split continues where it was; the
last report carries ``result.json`` (per-split metrics, the test predictions for the bootstrap,
the history) and ``best_model.pt``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from histokd.finetune.early_stopping import EarlyStopping
from histokd.resume import inject_fault, report_checkpoint, restore_checkpoint, seal_folder
from histokd.run import all_gather, all_reduce_sum
from histokd.tracking import log_epoch_metrics, worker_mlflow_client

log = logging.getLogger(__name__)

__all__ = [
    "BEST_MODEL_FILE",
    "RESULT_FILE",
    "STATE_FILE",
    "build_task_model",
    "evaluate",
    "train_fn_per_worker",
]

STATE_FILE = "state.pt"
RESULT_FILE = "result.json"
BEST_MODEL_FILE = "best_model.pt"


def build_task_model(
    task: str, backbone: str, num_classes: int, init: str = "random", drop_rate: float = 0.0
) -> nn.Module:
    """The downstream model: backbone from ``init`` plus a new head (RCKD Sec. 2.2.2).

    Args:
        task: ``classification`` (linear + softmax head) or ``segmentation`` (U-Net decoder).
        backbone: One of ``histokd.models.BACKBONES``.
        num_classes: Classes of the task.
        init: ``random``, ``imagenet``, a weights file (a backbone file, a timm or Hub
            checkpoint; ``timm:FILE`` too) or ``hf-hub:ORG/NAME``, loaded with every backbone
            key checked (`histokd.models.load_init`).
        drop_rate: Dropout before the classifier.

    Raises:
        ValueError: Weights that do not fit the backbone, naming the keys and the file.
    """
    from histokd.models import ClassificationModel, SegmentationModel

    if task == "classification":
        return ClassificationModel(backbone, num_classes, drop_rate=drop_rate, init=init)
    return SegmentationModel(backbone, num_classes, init=init)


def _loss(logits: torch.Tensor, target: torch.Tensor, config: dict) -> torch.Tensor:
    """Per-sample focal loss: Eq. 5, or Eq. 7's per-image mean over the labelled pixels."""
    from histokd.losses import focal_loss

    ignore = config["ignore_index"] if config["task"] == "segmentation" else None
    loss = focal_loss(
        logits,
        target,
        alpha=config["focal_alpha"],
        gamma=config["focal_gamma"],
        ignore_index=ignore,
        reduction="none",
    )
    if loss.dim() == 1:
        return loss
    valid = (
        (target != ignore).flatten(1).sum(1).clamp_min(1) if ignore is not None else loss[0].numel()
    )
    return loss.flatten(1).sum(1) / valid


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    config: dict,
    device: torch.device,
    keep_records: bool = False,
) -> dict[str, Any]:
    """Loss, confusion matrix and (optionally) per-sample records of this worker's shard.

    Returns:
        ``loss_sum``, ``count``, ``confusion`` (C x C) and, with ``keep_records``, ``records``:
        per sample its index, and its target, prediction and class probabilities
        (classification: AUROC needs them) or its pixel confusion matrix (segmentation).
    """
    from histokd.metrics import confusion_matrix

    model.eval()
    num_classes = config["num_classes"]
    ignore = config["ignore_index"] if config["task"] == "segmentation" else None
    loss_sum, count = 0.0, 0
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    records: dict[str, list] = {
        "index": [], "target": [], "prediction": [], "probability": [], "confusion": []
    }  # fmt: skip
    for image, target, index in loader:
        image, target = image.to(device), target.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.get("_bf16", False)):
            logits = model(image)
        logits = logits.float()
        loss_sum += float(_loss(logits, target, config).sum())
        count += int(target.shape[0])
        prediction = logits.argmax(1)
        confusion += confusion_matrix(prediction, target, num_classes, ignore)
        if keep_records:
            records["index"] += index.tolist()
            if config["task"] == "classification":
                records["target"] += target.cpu().tolist()
                records["prediction"] += prediction.cpu().tolist()
                records["probability"] += logits.softmax(1).cpu().tolist()
            else:
                for p, t in zip(prediction, target, strict=True):
                    records["confusion"].append(
                        confusion_matrix(p, t, num_classes, ignore).tolist()
                    )
    return {"loss_sum": loss_sum, "count": count, "confusion": confusion, "records": records}


def _reduce_eval(result: dict[str, Any], device: torch.device) -> tuple[float, np.ndarray]:
    """Mean loss and confusion summed over workers."""
    flat = torch.tensor(
        [result["loss_sum"], result["count"], *result["confusion"].ravel().tolist()],
        dtype=torch.float64,
        device=device,
    )
    flat = all_reduce_sum(flat).cpu().numpy()
    c = result["confusion"].shape[0]
    return float(flat[0] / max(flat[1], 1)), flat[2:].reshape(c, c).round().astype(np.int64)


def _loaders(config: dict, rank: int, world: int, augmentation=None) -> tuple:
    """The train loader (its images augmented by ``augmentation`` in the loader, where given),
    its `EpochSampler`, and the validation and test loaders of this rank."""
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset

    from histokd.finetune.samples import EpochSampler, ImageSamples

    def samples(part: str, augmentation=None) -> ImageSamples:
        data = config["data"][part]
        return ImageSamples(
            data["images"], config["input_size"], labels=data.get("labels"), masks=data.get("masks"),
            augmentation=augmentation, seed=config["seed"], stain=config.get("stain_normalization"),
            cache=config["cache_images"], resize=config.get("resize", "squash"),
            ignore_index=config.get("ignore_index", 255),
        )  # fmt: skip

    train_set = samples("train", augmentation)
    per_worker = max(1, config["batch_size"] // world)
    per_rank_count = math.ceil(len(train_set) / world)
    # BatchNorm cannot train on a batch of one: drop a last batch of exactly one sample.
    drop_last = per_rank_count % per_worker == 1 and per_rank_count > 1
    generator = torch.Generator().manual_seed(config["seed"])
    sampler = EpochSampler(
        DistributedSampler(
            train_set, num_replicas=world, rank=rank, shuffle=True, seed=config["seed"]
        )
        if world > 1
        else RandomSampler(train_set, generator=generator)  # what shuffle=True builds
    )
    common = {
        "num_workers": config["loader_workers"],
        "persistent_workers": config["loader_workers"] > 0,
    }
    train_loader = DataLoader(
        train_set, batch_size=per_worker, sampler=sampler, drop_last=drop_last, **common
    )

    def eval_loader(part: str) -> DataLoader:
        data = samples(part)
        shard = Subset(data, list(range(rank, len(data), world)))  # no padding: every sample once
        return DataLoader(shard, batch_size=per_worker, shuffle=False, **common)

    return train_loader, sampler, eval_loader("val"), eval_loader("test")


def train_fn_per_worker(config: dict) -> None:
    """Ray Train worker function: fine-tune, early-stop and test one split.

    Args:
        config: The resolved `FinetuneConfig` as a dict, plus what the driver adds:
            ``num_classes``, ``split_index``, ``seed`` (the split's training seed),
            ``data`` (``{"train"|"val"|"test": {"images", "labels" or "masks"}}``),
            ``cache_images`` (resolved), ``class_names`` and optionally ``mlflow_run_id`` and
            ``tracking_uri`` of the split's MLflow run.
    """
    from histokd.cluster import quiet_train_reports

    quiet_train_reports()
    import ray.train
    import ray.train.torch

    from histokd.augment import Augmentation, augment_on_device
    from histokd.metrics import classification_metrics
    from histokd.models import set_positional_encoding_trainable

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    precision = config["precision"]
    config["_bf16"] = (precision == "bf16") or (precision == "auto" and device.type == "cuda")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    torch.manual_seed(config["seed"])
    np.random.seed(config["seed"] % 2**32)

    model = build_task_model(
        config["task"],
        config["backbone"],
        config["num_classes"],
        config["init"],
        config["drop_rate"],
    )
    pe_count = set_positional_encoding_trainable(model, config["positional_encoding"] == "trained")
    model = model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        trainable, lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"]
    )
    stopper = EarlyStopping(patience=config["patience"], min_delta=config["min_delta"])
    history: list[dict[str, Any]] = []
    best_state: dict[str, torch.Tensor] | None = None
    start_epoch, elapsed_before = 1, 0.0

    finished, state = restore_checkpoint(STATE_FILE, RESULT_FILE, _final_metrics, rank)
    if finished:  # finished before: its result was reported again
        return
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        stopper.load_state_dict(json.loads(state["stopper"]))
        history = json.loads(state["history"])
        best_state = state["best_model"]
        start_epoch = int(state["epoch"]) + 1
        elapsed_before = float(state["seconds"])
        if rank == 0:
            print(
                f"split {config['split_index']}: resuming after epoch {start_epoch - 1}", flush=True
            )

    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    augmentation = Augmentation.from_config(config)
    on_device = augmentation.enabled and augment_on_device(config["augment_device"], device)
    segmentation = config["task"] == "segmentation"
    train_loader, sampler, val_loader, test_loader = _loaders(
        config, rank, world, None if on_device else augmentation
    )
    mlflow_client = worker_mlflow_client(config) if rank == 0 else None
    started = time.monotonic() - elapsed_before
    epoch = start_epoch - 1
    for epoch in range(start_epoch, config["epochs"] + 1):
        epoch_start = time.monotonic()
        sampler.set_epoch(epoch)
        ddp_model.train()
        loss_sum, seen = 0.0, 0
        inject_fault(config, epoch, rank, world, config["split_dir"])
        for image, target, index in train_loader:
            image, target = image.to(device), target.to(device)
            if on_device:  # each sample's draws as the loader would draw them (EpochSampler)
                draws = augmentation.draw_per_sample(config["seed"], epoch, index.tolist())
                image, mask = augmentation(image, target if segmentation else None, draws=draws)
                target = mask if segmentation else target
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config["_bf16"]):
                logits = ddp_model(image)
            loss = _loss(logits.float(), target, config).mean()  # RCKD Eqs. 5 and 7
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * int(target.shape[0])
            seen += int(target.shape[0])
        train_sums = (
            all_reduce_sum(torch.tensor([loss_sum, seen], dtype=torch.float64, device=device))
            .cpu()
            .tolist()
        )
        val_loss, val_confusion = _reduce_eval(
            evaluate(model, val_loader, config, device), device
        )  # Algorithm 2, line 13
        improved = stopper.step(epoch, val_loss)  # Algorithm 2, line 14
        if improved:
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        val = classification_metrics(val_confusion)
        row = {
            "epoch": epoch,
            "train_loss": train_sums[0] / max(train_sums[1], 1),
            "val_loss": val_loss,
            "val_accuracy": val.accuracy,
            "val_miou": val.miou,
            "val_macro_f1": val.macro_f1,
            "best_epoch": stopper.best_epoch,
            "best_val_loss": stopper.best_loss,
            "seconds": time.monotonic() - epoch_start,
        }
        history.append(row)
        if rank == 0:
            print(
                f"split {config['split_index']} epoch {epoch}/{config['epochs']}  train loss {row['train_loss']:.4f}  "
                f"val loss {val_loss:.4f} acc {val.accuracy:.3f} mIoU {val.miou:.3f}  best epoch {stopper.best_epoch}  "
                f"{row['seconds']:.1f} s",
                flush=True,
            )
            log_epoch_metrics(mlflow_client, config, row, epoch)
        stop = stopper.should_stop or epoch == config["epochs"]
        if not stop:
            _report_state(
                model,
                optimizer,
                stopper,
                history,
                best_state,
                epoch,
                time.monotonic() - started,
                rank,
                row,
            )

        if stop:
            break

    # Algorithm 2, line 15: the weights of the lowest validation loss, on the test split.
    if best_state is not None:
        model.load_state_dict(best_state)
    test_eval = evaluate(model, test_loader, config, device, keep_records=True)
    test_loss, test_confusion = _reduce_eval(test_eval, device)
    val_loss_best, val_confusion_best = _reduce_eval(
        evaluate(model, val_loader, config, device), device
    )
    records = all_gather(test_eval["records"])
    if rank != 0:
        ray.train.report({"epoch": epoch, "done": True}, checkpoint=None)
        return
    merged: dict[str, list] = {k: sum((r[k] for r in records), []) for k in records[0]}
    order = np.argsort(merged["index"], kind="stable")
    merged = {k: [v[i] for i in order] if v else [] for k, v in merged.items()}
    result = {
        "split": config["split_index"],
        "seed": config["seed"],
        "task": config["task"],
        "class_names": config["class_names"],
        "best_epoch": stopper.best_epoch,
        "stopped_epoch": epoch,
        "stopped_early": bool(stopper.should_stop),
        "best_val_loss": stopper.best_loss,
        "test_loss": test_loss,
        "val": classification_metrics(val_confusion_best).as_dict(),
        "val_loss_of_best": val_loss_best,
        "test": classification_metrics(test_confusion).as_dict(),
        "test_confusion": test_confusion.tolist(),
        "test_records": merged,
        "history": history,
        "positional_encoding_params": pe_count,
        "trainable_params": sum(p.numel() for p in trainable),
        "train_seconds": time.monotonic() - started,
        "sizes": {part: len(config["data"][part]["images"]) for part in ("train", "val", "test")},
    }
    if config["task"] == "classification":  # AUROC needs the probabilities, not the confusion
        from histokd.finetune.evaluation import single_class_predictions
        from histokd.metrics import auroc

        probability = np.asarray(merged["probability"], dtype=np.float64)
        result["test"]["auroc"] = float(auroc(np.asarray(merged["target"]), probability))
        result["single_class_predictions"] = single_class_predictions(result)
    if mlflow_client is not None:
        log_epoch_metrics(
            mlflow_client, config, {f"test_{k}": v for k, v in result["test"].items()}, epoch
        )
    with tempfile.TemporaryDirectory() as tmp:
        out = config.get("local_result_dir") or tmp  # local mode keeps no checkpoint copies
        os.makedirs(out, exist_ok=True)
        torch.save(
            {
                "model": model.state_dict(),
                "best_epoch": stopper.best_epoch,
                "config": _plain(config),
            },
            os.path.join(out, BEST_MODEL_FILE),
        )
        with open(os.path.join(out, RESULT_FILE), "w") as f:
            json.dump(result, f)
        seal_folder(out)  # checksums last: a resume trusts only a whole checkpoint
        ray.train.report(
            _final_metrics(result), checkpoint=ray.train.Checkpoint.from_directory(out)
        )


def _final_metrics(result: dict) -> dict[str, Any]:
    metrics = {f"test_{k}": v for k, v in result["test"].items()}
    metrics.update(epoch=result["stopped_epoch"], best_epoch=result["best_epoch"], done=True)
    return metrics


def _report_state(
    model, optimizer, stopper, history, best_state, epoch, seconds, rank, row
) -> None:
    """Report the epoch; rank 0 attaches the state a restarted split continues from."""

    def state():
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "stopper": json.dumps(stopper.state_dict()), "history": json.dumps(history),
                "best_model": best_state, "epoch": epoch, "seconds": seconds}  # fmt: skip

    metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))}
    report_checkpoint(metrics, state, STATE_FILE, rank)


def _plain(config: dict) -> dict:
    """The config without the sample lists (they can be large)."""
    return {k: v for k, v in config.items() if k != "data"}
