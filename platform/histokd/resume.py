"""Checkpoints of Ray Train worker functions: one style for every training loop.

Each epoch, :func:`report_checkpoint` reports the epoch's metrics with a checkpoint whose
``state_file`` holds a torch file of plain values (rank 0 writes it, with any other files of the
epoch). Once a run is done, a loop may report its final result (``result_file``, JSON) too. A
restarted worker group starts the function again, and :func:`restore_checkpoint` gives it what
to continue from: the saved state, or the finished result reported again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

__all__ = ["inject_fault", "report_checkpoint", "restore_checkpoint"]


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


def report_checkpoint(
    metrics: dict[str, Any],
    state: Callable[[], dict[str, Any]],
    state_file: str,
    rank: int,
    write_files: Callable[[str], None] | None = None,
) -> None:
    """Report an epoch; rank 0 attaches a checkpoint of ``state()`` (and ``write_files(folder)``).

    Args:
        metrics: The epoch's metrics (every worker reports).
        state: Builds the state to continue from (called on rank 0 only).
        state_file: Its file name in the checkpoint.
        rank: This worker's world rank.
        write_files: Writes more files of the epoch into the checkpoint folder (rank 0).
    """
    import tempfile

    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            torch.save(state(), os.path.join(tmp, state_file))
            if write_files is not None:
                write_files(tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def restore_checkpoint(
    state_file: str,
    result_file: str | None = None,
    final_metrics: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    rank: int = 0,
) -> tuple[bool, dict[str, Any] | None]:
    """The state to continue from, or the finished run's result reported again.

    Args:
        state_file: Name of the per-epoch state file in a checkpoint.
        result_file: Name of the final result file in a checkpoint, if the loop writes one.
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
        result_path = os.path.join(d, result_file) if result_file else ""
        if result_path and os.path.exists(result_path):
            with open(result_path) as f:
                result = json.load(f)
            ray.train.report(
                final_metrics(result),
                checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None,
            )
            return True, None
        return False, torch.load(os.path.join(d, state_file), map_location="cpu", weights_only=True)
