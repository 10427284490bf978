"""Joining Ray: the cluster a job was submitted to, or a new local one, never a stale one.

A cluster address that nothing answers at fails in seconds with one line (``ray.init`` would
warn and wait without end). A new local Ray listens on the loopback interface only and removes
its session folder (``/tmp/ray/session_*``) when the process exits.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import shutil
import socket
import time
from pathlib import Path

__all__ = ["check_ray_address", "init_ray", "quiet_train_reports"]


PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"
LOOPBACK = "127.0.0.1"
CONNECT_TIMEOUT_S = 10.0  # a TCP connect to a live head takes milliseconds, even across a VPC
_ALLOWED_ADDRESSES = (
    "allowed: a running Ray head's host:port (`ray start --head` prints it), ray://host:port "
    "for its client server, auto for the cluster on this machine, or none for a new local Ray"
)


def init_ray(address: str | None = None, **kwargs) -> None:
    """``ray.init`` for histokd's jobs, once per process.

    Args:
        address: A Ray address (``auto`` joins the running cluster). Default: ``$RAY_ADDRESS``,
            which ``ray job submit`` sets, else a new local cluster. A plain ``ray.init()``
            would instead follow ``/tmp/ray/ray_current_cluster`` and wait forever when the
            head recorded there is gone. Nothing answering at it is one line, in seconds
            (`check_ray_address`). A new local cluster listens on 127.0.0.1 only and removes
            its session folder at exit.
        **kwargs: Passed to ``ray.init`` (``_node_ip_address``, ``dashboard_host``: where a new
            local cluster listens).

    Raises:
        ValueError: Nothing answers at the address.
    """
    import ray

    from histokd import console

    if ray.is_initialized():
        return
    kwargs.setdefault("configure_logging", False)
    kwargs = console.ray_init_kwargs(kwargs)  # a quiet console: every worker runs quiet_worker
    name = "ray_address" if address else "$RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        # Ray Train V2 sends a worker's print() both to stdout and to a logger that prints it
        # again: every epoch line came twice. A new local cluster's workers inherit this
        # process's environment; the docker image sets the same for clusters.
        os.environ.setdefault(PRINT_PATCH_ENV, "0")
        _start_local_ray(kwargs)
    else:
        check_ray_address(address, temp_dir=kwargs.get("_temp_dir"), name=name)
        ray.init(address=address, **kwargs)
    console.route_worker_logs()


def check_ray_address(
    address: str,
    *,
    temp_dir: str | None = None,
    timeout_s: float = CONNECT_TIMEOUT_S,
    name: str = "ray_address",
) -> str:
    """Fail fast when nothing answers at a Ray address: a TCP connect with a timeout.

    Args:
        address: ``host:port`` of a head's GCS, ``ray://host:port`` of its client server, or
            ``auto`` (``$RAY_ADDRESS``, else the cluster Ray recorded on this machine).
        temp_dir: Ray's temporary folder, where ``auto`` finds the recorded cluster.
        timeout_s: How long a connect may take.
        name: The setting the address came from, for the message.

    Returns:
        The ``host:port`` that answered.

    Raises:
        ValueError: One line naming the address: nothing answers, or not an address.
    """
    target = address
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            target = canonicalize_bootstrap_address("auto", temp_dir)
        except ConnectionError:
            raise ValueError(
                f"{name}='auto': no Ray cluster is running on this machine; {_ALLOWED_ADDRESSES}"
            ) from None
    host, _, port = target.split("://", 1)[-1].rstrip("/").rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not host or not port.isdigit():
        raise ValueError(f"{name}={address!r}: not host:port; {_ALLOWED_ADDRESSES}")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        why = (
            f"no answer within {timeout_s:g} s"
            if isinstance(exc, TimeoutError)
            else exc.strerror or str(exc)
        )
        where = "" if target == address else f" (the cluster it names, {target})"
        raise ValueError(
            f"{name}={address!r}: no Ray cluster answers at {host}:{port}{where}: {why}; "
            f"{_ALLOWED_ADDRESSES}"
        ) from None
    return f"{host}:{port}"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _start_local_ray(kwargs: dict) -> None:
    """``ray.init`` of a new local cluster, on the loopback interface unless ``kwargs`` say
    otherwise (``_node_ip_address``, ``dashboard_host``), its session folder removed at exit."""
    import ray
    from ray._private import ray_constants

    node_ip = kwargs.setdefault("_node_ip_address", LOOPBACK)
    kwargs.setdefault("dashboard_host", LOOPBACK)
    # Ray 2.60 swaps a loopback node address for the host's own unless it believes it runs on a
    # one-machine platform (ENABLE_RAY_CLUSTER false, as on macOS); with the host's address its
    # GCS, raylet and workers listen on every interface. With the loopback address they all
    # listen on 127.0.0.1 only.
    multi_node = ray_constants.ENABLE_RAY_CLUSTER
    if _is_loopback(node_ip):
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = multi_node
    # registered after Ray's own atexit shutdown, so it runs first
    atexit.register(_remove_session, ray._private.worker._global_node.get_session_dir_path())


def _remove_session(session_dir: str) -> None:
    """Stop the local cluster and delete its session folder (logs, sockets, spilled objects)."""
    import ray

    ray.shutdown()
    session = Path(session_dir)
    for _ in range(5):  # a process still exiting may write one more log line
        shutil.rmtree(session, ignore_errors=True)
        if not session.exists():
            break
        time.sleep(0.2)
    latest = session.parent / "session_latest"
    if latest.is_symlink() and os.readlink(latest) == str(session):
        latest.unlink(missing_ok=True)


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
