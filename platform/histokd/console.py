"""A job's console: the job's own lines on screen, everything else in the run's log file.

A job prints a settings summary, one line per epoch, its results and where they are. Unless it
runs with ``--verbose``, the rest stays off the console: Ray's, Ray Data's, MLflow's,
TensorFlow's and absl's log lines below ERROR, other libraries' warnings (deprecations
included), Ray Data's progress bars, execution plans and advice, and the native log lines
(Ray core's, TensorFlow's) that workers write to stderr. histokd's own warnings and everyone's errors always show.

Nothing is lost: the driver writes everything it prints or logs, shown or not, to
``RUN_DIR/logs/driver.log`` (with remote storage, the run's local folder
``./histokd_work/RUN_NAME``); Ray's workers keep their output in the Ray session's logs folder
(Ray Data's plans and advice in ``ray-data.log`` there), whose path the driver log names.

The driver sets it up once, first thing (:func:`histokd.cli.run_job` does, with
``with setup_console(...)``), and closes it at the end. :func:`histokd.cluster.init_ray` asks
:func:`ray_init_kwargs` for what Ray needs (every worker process then runs
:func:`quiet_worker` first) and calls :func:`route_worker_logs` once Ray is up. Lines that
workers print, such as each epoch's line, still reach the console.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "DRIVER_LOG",
    "Console",
    "quiet_train_worker",
    "quiet_worker",
    "ray_init_kwargs",
    "route_worker_logs",
    "setup_console",
    "setup_worker",
    "train_log_level",
]

DRIVER_LOG = "logs/driver.log"  # in the run's local folder (RunFolderConfig.work_dir)
RAY_DATA_LOGGING = Path(__file__).parent / "assets" / "ray_data_logging.yaml"
_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A native (C++) library's log line on a worker's stderr: Ray core's, which workers copy to
# stderr from ERROR up ("[2026-12-06 20:09:51,207 E 17040 17089] core_worker.cc:2465: ..."),
# and TensorFlow's absl INFO and WARNING lines, which TF_CPP_MIN_LOG_LEVEL does not reach
# ("I0000 00:00:1796591205.447926   15988 port.cc:153] oneDNN custom operations are on ...").
_NATIVE_LOG_LINE = re.compile(
    r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [IWE] \d+ \d+\] \S+:\d+: "
    r"|[IW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray's colours: kept on the console, not in the file

log = logging.getLogger(__name__)
_current: Console | None = None


def _quiet_env() -> dict[str, str]:
    """What libraries read when they load: set in the driver and in each Ray worker before."""
    return {
        "TF_CPP_MIN_LOG_LEVEL": "2",  # TensorFlow's C++ INFO and WARNING lines (absl's too)
        "GRPC_VERBOSITY": "ERROR",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "RAY_DATA_LOGGING_CONFIG": str(RAY_DATA_LOGGING),  # Ray Data's console from ERROR up
        "MLFLOW_CONFIGURE_LOGGING": "false",  # MLflow logs through the root logger, quietly
    }


def _ours(logger_name: str) -> bool:
    return logger_name in ("histokd", "__main__") or logger_name.startswith("histokd.")


def _our_file(filename: str) -> bool:
    """A warning raised in histokd's code or in the job's script: a bug to fix, always shown."""
    path = os.path.abspath(filename)
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    return path.startswith(_PACKAGE_DIR + os.sep) or (
        main is not None and path == os.path.abspath(main)
    )


class _QuietFilter(logging.Filter):
    """The quiet console's records: histokd's warnings and everyone's errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or (
            record.levelno >= logging.WARNING and _ours(record.name)
        )


class _PlainFormatter(logging.Formatter):
    """The log file's records, without terminal colour codes."""

    def format(self, record: logging.LogRecord) -> str:
        return _ANSI.sub("", super().format(record))


class _Tee:
    """A text stream that writes to the console and to the log file."""

    def __init__(self, console: TextIO, log_stream: TextIO) -> None:
        self._console = console
        self._log = log_stream

    def write(self, text: str) -> int:
        self._console.write(text)
        if not self._log.closed:
            self._log.write(_ANSI.sub("", text))
        return len(text)

    def flush(self) -> None:
        self._console.flush()
        if not self._log.closed:
            self._log.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...: the console's
        return getattr(self._console, name)


def _show_warning_quietly(
    console: TextIO | None, write_log: Callable[[str], None] | None
) -> Callable[..., None]:
    """A ``warnings.showwarning``: histokd's warnings on the console (default: stderr), every
    warning in the log."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = warnings.formatwarning(message, category, filename, lineno, line)
        if file is not None:  # an explicit target, as warnings.showwarning honours it
            file.write(text)
            return
        if write_log is not None:
            write_log(text)
        if _our_file(filename):
            (console or sys.stderr).write(text)

    return show


class Console:
    """What :func:`setup_console` set up; :meth:`close` undoes it. As a context manager it
    closes at the end of the job, after logging a failure's traceback."""

    def __init__(self, verbose: bool, log_file: Path | None) -> None:
        self.verbose = verbose
        self.log_file = log_file
        self._log: TextIO | None = None
        self._console_err: TextIO = sys.stderr
        self._undo: list[Callable[[], None]] = []

    def _start(self) -> None:
        if not self.verbose:
            for key, value in _quiet_env().items():
                self._set_env(key, value)
            self._quiet_loaded_ray_data()
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_file, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
            self._log.write(
                f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} "
                f"{shlex.join([sys.executable, *sys.argv])}\n"
            )
            self._undo.append(self._log.close)
        self._setup_logging()
        if not self.verbose:
            previous = warnings.showwarning
            warnings.showwarning = _show_warning_quietly(self._console_err, self.write_log)
            self._undo.append(lambda: setattr(warnings, "showwarning", previous))
        if self._log is not None:
            stdout, stderr = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = _Tee(stdout, self._log), _Tee(stderr, self._log)
            self._undo.append(
                lambda: (setattr(sys, "stdout", stdout), setattr(sys, "stderr", stderr))
            )

    def _set_env(self, key: str, value: str) -> None:
        """Set an environment variable unless the user did, to restore in close()."""
        previous = os.environ.get(key)
        if previous is not None:
            return
        os.environ[key] = value

        self._undo.append(lambda: os.environ.pop(key, None))

    def _quiet_loaded_ray_data(self) -> None:
        """Ray Data reads its settings when it loads: apply them if it loaded already."""
        if "ray.data" not in sys.modules:
            return
        from ray.data import DataContext
        from ray.data._internal.logging import configure_logging  # Ray Data's own reloader

        context = DataContext.get_current()
        previous = context.enable_progress_bars
        context.enable_progress_bars = False
        configure_logging()

        def restore() -> None:
            context.enable_progress_bars = previous
            configure_logging()  # after RAY_DATA_LOGGING_CONFIG is restored (undo runs LIFO)

        self._undo.insert(0, restore)

    def _setup_logging(self) -> None:
        root = logging.getLogger()
        console = logging.StreamHandler(self._console_err)  # the console itself, not the tee
        console.setFormatter(logging.Formatter(_FORMAT))
        if self.verbose:
            console.setLevel(logging.INFO)
        else:
            console.addFilter(_QuietFilter())
        handlers: list[logging.Handler] = [console]
        if self._log is not None:
            to_file = logging.StreamHandler(self._log)
            to_file.setFormatter(_PlainFormatter(_FORMAT))
            handlers.append(to_file)
        previous_level = root.level
        root.setLevel(logging.INFO)
        for handler in handlers:
            root.addHandler(handler)
        # MLflow's database migrations, at the level MLflow itself gives them
        quieted = {name: logging.getLogger(name).level for name in ("alembic", "sqlalchemy")}
        for name in quieted:
            logging.getLogger(name).setLevel(logging.WARNING)

        def restore() -> None:
            for handler in handlers:
                root.removeHandler(handler)
            root.setLevel(previous_level)
            for name, level in quieted.items():
                logging.getLogger(name).setLevel(level)

        self._undo.append(restore)
        if "ray" in sys.modules:
            self._adopt_ray_logger()

    def _adopt_ray_logger(self) -> None:
        """Ray's ``ray`` logger prints through its own handler: send it through ours."""
        ray_logger = logging.getLogger("ray")
        if ray_logger.propagate:
            return
        handlers = list(ray_logger.handlers)
        for handler in handlers:
            ray_logger.removeHandler(handler)
        ray_logger.propagate = True

        def restore() -> None:
            for handler in handlers:
                ray_logger.addHandler(handler)
            ray_logger.propagate = False

        self._undo.append(restore)

    def write_log(self, text: str) -> None:
        """Write to the log file only."""
        if self._log is not None and not self._log.closed:
            self._log.write(text)

    def close(self) -> None:
        """Restore what :func:`setup_console` changed, close the log file and say where it is."""
        global _current
        had_log = self._log is not None and not self._log.closed
        while self._undo:
            self._undo.pop()()
        if _current is self:
            _current = None
        if had_log:
            print(f"full log: {self.log_file}", flush=True)

    def __enter__(self) -> Console:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and self._log is not None and not self._log.closed:
            import traceback

            self._log.write("".join(traceback.format_exception(exc_type, exc, tb)))
        self.close()


def setup_console(verbose: bool = False, log_file: str | os.PathLike | None = None) -> Console:
    """Set up the driver's console: once, first thing in a job, as ``with setup_console(...):``.

    Args:
        verbose: Show everything: the libraries' log lines and warnings, Ray Data's progress
            bars and execution plans.
        log_file: Where the driver's full output goes (appended), shown on the console or not;
            ``RUN_DIR/logs/driver.log`` (:data:`DRIVER_LOG`). Its path is the console's last
            line.

    Returns:
        The console; leaving its ``with`` block (or ``close()``) restores the previous state.
    """
    global _current
    if _current is not None:
        _current.close()
    console = Console(bool(verbose), Path(log_file).absolute() if log_file else None)
    console._start()
    _current = console
    return console


def ray_init_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``ray.init`` arguments for the console: every worker process of the job runs
    :func:`quiet_worker` (a quiet console) or :func:`setup_worker` first, as Ray's
    ``worker_process_setup_hook``."""
    console = _current
    if console is None:
        return kwargs
    console._adopt_ray_logger()
    hook = setup_worker if console.verbose else quiet_worker
    runtime_env = dict(kwargs.get("runtime_env") or {})
    runtime_env.setdefault("worker_process_setup_hook", f"{__name__}.{hook.__name__}")
    return {**kwargs, "runtime_env": runtime_env}


def train_log_level() -> str:
    """The level of Ray Train's console lines, for ``ray.train.LoggingConfig(log_level=...)``:
    ERROR for a quiet console, WARNING otherwise (not a line per report). Ray Train's
    controller and workers configure their logging themselves; its log files in the Ray
    session keep every level."""
    return "ERROR" if _current is not None and not _current.verbose else "WARNING"


def route_worker_logs() -> None:
    """Once Ray is up: native libraries' log lines on workers' stderr (Ray core's, TensorFlow's)
    go to the log file only.

    Everything else the workers print still reaches the console through Ray's own forwarding
    (each epoch's line, a failing task's traceback). Ray has no public hook for this; on another
    Ray layout nothing changes.
    """
    console = _current
    if console is None:
        return
    try:
        import ray
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        log.info(
            "Ray session logs: %s/logs", ray._private.worker._global_node.get_session_dir_path()
        )
    except (ImportError, AttributeError):
        return
    if console.verbose:
        return
    forward = dict(dispatcher.handlers).get("ray_print_logs")
    if forward is None or getattr(forward, "histokd_console", False):
        return

    def route(data: dict[str, Any]) -> None:
        keep = []
        for line in data.get("lines") or []:
            if _NATIVE_LOG_LINE.match(line):
                who = data.get("actor_name") or data.get("task_name") or ""
                console.write_log(f"({who} pid={data.get('pid')}) {line}\n")
            else:
                keep.append(line)
        if keep:
            forward({**data, "lines": keep})

    route.histokd_console = True
    dispatcher.remove_handler("ray_print_logs")  # the name Ray removes again at shutdown
    dispatcher.add_handler("ray_print_logs", route)


def _quiet_console_handlers(logger: logging.Logger) -> None:
    """Let a logger's console handlers (not its files) pass only what a quiet console shows."""
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        ):
            if not any(isinstance(f, _QuietFilter) for f in handler.filters):
                handler.addFilter(_QuietFilter())


_worker_is_quiet = False


def setup_worker() -> None:
    """Ray's ``worker_process_setup_hook`` for a verbose console; :func:`quiet_worker` runs it.

    Ray's own state API calls in a worker (Ray Train's placement group cleaner) find their
    cluster by ``RAY_ADDRESS``; without it they fail, with a traceback on the console, when one
    machine runs several Ray instances. A failing hook would end the worker: this one logs.
    """
    try:
        import ray

        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 - a hook that raises kills the worker
        log.exception("histokd.console.setup_worker")


def quiet_worker() -> None:
    """Ray's ``worker_process_setup_hook`` for a quiet console; runs first in each worker.

    Libraries read their settings when they load, after this. What is switched off is what a
    verbose console shows: library warnings and log lines below ERROR; what a worker prints
    (each epoch's line) and histokd's warnings still reach the driver.
    """
    global _worker_is_quiet
    setup_worker()
    try:
        for key, value in _quiet_env().items():
            os.environ.setdefault(key, value)
        warnings.showwarning = _show_warning_quietly(None, None)
        _quiet_console_handlers(logging.getLogger("ray"))  # Ray's own console handler
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter(_FORMAT))
        console.addFilter(_QuietFilter())
        logging.getLogger().addHandler(console)  # absl, TensorFlow, MLflow: through root
        _worker_is_quiet = True
    except Exception:  # noqa: BLE001 - a hook that raises kills the worker
        log.exception("histokd.console.quiet_worker")


def quiet_train_worker() -> None:
    """In a Ray Train worker of a quiet console: Ray Train configures the worker's logging
    when the worker function starts, after :func:`quiet_worker`; quiet its console handlers
    too. Its log files in the Ray session keep everything."""
    if _worker_is_quiet:
        for name in ("", "ray.train"):
            _quiet_console_handlers(logging.getLogger(name))
