"""Restarting a Ray Train worker function from its last checkpoint.

The fine-tuning and resolution-distillation loops save, each epoch, a torch file of plain
values (``state_file``) and, once a run is done, its final result (``result_file``, JSON). A
restarted worker group starts the function again; :func:`restore_checkpoint` gives it what to
continue from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

__all__ = ["inject_fault", "restore_checkpoint"]


def inject_fault(config: dict[str, Any], epoch: int, rank: int, world: int, folder: str) -> None:
    """Test aid (``fail_at_epoch``): the last worker raises once in that epoch of a run.

    A ``.fault_injected`` marker in ``folder`` (shared by the workers and their restarts) makes
    it happen once, so the restarted worker group goes on from the last checkpoint.
    """
    if config.get("fail_at_epoch") != epoch or rank != world - 1:
        return
    marker = os.path.join(folder, ".fault_injected")
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError(f"injected fault (fail_at_epoch={epoch}), worker rank {rank}")


def restore_checkpoint(
    state_file: str,
    result_file: str,
    final_metrics: Callable[[dict[str, Any]], dict[str, Any]],
    rank: int,
) -> tuple[bool, dict[str, Any] | None]:
    """The state to continue from, or the finished run's result reported again.

    Args:
        state_file: Name of the per-epoch state file in a checkpoint.
        result_file: Name of the final result file in a checkpoint.
        final_metrics: Turns the final result into the metrics to report.
        rank: This worker's world rank (rank 0 reports the checkpoint again).

    Returns:
        ``(finished, state)``: ``finished`` when the last checkpoint holds the final result,
        which was reported again here, so the caller returns at once; otherwise ``state`` is the
        saved state (``torch.load(..., weights_only=True)``), or None with no checkpoint.
    """
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return False, None
    with checkpoint.as_directory() as d:
        result_path = os.path.join(d, result_file)
        if os.path.exists(result_path):
            with open(result_path) as f:
                result = json.load(f)
            ray.train.report(
                final_metrics(result),
                checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None,
            )
            return True, None
        return False, torch.load(os.path.join(d, state_file), map_location="cpu", weights_only=True)
