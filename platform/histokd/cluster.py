"""Joining Ray: the cluster a job was submitted to, or a new local one, never a stale one."""

from __future__ import annotations

import os

__all__ = ["init_ray"]


def init_ray(address: str | None = None, **kwargs) -> None:
    """``ray.init`` for histokd's jobs, once per process.

    Args:
        address: A Ray address (``auto`` joins the running cluster). Default: ``$RAY_ADDRESS``,
            which ``ray job submit`` sets, else a new local cluster. A plain ``ray.init()``
            would instead follow ``/tmp/ray/ray_current_cluster`` and wait forever when the
            head recorded there is gone.
        **kwargs: Passed to ``ray.init``.
    """
    import ray

    if ray.is_initialized():
        return
    kwargs.setdefault("configure_logging", False)
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", **kwargs)
