"""Gradient accumulation over single images, and the model files every phase writes and reads.

DiPalma Sec. 3.5: regions are large and of different sizes, so each image gets its own forward
and backward pass and the gradients are summed until an optimizer step; the public code divides
each image's loss by the effective batch (32) and steps every 32 images
(``../shared/RESOLUTION_KD.md``). Because the network normalises with GroupNorm, which never
mixes images, the accumulated gradient equals that of the batch-mean loss.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "MODEL_FILE",
    "GradientAccumulator",
    "feature_channels",
    "load_model_file",
    "save_model_file",
]

MODEL_FILE = "model.pt"


class GradientAccumulator:
    """Sums single-image gradients and steps the optimizer every ``steps`` images.

    Each image's loss is divided by ``steps`` before its backward pass, so a full group gives
    the gradient of the group's mean loss. A last, shorter group (end of an epoch) is rescaled
    to its own mean before the step, so every step sees a mean gradient.

    Args:
        optimizer: The optimizer.
        steps: Images per optimizer step (public code: 32).
        parameters: The parameters whose gradients are rescaled for a short group
            (default: all of the optimizer's).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        steps: int,
        parameters: Iterable[nn.Parameter] | None = None,
    ) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"accumulation steps={steps!r}: must be a positive integer")
        self.optimizer = optimizer
        self.steps = steps
        self.parameters = (
            list(parameters)
            if parameters is not None
            else [p for g in optimizer.param_groups for p in g["params"]]
        )
        self.pending = 0
        self.num_steps = 0

    @property
    def closes_group(self) -> bool:
        """Whether the next image completes a group (DDP must synchronise on its backward)."""
        return self.pending + 1 >= self.steps

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one image's loss, scaled by 1 / steps; steps when the group is full."""
        (loss / self.steps).backward()
        self.pending += 1
        if self.pending >= self.steps:
            self.step()

    def step(self) -> bool:
        """Step on what has accumulated (a short group is rescaled to its mean).

        Returns:
            Whether a step was taken (False when nothing was pending).
        """
        if self.pending == 0:
            return False
        if self.pending < self.steps:
            factor = self.steps / self.pending
            for p in self.parameters:
                if p.grad is not None:
                    p.grad.mul_(factor)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending = 0
        self.num_steps += 1
        return True

    def state_dict(self) -> dict[str, int]:
        """Pending images and steps taken, for checkpoints."""
        return {"pending": self.pending, "num_steps": self.num_steps}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore :meth:`state_dict`."""
        self.pending = int(state["pending"])
        self.num_steps = int(state["num_steps"])


def feature_channels(model: nn.Module) -> int:
    """Channels of the feature map a (feature map, logits) model returns."""
    adapter = getattr(model, "adapter", None)
    if isinstance(adapter, nn.Conv2d):
        return int(adapter.out_channels)
    inner = getattr(model, "model", model)
    return int(inner.num_features)


def save_model_file(path: str | os.PathLike, model: nn.Module, meta: Mapping[str, Any]) -> Path:
    """Write the weights and what is needed to rebuild and use them.

    ``meta`` holds at least ``arch``, ``num_classes``, ``hint_channels``, ``num_groups``,
    ``magnification`` and ``stats`` (the input standardisation).
    """
    for key in ("arch", "num_classes", "magnification", "stats"):
        if key not in meta:
            raise ValueError(f"save_model_file: meta lacks {key!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"meta": dict(meta), "state_dict": state}, tmp)
    os.replace(tmp, path)
    return path


def load_model_file(
    path: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model written by :func:`save_model_file`; returns it (eval mode) and its meta.

    Raises:
        FileNotFoundError: No such file.
    """
    from histokd.resdist.model import create_resdist_model

    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file {path}: not found")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    meta = payload["meta"]
    model = create_resdist_model(
        meta["arch"],
        meta["num_classes"],
        hint_channels=meta.get("hint_channels"),
        num_groups=meta.get("num_groups", 32),
    )
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), meta
