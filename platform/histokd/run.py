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

import contextlib
import functools
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

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
    "LOCK_FILE",
    "RunLock",
    "RunLockedError",
    "check_inside",
    "check_run_name",
    "check_storage_path",
    "holds_run_lock",
    "lock_run",
    "open_mlflow_run",
    "ray_job_working_dir",
    "resolve_output_path",
    "take_legacy_device",
    "take_legacy_out",
]

# One rule for every job and tool: a folder name that cannot climb out of the storage folder
# (no "/", not "." or ".."), is not hidden, and is not read as a flag ("-x"). The names derived
# from it (Tune trials "NAME-<trial id>", fine-tuning splits "NAME-split0", comparison cells)
# keep to the same characters.
_RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def check_run_name(name: str, field_name: str = "run_name") -> str:
    """A run name is a folder name and an MLflow run name: letters, digits and ``._-``, not
    starting with ``.`` or ``-``.

    Raises:
        ValueError: Naming the field, the value and what is allowed.
    """
    if not isinstance(name, str) or not _RUN_NAME.fullmatch(name):
        raise ValueError(
            f"{field_name}={name!r}: must be 1-128 characters of letters, digits and . _ -, "
            "not starting with . or -"
        )
    return name


def check_inside(path: str | os.PathLike, folder: str | os.PathLike, field_name: str) -> Path:
    """``path`` resolved (symbolic links and ``..`` followed), checked to lie inside ``folder``.

    Every output path built from user input goes through here, so that no name, however
    written, puts a file outside the storage folder.

    Raises:
        ValueError: Naming the field, where the path resolves to and the folder it must stay in.
    """
    resolved, root = Path(path).resolve(), Path(folder).resolve()
    if resolved != root and root not in resolved.parents:
        raise ValueError(
            f"{field_name}: {os.fspath(path)!r} resolves to {str(resolved)!r}, outside the "
            f"storage folder {str(root)!r}"
        )
    return resolved


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


_ANNOUNCED: set[tuple[str, str]] = set()


def ray_job_working_dir() -> str | None:
    """The temporary folder a ``ray job submit --working-dir`` job runs in, or None.

    Ray unpacks the working directory under its session's ``runtime_resources`` and deletes it
    with the session, so nothing a run keeps may be written there.
    """
    cwd = os.getcwd()
    return cwd if f"{os.sep}runtime_resources{os.sep}" in f"{cwd}{os.sep}" else None


def resolve_output_path(path: str, field_name: str) -> str:
    """An absolute form of a folder a job writes to (URIs pass through unchanged).

    A relative path resolves against the current folder, except inside a Ray job's temporary
    working directory (:func:`ray_job_working_dir`): there it resolves against
    ``$HISTOKD_HOME`` (default ``~/histokd``), which outlives the job, and says so once.
    """
    if "://" in path:
        return path
    expanded = os.path.expanduser(path)
    if os.path.isabs(expanded):
        return os.path.normpath(expanded)
    if ray_job_working_dir() is None:
        return os.path.abspath(expanded)
    home = os.path.expanduser(os.environ.get("HISTOKD_HOME") or "~/histokd")
    resolved = os.path.normpath(os.path.join(home, expanded))
    if (field_name, resolved) in _ANNOUNCED:
        return resolved
    _ANNOUNCED.add((field_name, resolved))
    import sys

    print(
        f"notice: {field_name}={path!r} is relative and this is a Ray job, whose working "
        f"directory Ray deletes: using {resolved} ($HISTOKD_HOME, default ~/histokd)",
        file=sys.stderr,
    )
    return resolved


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
        self.storage_path = resolve_output_path(self.storage_path, "storage_path")
        if not self.remote_storage:
            check_inside(self.work_dir, self.storage_path, "run_name")

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
        if not self.remote_storage:
            return Path(self.storage_path) / self.run_name
        return Path(resolve_output_path("histokd_work", "work_dir")) / self.run_name


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


# --- one run, one writer --------------------------------------------------------------------
#
# A run folder holds LOCK_FILE while a job writes it: a JSON body naming the holder (host, PID,
# start time). It is created whole and at once (written under a temporary name, then hard-linked
# to LOCK_FILE, which fails when one is there), so no reader sees half a lock. While the run
# lives, a thread touches the file every HEARTBEAT_S seconds. A lock is stale, and taken over
# with a notice, when its holder is gone: on this host, when no process has its PID (or the PID
# is ours: a container restarted); from another host (a shared file system), when it was last
# touched more than STALE_AFTER_S seconds ago. Clocks of the hosts must agree to well within that.

LOCK_FILE = ".histokd.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 120.0
F = TypeVar("F", bound=Callable[..., Any])


class RunLockedError(ValueError):
    """Another live run holds the run folder (a bad setting: exit 2 on the command line)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunLock:
    """The exclusive lock of one run folder; see :func:`lock_run`.

    Args:
        folder: The run's local folder (created if missing).
        heartbeat_s: How often the holder touches the lock.
        stale_after_s: A lock from another host untouched this long is stale.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
    ):
        self.folder = Path(folder).absolute()
        self.path = self.folder / LOCK_FILE
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "token": uuid.uuid4().hex,
        }
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._created: list[Path] = []  # folders this lock made, deepest first

    def acquire(self) -> RunLock:
        """Take the lock, taking over a stale one.

        Raises:
            RunLockedError: A live run holds it; the message names it.
            OSError: The folder cannot be written.
        """
        self._created = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                self._heartbeat = threading.Thread(
                    target=self._beat, name=f"run-lock {self.folder.name}", daemon=True
                )
                self._heartbeat.start()
                return self
            holder = self._read()
            if holder is None:  # released meanwhile: try again
                continue
            why = self._stale(holder)
            if why is None:
                raise RunLockedError(
                    f"{self.folder}: in use by another run ({_describe(holder)}); wait for it to "
                    "end or choose another --run-name"
                )
            if self._remove_if_unchanged(holder):
                print(
                    f"notice: {self.folder}: taking over the lock of a run that is gone "
                    f"({_describe(holder)}; {why})",
                    file=sys.stderr,
                    flush=True,
                )
        raise RunLockedError(f"{self.folder}: other runs keep taking its lock; try again later")

    def release(self) -> None:
        """Stop the heartbeat, remove the lock if it is still ours, and the folders it made if
        the run left them empty (a run refused by its own checks leaves nothing)."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if (self._read() or {}).get("token") == self.holder["token"]:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:  # not empty
                break

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _create(self) -> bool:
        """Create the lock whole, or return False if there is one."""
        tmp = self.folder / f"{LOCK_FILE}.{self.holder['token']}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.holder, f)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return True

    def _read(self) -> dict[str, Any] | None:
        """The holder, None without a lock, ``{}`` for a damaged one."""
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def _stale(self, holder: dict[str, Any]) -> str | None:
        """Why the holder is gone, or None while it may live."""
        age = self._age()
        if not holder:
            return f"unreadable lock, {age:.0f} s old" if age > self.heartbeat_s else None
        if holder.get("host") == self.holder["host"]:
            pid = holder.get("pid")
            if not isinstance(pid, int) or pid == os.getpid() or not _pid_alive(pid):
                return "no such process on this host"
            return None
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s (more than {self.stale_after_s:g} s)"
        return None

    def _remove_if_unchanged(self, holder: dict[str, Any]) -> bool:
        """Remove the stale lock unless another run replaced it meanwhile (checked under an
        flock of the folder, so two runs taking over at once remove it once)."""
        import fcntl

        guard = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
            if self._read() != holder:
                return False
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return True
        finally:
            os.close(guard)  # releases the flock

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if (self._read() or {}).get("token") == self.holder["token"]:
                with contextlib.suppress(OSError):
                    os.utime(self.path)


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "holder unknown: damaged lock"
    return (
        f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')}, "
        f"started {holder.get('started', '?')}"
    )


_HELD: dict[Path, list[Any]] = {}  # folder -> [RunLock, depth]: this process's locks
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def lock_run(config: RunFolderConfig | str | os.PathLike, **kwargs: float) -> Iterator[RunLock]:
    """Hold the run folder's lock (:class:`RunLock`) for the ``with`` block: one writer per run.

    Taken first thing, before the run writes anything; released on leaving the block, also
    on an exception. The folder is the config's :attr:`RunFolderConfig.work_dir` (with remote
    storage the run's local folder: Ray Train's checkpoints in the bucket are written by this
    run only). A search's trials and a comparison's cells are runs of their own folders. Within
    one process the lock is re-entrant: ``run_job`` takes it before the run's log opens, and
    the job's driver takes it again.

    Args:
        config: The run's config, or its folder.
        kwargs: ``heartbeat_s``, ``stale_after_s`` of :class:`RunLock`.

    Raises:
        RunLockedError: A live run holds the folder; the message names its host, PID and start.
    """
    folder = Path(config.work_dir if isinstance(config, RunFolderConfig) else config).absolute()
    with _HELD_GUARD:
        held = _HELD.get(folder)
        if held is not None:
            held[1] += 1
    if held is None:
        lock = RunLock(folder, **kwargs).acquire()
        with _HELD_GUARD:
            _HELD[folder] = held = [lock, 1]
    try:
        yield held[0]
    finally:
        with _HELD_GUARD:
            held[1] -= 1
            last = held[1] == 0
            if last:
                del _HELD[folder]
        if last:
            held[0].release()


def holds_run_lock(run: F) -> F:
    """Decorates a job's driver ``run(config, ...)``: the whole run holds :func:`lock_run`."""

    @functools.wraps(run)
    def locked(config: RunFolderConfig, *args: Any, **kwargs: Any) -> Any:
        with lock_run(config):
            return run(config, *args, **kwargs)

    return locked  # type: ignore[return-value]
