"""One plan for every Ray Data stream of slide patches: how many model actors, and the CPU and
GPU shares of actors and read tasks. The teacher stream of pretraining
(:mod:`histokd.teachers.stream`) and whole-slide inference (:mod:`histokd.inference.stream`)
size themselves here, and read patches through :func:`worker_patch_reader`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["StreamResources", "plan_resources", "worker_patch_reader"]

_PATCH_READER = None


def worker_patch_reader(max_open: int = 8):
    """This worker process's :class:`histokd.manifest.PatchReader`, which keeps recently
    used slides open between Ray Data tasks."""
    global _PATCH_READER
    if _PATCH_READER is None:
        from histokd.manifest import PatchReader

        _PATCH_READER = PatchReader(max_open=max_open)
    return _PATCH_READER


@dataclass(frozen=True)
class StreamResources:
    """How the stream uses the cluster.

    Attributes:
        num_actors: Model actors in the pool (0: the teacher runs in the training workers).
        actor_cpus: CPUs each actor reserves (fractional).
        actor_gpus: GPU share of each actor (0 on a CPU cluster).
        read_cpus: CPUs each read task reserves (fractional).
        intra_op_threads: TensorFlow CPU threads per actor.
    """

    num_actors: int
    actor_cpus: float
    actor_gpus: float
    read_cpus: float
    intra_op_threads: int


def plan_resources(
    cluster: dict[str, float],
    num_actors: int | None = None,
    num_gpus: float = 0.5,
    reserved_cpus: float = 0.0,
    placement: Literal["actors", "trainer"] = "actors",
) -> StreamResources:
    """Size the model-actor pool and the CPU shares from the cluster's resources.

    Half the CPUs left after ``reserved_cpus`` go to the actors, half to one read task's
    worth of reading, each share at most one CPU. Every share is fractional, so the stream
    always fits beside the training workers: on 2 CPUs with one worker reserving 1, an actor
    takes 0.5 and a read task 0.5. With ``placement="trainer"`` the teacher runs in the
    training workers: no actors and no GPU for the stream, and read tasks of the same size
    share the CPUs left (two at a time on that 2-CPU machine).

    Args:
        cluster: ``ray.cluster_resources()``.
        num_actors: Pool size; None: one per GPU (by ``num_gpus`` share), one on a CPU cluster.
        num_gpus: GPU share per actor when the cluster has GPUs; ignored without GPUs.
        reserved_cpus: CPUs the caller keeps for itself (training workers).
        placement: ``"actors"`` (a teacher actor pool) or ``"trainer"`` (none).

    Raises:
        ValueError: No CPU is left for the stream, or the GPU settings are impossible.
    """
    cpus = float(cluster.get("CPU", 0.0))
    gpus = float(cluster.get("GPU", 0.0))
    free = cpus - float(reserved_cpus)
    if free <= 0.05:
        raise ValueError(
            f"reserved_cpus={reserved_cpus:g} leaves no CPU of the cluster's {cpus:g} for the stream; "
            "reserve fewer CPUs for training (e.g. cpus_per_worker) or add CPUs"
        )
    if placement == "trainer":
        return StreamResources(
            num_actors=0,
            actor_cpus=0.0,
            actor_gpus=0.0,
            read_cpus=round(min(1.0, free / 2), 3),
            intra_op_threads=0,
        )
    if placement != "actors":
        raise ValueError(f"placement={placement!r}: allowed: actors, trainer")
    actor_gpus = 0.0
    if gpus > 0 and num_gpus > 0:
        if not 0 < num_gpus <= 1:
            raise ValueError(f"num_gpus={num_gpus!r}: the GPU share per actor must be in (0, 1]")
        actor_gpus = float(num_gpus)
        default_actors = max(
            1, int(gpus)
        )  # one actor per GPU; the rest of each GPU is the student's
    else:
        default_actors = 1
    actors = default_actors if num_actors is None else num_actors
    if not isinstance(actors, int) or actors < 1:
        raise ValueError(f"num_actors={num_actors!r}: must be a positive integer or None (auto)")
    if actor_gpus and actors * actor_gpus > gpus + 1e-6:
        raise ValueError(
            f"num_actors={actors} x num_gpus={actor_gpus:g} needs {actors * actor_gpus:g} GPUs; the cluster has {gpus:g}"
        )
    actor_cpus = min(1.0, free / 2 / actors)
    read_cpus = min(1.0, free / 2)
    return StreamResources(
        num_actors=actors,
        actor_cpus=round(actor_cpus, 3),
        actor_gpus=actor_gpus,
        read_cpus=round(read_cpus, 3),
        intra_op_threads=max(1, math.ceil(actor_cpus)),
    )
