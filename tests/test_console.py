"""histokd.console: the job's lines on the console, the rest only in the run's log file."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import histokd
from histokd import console as console_module
from histokd.console import DRIVER_LOG, setup_console

REPO = Path(__file__).resolve().parents[1]
HISTOKD_FILE = str(Path(histokd.__file__).resolve().parent / "run.py")  # a histokd module
LIBRARY_FILE = "/opt/somelib/somelib/core.py"  # a third-party module


def _warn(message: str, filename: str) -> None:
    warnings.warn_explicit(message, UserWarning, filename, 1)


def test_quiet_console_shows_the_jobs_lines_and_logs_everything(tmp_path, capsys, monkeypatch):
    for key in (
        "TF_CPP_MIN_LOG_LEVEL",
        "RAY_DATA_DISABLE_PROGRESS_BARS",
        "MLFLOW_CONFIGURE_LOGGING",
    ):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("GRPC_VERBOSITY", "DEBUG")  # the user's own setting stays
    log_file = tmp_path / "run" / DRIVER_LOG
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        console = setup_console(verbose=False, log_file=log_file)
        try:
            assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2"
            assert os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
            assert os.environ["MLFLOW_CONFIGURE_LOGGING"] == "false"
            assert Path(os.environ["RAY_DATA_LOGGING_CONFIG"]).is_file()
            assert os.environ["GRPC_VERBOSITY"] == "DEBUG"
            print("epoch 1/8  loss 0.5")
            logging.getLogger("histokd.pretrain.job").info("histokd info")
            logging.getLogger("histokd.pretrain.job").warning("histokd warning")
            logging.getLogger("ray.data").info("execution plan")
            logging.getLogger("absl").warning("absl warning")
            logging.getLogger("mlflow.store").error("mlflow error")
            _warn("library deprecation", LIBRARY_FILE)
            _warn("histokd bug", HISTOKD_FILE)
        finally:
            console.close()
    shown = capsys.readouterr()
    on_console = shown.out + shown.err
    logged = log_file.read_text()
    for line in ("epoch 1/8", "histokd warning", "mlflow error", "histokd bug"):
        assert line in on_console and line in logged, line
    for line in ("histokd info", "absl warning", "library deprecation"):
        assert line not in on_console and line in logged, line
    assert shown.out.splitlines()[-1] == f"full log: {log_file}"  # said once it is closed
    # close() restored the environment
    assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ and "MLFLOW_CONFIGURE_LOGGING" not in os.environ
    assert not isinstance(sys.stdout, console_module._Tee)


def test_verbose_console_shows_the_libraries_too(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_DATA_DISABLE_PROGRESS_BARS", raising=False)
    log_file = tmp_path / DRIVER_LOG
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # Python's own showwarning (pytest records warnings instead): to sys.stderr at call time
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: (
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
        )
        console = setup_console(verbose=True, log_file=log_file)
        try:
            assert "RAY_DATA_DISABLE_PROGRESS_BARS" not in os.environ
            logging.getLogger("absl").warning("absl warning")
            _warn("library deprecation", LIBRARY_FILE)
        finally:
            console.close()
    shown = capsys.readouterr()
    for line in ("absl warning", "library deprecation"):
        assert line in shown.err and line in log_file.read_text(), line


def test_native_log_lines_of_workers_are_recognised():
    native = console_module._NATIVE_LOG_LINE
    for line in (
        "[2026-12-06 20:09:51,207 E 17040 17089] core_worker.cc:2465: Actor with class name",
        "I0000 00:00:1796591205.447926   15988 port.cc:153] oneDNN custom operations are on.",
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    ):
        assert native.match(line), line
    for line in (
        "epoch 1/8  loss 0.5161  holdout loss 0.4584",
        "E0000 00:00:1796591205.447926   15988 cuda_dnn.cc:8310] Unable to register cuDNN",
        "Traceback (most recent call last):",
    ):
        assert not native.match(line), line


_PIPELINE = textwrap.dedent(
    """
    import os, sys, warnings
    from histokd.console import setup_console
    from histokd.cluster import init_ray

    def label(batch):
        print("worker line", flush=True)
        warnings.warn("a library's deprecation", DeprecationWarning)
        batch["quiet"] = [os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS")] * len(batch["id"])
        return batch

    with setup_console(verbose=False, log_file=sys.argv[1]):
        init_ray(num_cpus=1, include_dashboard=False)
        import ray

        # workers' lines reach the driver asynchronously (Ray's log monitor): on a loaded machine
        # the job may end first; wait for the line itself, as a long job would have
        import threading
        from ray._private.ray_logging import global_worker_stdstream_dispatcher

        seen = threading.Event()
        global_worker_stdstream_dispatcher.add_handler("test_seen", lambda data: (
            any("worker line" in line for line in data.get("lines") or []) and seen.set()))
        rows = ray.data.range(40, override_num_blocks=4).map_batches(label).take_all()
        seen.wait(60)
        print("rows", len(rows), "quiet workers", sum(r["quiet"] == "1" for r in rows))
    """
)


@pytest.mark.timeout(120)
def test_a_ray_data_pipeline_prints_no_progress_bars_or_plans(tmp_path):
    """A real local Ray and a Ray Data pipeline under a quiet console: the console keeps the job's
    lines and the worker's print; Ray Data's bars and plans stay off; the log file is written."""
    log_file = tmp_path / "run" / DRIVER_LOG
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "TF_CPP"))}
    out = subprocess.run(
        [sys.executable, "-c", _PIPELINE, str(log_file)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    console = out.stdout + out.stderr
    assert out.returncode == 0, console[-3000:]
    assert "rows 40 quiet workers 40" in console  # every worker ran quiet_worker
    assert "worker line" in console  # workers' prints still reach the console
    for noise in ("Running Dataset", "Execution plan", "Starting execution", "Warning", "row/s"):
        assert noise not in console, (noise, console)
    lines = [line for line in console.replace("\r", "\n").splitlines() if line.strip()]
    assert len(lines) <= 8, lines
    assert f"full log: {log_file}" in out.stdout.splitlines()  # workers' lines may come later
    logged = log_file.read_text()
    assert "rows 40" in logged and "Ray session logs:" in logged


def test_every_job_gets_the_console_from_run_job(tmp_path, capsys):
    """run_job sets the console up from the config's --verbose and run folder, and closes it."""
    from histokd.cli import run_job
    from histokd.run import RunFolderConfig

    def run(config: RunFolderConfig) -> int:
        assert console_module._current is not None and not console_module._current.verbose
        print("the job's line")
        return 7

    argv = ["--storage-path", str(tmp_path), "--run-name", "r"]
    assert run_job(RunFolderConfig, run, argv, report=lambda result: print("result", result)) == 0
    assert console_module._current is None
    log_file = tmp_path / "r" / DRIVER_LOG
    assert capsys.readouterr().out.splitlines()[-3:] == [
        "the job's line",
        "result 7",
        f"full log: {log_file}",
    ]
    assert "the job's line" in log_file.read_text() and "result 7" in log_file.read_text()
