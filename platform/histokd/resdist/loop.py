"""The per-worker training loop of every resolution-distillation phase (Ray Train).

One function, three phases (DiPalma Sec. 3.1):

* ``supervised``: cross-entropy with Adam on labelled regions at one magnification: the
  teacher at high magnification (Sec. 3.2, 4.5.1) or a baseline from scratch at a low one
  (Sec. 4.5.2);
* ``distill``: the student at a low magnification learns from the frozen, eval-mode teacher
  on the same regions at the teacher's magnification, labels ignored: soft loss plus pixel loss
  (Sec. 3.3, Eqs. 1-3), on the labelled set (KD, Sec. 4.5.3) or an unlabelled auxiliary set
  (KD (AD), Sec. 4.5.4);
* ``finetune``: only the student's final layer is trained, with Adam and cross-entropy, on the
  labelled set at the student's magnification (Sec. 3.4).

Images go through the network one at a time, and gradients are accumulated over
``accumulation_steps`` images (Sec. 3.5). With several workers the images of an epoch are
shared out, each worker accumulates ``accumulation_steps // workers`` of them, DDP synchronises
only on the backward pass that closes a group, and every worker steps on the mean over the
whole group. Rank 0 reports each epoch with a checkpoint (model,
optimizer, accumulator, history, best weights), so a restarted run continues where it was; the
last report carries ``model.pt`` and ``result.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histokd.resdist.training import (
    MODEL_FILE,
    GradientAccumulator,
    feature_channels,
    load_model_file,
    save_model_file,
)
from histokd.resume import restore_checkpoint
from histokd.tracking import log_epoch_metrics, worker_mlflow_client

__all__ = ["PHASES", "RESULT_FILE", "STATE_FILE", "train_fn_per_worker"]

log = logging.getLogger(__name__)

PHASES = ("supervised", "distill", "finetune")
STATE_FILE = "state.pt"
RESULT_FILE = "result.json"


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.cpu().tolist()


def _shard(n: int, epoch: int, seed: int, rank: int, world: int, shuffle: bool) -> list[int]:
    """This worker's image order for the epoch; padded so every worker has as many images."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    if world > 1 and n % world:
        order = np.concatenate([order, order[: world - n % world]])
    return order[rank::world].tolist()


def _trainable_parameters(model: nn.Module, phase: str) -> list[nn.Parameter]:
    if phase != "finetune":
        return list(model.parameters())
    # Sec. 3.4: every weight frozen except those of the fully connected layer.
    classifier = model.get_classifier()
    head = {id(p) for p in classifier.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in head)
    return [p for p in model.parameters() if p.requires_grad]


class _Step:
    """The loss of one image in the configured phase."""

    def __init__(self, config: dict[str, Any], teacher: nn.Module | None) -> None:
        from histokd.losses.resolution_kd import ResolutionKDLoss

        self.phase = config["phase"]
        self.teacher = teacher
        self.kd = (
            ResolutionKDLoss(config["temperature"], config["resize_modes"], config["distance"], config["public_code_maxpool_only"])
            if self.phase == "distill" else None
        )  # fmt: skip

    def __call__(
        self, model: nn.Module, images: list[torch.Tensor], label: int, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        """(loss, its parts, student logits) for one item."""
        if self.phase == "distill":
            teacher_image, student_image = images[0][None].to(device), images[1][None].to(device)
            with torch.no_grad():
                teacher_out = self.teacher(teacher_image)
            student_out = model(student_image)
            terms = self.kd(student_out, teacher_out)
            return (
                terms.total,
                {"soft": float(terms.soft.detach()), "pixel": float(terms.pixel.detach())},
                student_out[1].detach(),
            )
        _, logits = model(images[0][None].to(device))
        loss = F.cross_entropy(logits, torch.tensor([label], device=device))
        return loss, {}, logits.detach()


def _build(
    config: dict[str, Any], device: torch.device
) -> tuple[nn.Module, nn.Module | None, dict[str, Any] | None]:
    """(model, frozen teacher or None, teacher meta or None)."""
    from histokd.resdist.model import create_resdist_model

    phase = config["phase"]
    teacher, teacher_meta = None, None
    hint = None
    if phase == "distill":
        teacher, teacher_meta = load_model_file(config["teacher"], device)
        teacher.eval()  # Sec. 4.5.3: the teacher's weights are frozen
        for p in teacher.parameters():
            p.requires_grad_(False)
        hint = feature_channels(teacher)
    if phase == "finetune":
        model, init_meta = load_model_file(config["init"], device)
        model.train()
        return model, None, init_meta
    model = create_resdist_model(
        config["arch"], config["num_classes"], hint_channels=hint, num_groups=config["num_groups"]
    )
    return model.to(device), teacher, teacher_meta


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function of one phase.

    Args:
        config: What the driver resolved (see ``histokd.resdist.job``): ``phase``, ``arch``,
            ``num_classes``, ``num_groups``, ``views`` (magnification tags of the images:
            ``[student]`` or ``[teacher, student]``), ``stats`` by tag, ``data``
            (``{"train": items, "val": items}``), ``teacher`` (distill) or ``init`` (finetune)
            model files, the training settings, ``select``, ``meta`` (written into the model
            file), and optionally ``mlflow_run_id``, ``tracking_uri`` and ``local_result_dir``.
    """
    from histokd.cluster import quiet_train_reports

    quiet_train_reports()
    import ray.train
    import ray.train.torch

    from histokd.resdist.dataset import ColorJitter, RegionImages

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    torch.manual_seed(config["seed"])
    phase = config["phase"]
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r}: allowed: {', '.join(PHASES)}")

    model, teacher, source_meta = _build(config, device)
    trainable = _trainable_parameters(model, phase)
    optimizer = torch.optim.Adam(trainable, lr=config["lr"], weight_decay=config["weight_decay"])
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config["lr_gamma"])
    # the effective batch is accumulation_steps images over all workers (DDP averages the workers'
    # gradients), so each worker accumulates its share
    accumulator = GradientAccumulator(
        optimizer, max(1, config["accumulation_steps"] // world), trainable
    )
    history: list[dict[str, Any]] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_loss = math.inf
    best_epoch = 0
    start_epoch, elapsed_before = 1, 0.0

    finished, state = restore_checkpoint(STATE_FILE, RESULT_FILE, _final_metrics, rank)
    if finished:  # finished before: its result was reported again
        return
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        accumulator.load_state_dict(state["accumulator"])
        history, best_state, best_loss, best_epoch = (
            state["history"],
            state["best_state"],
            state["best_loss"],
            state["best_epoch"],
        )
        start_epoch = int(state["epoch"]) + 1
        elapsed_before = float(state["seconds"])
        if rank == 0:
            print(f"{config['run_name']}: resuming after epoch {start_epoch - 1}", flush=True)

    train_model = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    jitter = ColorJitter(
        config["brightness"], config["contrast"], config["saturation"], config["hue"]
    )
    views = config["views"]
    # decoded images are kept in memory when the driver found they fit (cache_images) and no
    # loader processes decode them (those would lose their copies every epoch)
    cache = bool(config.get("cache_images", False)) and config["loader_workers"] == 0
    train_set = RegionImages(config["data"]["train"], views, config["stats"], augment=config["augment"], jitter=jitter,
                             seed=config["seed"], cache=cache)  # fmt: skip
    val_set = RegionImages(
        config["data"].get("val", []), views, config["stats"], augment=False, cache=cache
    )
    step_loss = _Step(config, teacher)
    mlflow_client = worker_mlflow_client(config) if rank == 0 else None
    started = time.monotonic() - elapsed_before
    epoch = start_epoch - 1
    for epoch in range(start_epoch, config["epochs"] + 1):
        epoch_start = time.monotonic()
        train_set.set_epoch(epoch)
        train_model.train()
        shard = _shard(len(train_set), epoch, config["seed"], rank, world, shuffle=True)
        sums = {
            "loss": 0.0,
            "soft": 0.0,
            "pixel": 0.0,
            "correct": 0.0,
            "labelled": 0.0,
            "count": 0.0,
        }
        for i, item in enumerate(_items(train_set, shard, config["loader_workers"])):
            sync = accumulator.closes_group or i == len(shard) - 1
            no_sync = train_model.no_sync() if world > 1 and not sync else contextlib.nullcontext()
            with no_sync:
                loss, parts, logits = step_loss(train_model, item["images"], item["label"], device)
                accumulator.backward(loss)
            _accumulate(sums, float(loss.detach()), parts, logits, item["label"])
        accumulator.step()  # the epoch's last, shorter group
        scheduler.step()
        train = _all_reduce([sums[k] for k in sums], device)
        train = dict(zip(sums, train, strict=True))
        val = _validate(model, val_set, step_loss, device, rank, world)
        row = {
            "epoch": epoch,
            "train_loss": train["loss"] / max(train["count"], 1),
            "lr": optimizer.param_groups[0]["lr"],
            "optimizer_steps": accumulator.num_steps,
            "seconds": time.monotonic() - epoch_start,
        }
        if phase == "distill":
            row.update(
                train_soft=train["soft"] / max(train["count"], 1),
                train_pixel=train["pixel"] / max(train["count"], 1),
            )
        if train["labelled"]:
            row["train_accuracy"] = train["correct"] / train["labelled"]
        row.update(val)
        # plain Python numbers: the state is reloaded with torch.load(weights_only=True), which refuses numpy scalars
        row = {k: v if isinstance(v, int) else float(v) for k, v in row.items()}
        if "val_loss" in val and val["val_loss"] < best_loss:
            best_loss, best_epoch = val["val_loss"], epoch
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        history.append(row)
        if rank == 0:
            shown = "  ".join(
                f"{k} {v:.4g}"
                for k, v in row.items()
                if k not in ("epoch", "optimizer_steps", "lr")
            )
            print(f"{config['run_name']} epoch {epoch}/{config['epochs']}  {shown}", flush=True)
            prefix = config.get("metric_prefix", "")
            log_epoch_metrics(
                mlflow_client, config, {f"{prefix}{k}": v for k, v in row.items()}, epoch
            )
        if epoch < config["epochs"]:
            _report_state(config, model, optimizer, scheduler, accumulator, history, best_state, best_loss, best_epoch,
                          epoch, time.monotonic() - started, rank, row)  # fmt: skip

    use_best = config["select"] == "best" and best_state is not None
    if use_best:
        model.load_state_dict(best_state)
    if rank != 0:
        ray.train.report({"epoch": epoch, "done": True}, checkpoint=None)
        return
    meta = dict(config["meta"])
    meta.update(
        arch=meta.get("arch", config["arch"]), num_classes=config["num_classes"], num_groups=config["num_groups"],
        stats=config["stats"][views[-1]], view=views[-1], phase=phase, epoch=best_epoch if use_best else epoch,
        hint_channels=feature_channels(teacher) if teacher is not None else (source_meta or {}).get("hint_channels"),
    )  # fmt: skip
    if phase == "distill":
        meta["teacher"] = config["teacher"]
    result = {
        "run_name": config["run_name"],
        "phase": phase,
        "kept_epoch": meta["epoch"],
        "selected": "best" if use_best else "last",
        "best_val_loss": best_loss if math.isfinite(best_loss) else None,
        "history": history,
        "train_seconds": time.monotonic() - started,
        "sizes": {part: len(items) for part, items in config["data"].items()},
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = config.get("local_result_dir") or tmp  # local mode keeps no checkpoint copies
        os.makedirs(out, exist_ok=True)
        save_model_file(os.path.join(out, MODEL_FILE), model, meta)
        with open(os.path.join(out, RESULT_FILE), "w") as f:
            json.dump(result, f)
        ray.train.report(
            _final_metrics(result), checkpoint=ray.train.Checkpoint.from_directory(out)
        )


def _items(dataset, order: list[int], workers: int):
    """The items in ``order``, decoded and augmented here or by ``workers`` loader processes."""
    if workers == 0:
        return (dataset[i] for i in order)
    # batch_size None: single, variable-size items; new processes each epoch see its set_epoch
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=order, num_workers=workers, persistent_workers=False
    )


def _accumulate(
    sums: dict[str, float], loss: float, parts: dict[str, float], logits: torch.Tensor, label: int
) -> None:
    sums["loss"] += loss
    sums["count"] += 1
    for key, value in parts.items():
        sums[key] += value
    if label >= 0:
        sums["labelled"] += 1
        sums["correct"] += float(int(logits.argmax(1)) == label)


@torch.no_grad()
def _validate(
    model: nn.Module, val_set, step_loss: _Step, device: torch.device, rank: int, world: int
) -> dict[str, float]:
    """Validation loss (the phase's loss) and accuracy where labelled, over all workers."""
    if len(val_set) == 0:
        return {}
    model.eval()
    sums = {"loss": 0.0, "soft": 0.0, "pixel": 0.0, "correct": 0.0, "labelled": 0.0, "count": 0.0}
    for index in range(rank, len(val_set), world):  # no padding: every image once
        item = val_set[index]
        if step_loss.phase != "distill" and item["label"] < 0:
            continue
        loss, parts, logits = step_loss(model, item["images"], item["label"], device)
        _accumulate(sums, float(loss), parts, logits, item["label"])
    totals = dict(zip(sums, _all_reduce(list(sums.values()), device), strict=True))
    model.train()
    out = {}
    if totals["count"]:
        out["val_loss"] = totals["loss"] / totals["count"]
        if step_loss.phase == "distill":
            out["val_soft"] = totals["soft"] / totals["count"]
            out["val_pixel"] = totals["pixel"] / totals["count"]
    if totals["labelled"]:
        out["val_accuracy"] = totals["correct"] / totals["labelled"]
    return out


def _final_metrics(result: dict[str, Any]) -> dict[str, Any]:
    last = result["history"][-1] if result["history"] else {}
    metrics = {k: v for k, v in last.items() if isinstance(v, (int, float))}
    metrics.update(kept_epoch=result["kept_epoch"], done=True)
    return metrics


def _report_state(
    config,
    model,
    optimizer,
    scheduler,
    accumulator,
    history,
    best_state,
    best_loss,
    best_epoch,
    epoch,
    seconds,
    rank,
    row,
) -> None:
    """Report the epoch; rank 0 attaches the state a restarted run continues from."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0 and not config.get("local_result_dir"):
            torch.save(
                {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "accumulator": accumulator.state_dict(), "history": history, "best_state": best_state,
                    "best_loss": best_loss, "best_epoch": best_epoch, "epoch": epoch, "seconds": seconds,
                },
                os.path.join(tmp, STATE_FILE),
            )  # fmt: skip
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(
            {k: v for k, v in row.items() if isinstance(v, (int, float))}, checkpoint=checkpoint
        )
