"""Joining Ray: the cluster a job was submitted to, or a new local one, never a stale one."""

from __future__ import annotations

import os

__all__ = ["init_ray", "quiet_train_reports"]


PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"


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

    from histokd import console

    if ray.is_initialized():
        return
    kwargs.setdefault("configure_logging", False)
    kwargs = console.ray_init_kwargs(kwargs)  # a quiet console: every worker runs quiet_worker
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        # Ray Train V2 sends a worker's print() both to stdout and to a logger that prints it
        # again: every epoch line came twice. A new local cluster's workers inherit this
        # process's environment; the docker image sets the same for clusters.
        os.environ.setdefault(PRINT_PATCH_ENV, "0")
    ray.init(address=address, **kwargs)
    console.route_worker_logs()


def quiet_train_reports() -> None:
    """Keep Ray Train's per-report log line off the console (call in a training worker).

    Ray Train 2.60 logs every ``ray.train.report`` at INFO, metrics and checkpoint path in full:
    in worker groups through a logger named by its source file, which
    ``RunConfig(logging_config=...)`` does not reach, and in local mode (``num_workers=0``)
    through ``train_fn_utils``. The jobs print their own line per epoch instead.
    """
    import logging

    try:
        from ray.train.v2._internal.execution import context, train_fn_utils
    except ImportError:  # another Ray layout: leave its logging alone
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger(train_fn_utils.__name__).setLevel(logging.WARNING)
    from histokd.console import quiet_train_worker

    quiet_train_worker()  # a quiet console: libraries' log lines below ERROR off the console too
