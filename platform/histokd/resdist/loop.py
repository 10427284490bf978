"""The Ray Train worker loop of every resolution-distillation phase (DiPalma Sec. 3.1).

``supervised``: cross-entropy (teacher, Sec. 3.2; baseline, 4.5.2); ``distill``: soft plus pixel
loss against the frozen teacher, labels ignored (Sec. 3.3, Eqs. 1-3); ``finetune``: the last layer
alone (Sec. 3.4). One image per forward pass, gradients accumulated (Sec. 3.5); checkpoints by
:func:`histokd.resume.report_checkpoint`, the last one with ``model.pt`` and ``result.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histokd.resdist.model import create_resdist_model, load_model_file, save_model_file
from histokd.resume import report_checkpoint, restore_checkpoint, write_text_atomic
from histokd.run import all_reduce_sum
from histokd.tracking import log_epoch_metrics, worker_mlflow_client

__all__ = ["MODEL_FILE", "RESULT_FILE", "GradientAccumulator", "train_fn_per_worker"]

MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"
RESULT_FILE = "result.json"
_SUMS = ("loss", "soft", "pixel", "correct", "labelled", "count")


class GradientAccumulator:
    """Sums single-image gradients and steps the optimizer every ``steps`` images (Sec. 3.5).

    Each image's loss is divided by ``steps`` (as the public code does), so a full group gives
    the gradient of its mean loss, which with GroupNorm (no mixing of images) is the batch's.
    A last, shorter group is rescaled to its own mean before its step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, steps: int) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"accumulation steps={steps!r}: must be a positive integer")
        self.optimizer, self.steps, self.pending, self.num_steps = optimizer, steps, 0, 0

    @property
    def closes_group(self) -> bool:  # the next image completes a group: DDP synchronises
        return self.pending + 1 >= self.steps

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.steps).backward()
        self.pending += 1
        if self.pending >= self.steps:
            self.step()

    def step(self) -> bool:
        """Step on what has accumulated; False when nothing was pending."""
        if self.pending == 0:
            return False
        for p in (p for g in self.optimizer.param_groups for p in g["params"]):
            if p.grad is not None and self.pending < self.steps:
                p.grad.mul_(self.steps / self.pending)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending, self.num_steps = 0, self.num_steps + 1
        return True

    def state_dict(self) -> dict[str, int]:
        return {"pending": self.pending, "num_steps": self.num_steps}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.pending, self.num_steps = int(state["pending"]), int(state["num_steps"])


class _PhaseLoss(nn.Module):
    """One image's loss in its phase: ``(loss, its parts, logits)``; what DDP wraps."""

    def __init__(self, model: nn.Module, teacher: nn.Module | None, config: dict[str, Any]):
        super().__init__()
        self.model, self.kd, self.teacher = model, None, [teacher]  # the teacher: no submodule
        if teacher is not None:
            from histokd.losses.resolution_kd import ResolutionKDLoss

            keys = ("temperature", "resize_modes", "distance", "public_code_maxpool_only")
            self.kd = ResolutionKDLoss(*(config[k] for k in keys))

    def forward(self, images: list[torch.Tensor], label: int):
        device = next(self.model.parameters()).device
        if self.kd is None:
            logits = self.model(images[0][None].to(device))
            return F.cross_entropy(logits, torch.tensor([label], device=device)), {}, logits
        with torch.no_grad():
            target = self.teacher[0].forward_distill(images[0][None].to(device))
        hint, logits = self.model.forward_distill(images[1][None].to(device))
        terms = self.kd((hint, logits), target)
        return terms.total, {"soft": terms.soft.item(), "pixel": terms.pixel.item()}, logits


def _build(config: dict[str, Any], device: torch.device):
    """(network, the frozen teacher or None, hint channels the network was built with)."""
    if config["phase"] == "finetune":
        model, meta = load_model_file(config["init"], device)
        head = {id(p) for p in model.get_classifier().parameters()}
        for p in model.parameters():  # Sec. 3.4: every weight frozen but the last layer's
            p.requires_grad_(id(p) in head)
        return model.train(), None, meta["resdist"]["hint_channels"]
    teacher = hint = None
    if config["phase"] == "distill":
        teacher, _ = load_model_file(config["teacher"], device)  # eval mode
        teacher.requires_grad_(False)  # Sec. 4.5.3: the teacher is frozen
        hint = teacher.hint_channels
    num_classes = config["meta"]["num_classes"]
    model = create_resdist_model(config["backbone"], num_classes, hint_channels=hint, num_groups=config["num_groups"])  # fmt: skip
    return model.to(device), teacher, hint


def _items(dataset, order: list[int], workers: int):
    """The items in ``order``, decoded and augmented here or by ``workers`` loader processes."""
    if workers == 0:
        return (dataset[i] for i in order)
    # batch_size None: single, variable-size items; new processes each epoch see its set_epoch
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=order, num_workers=workers, persistent_workers=False)  # fmt: skip


def _pass(net, dataset, order, kd: bool, workers=0, accumulator=None) -> dict[str, float]:
    """Mean loss (its parts with ``kd``) and accuracy over ``order`` on all workers; trains
    with an ``accumulator``."""
    sums = dict.fromkeys(_SUMS, 0.0)
    no_sync = getattr(net, "no_sync", None)  # DDP: synchronise only when a group closes
    with torch.set_grad_enabled(accumulator is not None):
        for i, item in enumerate(_items(dataset, order, workers)):
            sync = accumulator is None or accumulator.closes_group or i == len(order) - 1
            with no_sync() if no_sync and not sync else contextlib.nullcontext():
                loss, parts, logits = net(item["images"], item["label"])
                if accumulator is not None:
                    accumulator.backward(loss)
            parts.update(loss=loss.item(), count=1.0)
            if item["label"] >= 0:
                parts.update(labelled=1.0, correct=float(int(logits.argmax(1)) == item["label"]))
            for key, value in parts.items():
                sums[key] += value
    device = next(net.parameters()).device
    totals = dict(zip(_SUMS, all_reduce_sum(list(sums.values()), device), strict=True))
    keys = ("loss", "soft", "pixel") if kd else ("loss",)
    out = {k: totals[k] / totals["count"] for k in keys if totals["count"]}
    if totals["labelled"]:
        out["accuracy"] = totals["correct"] / totals["labelled"]
    return out


def _final_metrics(result: dict[str, Any]) -> dict[str, Any]:
    last = result["history"][-1] if result["history"] else {}
    metrics = {k: v for k, v in last.items() if isinstance(v, (int, float))}
    return dict(metrics, kept_epoch=result["kept_epoch"], done=True)


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function of one phase; ``config`` is the job's config and what the
    driver (``histokd.resdist.job``) added: ``phase``, ``views`` (magnification tags: ``[student]``
    or ``[teacher, student]``), ``stats`` by tag, ``data`` (``train`` and ``val`` items), ``init``
    (finetune), ``select``, ``cache_images``, ``meta`` (the model file's config), the MLflow run."""
    from histokd.cluster import quiet_train_reports

    quiet_train_reports()
    import ray.train
    import ray.train.torch

    from histokd.resdist.dataset import ColorJitter, RegionImages

    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    torch.manual_seed(config["seed"])
    name, epochs, seed = config["run_name"], config["epochs"], config["seed"]
    model, teacher, hint = _build(config, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config["lr"], weight_decay=config["weight_decay"])
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config["lr_gamma"])
    # DDP averages the workers' gradients: each accumulates its share of the effective batch
    accumulator = GradientAccumulator(optimizer, max(1, config["accumulation_steps"] // world))
    parts = dict(model=model, optimizer=optimizer, scheduler=scheduler, accumulator=accumulator)
    progress = dict(history=[], best_state=None, best_loss=math.inf, best_epoch=0, epoch=0, seconds=0.0)  # fmt: skip
    finished, state = restore_checkpoint(STATE_FILE, RESULT_FILE, _final_metrics, rank)
    if finished:  # finished before: its result was reported again
        return
    if state is not None:
        for key, part in parts.items():
            part.load_state_dict(state.pop(key))
        progress = state
        if rank == 0:
            print(f"{name}: resuming after epoch {progress['epoch']}", flush=True)

    kd = teacher is not None
    net = _PhaseLoss(model, teacher, config)
    train_net = ray.train.torch.prepare_model(net, move_to_device=False) if world > 1 else net
    views, stats, data = config["views"], config["stats"], config["data"]
    jitter = ColorJitter(*(config[k] for k in ("brightness", "contrast", "saturation", "hue")))
    # decoded images stay in memory where the driver found they fit and no loader processes
    # decode them (those would lose their copies every epoch)
    cache = config["cache_images"] and config["loader_workers"] == 0
    train_set = RegionImages(data["train"], views, stats, config["augment"], jitter, seed, cache)
    val_set = RegionImages(data["val"], views, stats, cache=cache)
    val_order = list(range(rank, len(val_set), world))  # no padding: every image once
    mlflow_client = worker_mlflow_client(config) if rank == 0 else None
    started = time.monotonic() - progress["seconds"]
    epoch = progress["epoch"]
    for epoch in range(progress["epoch"] + 1, epochs + 1):
        epoch_start = time.monotonic()
        train_set.set_epoch(epoch)
        train_net.train()
        # this worker's shuffled images, padded so every worker has as many
        order = np.random.default_rng([seed, epoch]).permutation(len(train_set))
        if world > 1 and len(order) % world:
            order = np.concatenate([order, order[: world - len(order) % world]])
        order = order[rank::world].tolist()
        train = _pass(train_net, train_set, order, kd, config["loader_workers"], accumulator)
        accumulator.step()  # the epoch's last, shorter group
        scheduler.step()
        net.eval()
        val = _pass(net, val_set, val_order, kd) if len(val_set) else {}
        row = {"epoch": epoch, **{f"train_{k}": v for k, v in train.items()},
               "lr": optimizer.param_groups[0]["lr"], "optimizer_steps": accumulator.num_steps,
               "seconds": time.monotonic() - epoch_start, **{f"val_{k}": v for k, v in val.items()}}  # fmt: skip
        # plain Python numbers: the state is reloaded with weights_only=True, which refuses numpy's
        row = {k: v if isinstance(v, int) else float(v) for k, v in row.items()}
        if val.get("loss", math.inf) < progress["best_loss"]:
            best = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            progress.update(best_loss=val["loss"], best_epoch=epoch, best_state=best)
        progress["history"].append(row)
        progress.update(epoch=epoch, seconds=time.monotonic() - started)
        if rank == 0:
            shown = [f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "optimizer_steps", "lr")]  # fmt: skip
            print(f"{name} epoch {epoch}/{epochs}  " + "  ".join(shown), flush=True)
            prefix = config.get("metric_prefix", "")
            log_epoch_metrics(mlflow_client, config, {prefix + k: v for k, v in row.items()}, epoch)
        if epoch < epochs:  # rank 0 attaches the state to continue from (local mode keeps none)
            state = lambda: {k: v.state_dict() for k, v in parts.items()} | progress  # noqa: E731
            report_checkpoint(row, state, STATE_FILE, -1 if config.get("local_result_dir") else rank)  # fmt: skip

    use_best = config["select"] == "best" and progress["best_state"] is not None
    if use_best:
        model.load_state_dict(progress["best_state"])
    kept, best_loss = (progress["best_epoch"] if use_best else epoch), progress["best_loss"]
    meta = dict(config["meta"], phase=config["phase"], resdist={"num_groups": config["num_groups"], "hint_channels": hint})  # fmt: skip
    result = {
        "run_name": name, "phase": config["phase"], "kept_epoch": kept,
        "selected": "best" if use_best else "last", "history": progress["history"],
        "best_val_loss": best_loss if math.isfinite(best_loss) else None,
        "train_seconds": time.monotonic() - started, "sizes": {k: len(v) for k, v in data.items()},
        "trainable_params": sum(p.numel() for p in trainable),
    }  # fmt: skip

    def write_files(folder: str) -> None:  # the result last: a folder with it is finished
        save_model_file(os.path.join(folder, MODEL_FILE), model, meta, kept)
        write_text_atomic(os.path.join(folder, RESULT_FILE), json.dumps(result))

    local = config.get("local_result_dir")  # local mode keeps no checkpoints: the driver reads it
    if local:
        write_files(local)
    # a finished run's checkpoint: the model and its result (a restart reports them again)
    report_checkpoint(_final_metrics(result), dict, STATE_FILE, -1 if local else rank, write_files)
