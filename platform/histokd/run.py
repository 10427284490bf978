"""The run scaffold: what every job's run needs, in one place.

A run lives in ``STORAGE_PATH/RUN_NAME`` and is tracked as one MLflow run of that name. Every
job config composes :class:`RunConfig` (the common fields, checked once here); every job's
driver opens its MLflow run with :func:`open_mlflow_run`; every Ray Train worker function uses
:func:`all_reduce_sum` and :func:`all_gather`, and continues through
:func:`histokd.resume.restore_checkpoint`.

Nothing here imports torch, Ray or MLflow at module level: configs import this module, and a
job's ``--help`` must answer without them.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histokd.cli import arg

if TYPE_CHECKING:
    import torch

    from histokd.tracking import MLflowRun

__all__ = [
    "RunConfig",
    "all_gather",
    "RunFolderConfig",
    "WorkerConfig",
    "all_reduce_sum",
    "check_run_name",
    "check_storage_path",
    "open_mlflow_run",
    "take_legacy_device",
    "take_legacy_out",
]

_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]{0,127}")


def check_run_name(name: str, field_name: str = "run_name") -> str:
    """A run name is a folder name and an MLflow run name: letters, digits and ``._=+-``.

    Raises:
        ValueError: Naming the field, the value and what is allowed.
    """
    if not isinstance(name, str) or not _RUN_NAME.fullmatch(name):
        raise ValueError(
            f"{field_name}={name!r}: must be 1-128 characters of letters, digits and . _ = + -, "
            "starting with a letter or digit"
        )
    return name


def check_storage_path(path: str, field_name: str = "storage_path") -> None:
    """Fail early, naming the field, if the storage path cannot be written.

    Raises:
        ValueError: The filesystem cannot be reached or written.
    """
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(path if "://" in path else os.path.abspath(path))
        fs.create_dir(root, recursive=True)
        probe = f"{root.rstrip('/')}/.histokd-write-check-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(probe) as out:
            out.write(b"ok")
        fs.delete_file(probe)
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing here
        raise ValueError(
            f"{field_name}={path!r}: cannot be written ({type(exc).__name__}: {exc})"
        ) from exc


def take_legacy_out(config: RunFolderConfig, out: str | None, flag: str = "--out") -> None:
    """An old ``--out DIR`` is ``--storage-path`` its parent and ``--run-name`` its name."""
    if not out:
        return
    import sys

    path = os.path.abspath(os.path.expanduser(out.rstrip("/")))
    config.storage_path, config.run_name = os.path.dirname(path), os.path.basename(path)
    print(
        f"notice: {flag} is deprecated and goes in histokd 0.2: use --storage-path "
        f"{config.storage_path} --run-name {config.run_name}",
        file=sys.stderr,
    )


def take_legacy_device(config: Any, device: str | None) -> None:
    """An old ``--device cpu|cuda|gpu|auto`` is ``--no-use-gpu`` / ``--use-gpu`` / unset."""
    if device is None:
        return
    import sys

    allowed = {"cpu": False, "cuda": True, "gpu": True, "auto": None}
    if device not in allowed:
        raise ValueError(f"device={device!r}: allowed: {', '.join(allowed)} (now: --use-gpu)")
    config.use_gpu = allowed[device]
    flag = {False: "--no-use-gpu", True: "--use-gpu", None: "no flag (auto)"}[config.use_gpu]
    print(f"notice: --device is deprecated and goes in histokd 0.2: use {flag}", file=sys.stderr)


@dataclass
class RunFolderConfig:
    """Where a job's output goes: ``STORAGE_PATH/RUN_NAME``; every job and tool has these.

    ``storage_path`` is a folder or a URI (``s3://``, ``gs://``). With a URI only Ray Train's
    checkpoints go there; the run's other files stay in ``./histokd_work/RUN_NAME``
    (:attr:`work_dir`), and an MLflow tracking URI must be given (docs/operators_guide.md,
    section 5).
    """

    run_name: str = arg("run", "run name; rerunning with the same name resumes or reuses the run")
    storage_path: str = arg("runs", "folder or URI (s3://, gs://) of every run: STORAGE/RUN_NAME")
    seed: int = arg(0, "seed of every random choice of the run")
    verbose: bool = arg(False, "show Ray's, TensorFlow's and library warnings and progress bars")

    def __post_init__(self) -> None:
        check_run_name(self.run_name)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r}: must be an integer")
        if not self.storage_path:
            raise ValueError("storage_path='': give a folder or a URI")
        if "://" not in self.storage_path:
            self.storage_path = os.path.abspath(os.path.expanduser(self.storage_path))

    @property
    def run_dir(self) -> str:
        """Everything of this run: ``STORAGE/RUN_NAME`` (a path or a URI)."""
        return f"{self.storage_path.rstrip('/')}/{self.run_name}"

    @property
    def remote_storage(self) -> bool:
        return "://" in self.storage_path

    @property
    def work_dir(self) -> Path:
        """The run's local folder: the run folder itself, or with remote storage (where only
        Ray Train's checkpoints go) ``./histokd_work/RUN_NAME``."""
        base = "histokd_work" if self.remote_storage else self.storage_path
        return Path(base).absolute() / self.run_name


@dataclass
class RunConfig(RunFolderConfig):
    """:class:`RunFolderConfig` plus the cluster and the tracking: the jobs that run on Ray and
    record an MLflow run. A job config subclasses it and may give ``run_name`` and
    ``mlflow_experiment`` defaults of its own by declaring them again.

    ``ray_address`` ``auto`` joins the cluster running on this machine; unset, the job joins
    ``$RAY_ADDRESS`` (which ``ray job submit`` sets), else starts a new local Ray.
    """

    ray_address: str | None = arg(None, "Ray cluster; default: $RAY_ADDRESS, else a new local Ray")
    mlflow_tracking_uri: str | None = arg(None, "MLflow URI; default: sqlite:///STORAGE/mlflow.db")
    mlflow_experiment: str = arg("histokd", "MLflow experiment name")

    @property
    def tracking_uri(self) -> str:
        """The MLflow URI: the configured one, or a SQLite file in a local storage folder.

        Raises:
            ValueError: The storage is remote and no tracking URI is configured.
        """
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        if self.remote_storage:
            raise ValueError(
                f"mlflow_tracking_uri is unset and storage_path={self.storage_path!r} is remote: "
                "give a tracking server URI (http://...) or a sqlite:/// path"
            )
        return f"sqlite:///{self.storage_path}/mlflow.db"

    @property
    def artifact_location(self) -> str | None:
        """Where a new MLflow experiment keeps artifacts: beside the runs when they are local,
        else the tracking server's default."""
        return None if self.remote_storage else os.path.join(self.storage_path, "mlartifacts")


@dataclass
class WorkerConfig(RunConfig):
    """:class:`RunConfig` plus the Ray Train workers of a training job."""

    num_workers: int | None = arg(None, "training workers; auto: 1 per GPU or 1; 0: in the driver")
    use_gpu: bool | None = arg(None, "train on GPUs; auto: if the cluster has any")
    cpus_per_worker: float = arg(1.0, "CPUs reserved by each training worker")
    max_failures: int = arg(3, "worker-group restarts from the last checkpoint before a run fails")

    def __post_init__(self) -> None:
        super().__post_init__()
        from histokd.cli import check_ints

        check_ints(self, ["num_workers", "max_failures"], minimum=0, auto=True)
        if self.max_failures is None:
            raise ValueError("max_failures=None: must be a non-negative integer")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker={self.cpus_per_worker!r}: must be positive")


def open_mlflow_run(
    config: RunConfig,
    job: str,
    *,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    params: dict[str, Any] | None = None,
) -> MLflowRun:
    """The job's MLflow run: created, or continued when the run name comes back.

    Logs the config (or ``params``) as parameters, the git commit and package versions, and
    tags the job and run folder.

    Args:
        config: The job's config.
        job: The job's name, tagged ``histokd.job``.
        run_name: A child run's name (default: the config's run name).
        parent_run_id: Makes this run a child of that one.
        params: Parameters to log instead of the whole config.
    """
    from histokd.cli import config_to_dict
    from histokd.tracking import MLflowRun

    run = MLflowRun(
        config.tracking_uri,
        config.mlflow_experiment,
        run_name or config.run_name,
        artifact_location=config.artifact_location,
    )
    run.log_params(config_to_dict(config) if params is None else params)
    run.log_standard_tags()
    tags = {"histokd.job": job, "histokd.run_dir": config.run_dir}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run.set_tags(tags)
    return run


def all_reduce_sum(values: torch.Tensor | list[float], device: Any = None) -> Any:
    """The sum over the training workers (a copy of ``values`` with one worker).

    A list of floats comes back as a list of floats (summed in float64 on ``device``); a
    tensor comes back as a tensor.
    """
    import torch
    import torch.distributed as dist

    as_list = not isinstance(values, torch.Tensor)
    tensor = torch.tensor(values, dtype=torch.float64, device=device) if as_list else values.clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.cpu().tolist() if as_list else tensor


def all_gather(obj: Any) -> list[Any]:
    """Every worker's ``obj`` (picklable), in rank order; ``[obj]`` with one worker."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]
