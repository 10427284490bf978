"""The run scaffold's run-folder rules: one writer per run (the lock), one run-name rule for
every job and tool, and no output path outside the storage folder."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from histokd.cli import parse_config
from histokd.run import LOCK_FILE, RunConfig, RunFolderConfig, RunLockedError, lock_run

REPO = Path(__file__).resolve().parents[1]

_HOLDER = """
import sys, time
from histokd.run import lock_run
with lock_run(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """Starts a process that takes a folder's lock and keeps it until killed."""
    started: list[subprocess.Popen] = []

    def start(folder: Path) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE, text=True
        )
        started.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in started:  # only the processes this test started, by their PIDs
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_live_holder_refuses_the_second_run_and_a_dead_one_is_taken_over(
    tmp_path, holder, capsys
):
    folder = tmp_path / "runs" / "same"
    first = holder(folder)
    body = json.loads((folder / LOCK_FILE).read_text())
    assert (body["host"], body["pid"]) == (socket.gethostname(), first.pid)
    started = time.monotonic()
    with pytest.raises(RunLockedError) as refused, lock_run(folder):
        pytest.fail("the second run got the lock")
    assert time.monotonic() - started < 1.0  # at once, no waiting
    message = str(refused.value)
    assert "\n" not in message and str(folder) in message
    assert f"host {socket.gethostname()}, PID {first.pid}, started {body['started']}" in message
    assert (folder / LOCK_FILE).exists()  # the refused run took nothing away

    first.send_signal(signal.SIGKILL)  # dies holding it: the lock stays behind, stale
    first.wait()
    assert (folder / LOCK_FILE).exists()
    with lock_run(folder) as lock:
        assert (
            json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid() == lock.holder["pid"]
        )
    err = capsys.readouterr().err
    assert (
        f"taking over the lock of a run that is gone (host {socket.gethostname()}, PID {first.pid}"
        in err
    )
    assert "no such process on this host" in err
    assert sorted(os.listdir(folder)) == []  # released: no lock, no temporary file


def test_the_lock_is_released_on_an_exception_and_is_reentrant_in_one_process(tmp_path):
    folder = tmp_path / "runs" / "r"
    with pytest.raises(RuntimeError, match="boom"), lock_run(folder):
        with lock_run(folder):  # run_job takes it, then the job's driver
            assert (folder / LOCK_FILE).exists()
        assert (folder / LOCK_FILE).exists()  # the outer holder still has it
        raise RuntimeError("boom")
    assert not (folder / LOCK_FILE).exists()
    assert not (tmp_path / "runs").exists()  # folders made for the lock alone are removed
    with lock_run(RunConfig(storage_path=str(tmp_path / "s"), run_name="cfg")) as lock:
        assert lock.path == tmp_path / "s" / "cfg" / LOCK_FILE


def test_a_lock_from_another_host_is_stale_only_when_its_heartbeat_stops(tmp_path, capsys):
    folder = tmp_path / "r"
    folder.mkdir()
    lock = folder / LOCK_FILE
    lock.write_text(json.dumps({"host": "node-7", "pid": 1, "started": "2026-01-01T00:00:00"}))
    with pytest.raises(RunLockedError, match=r"host node-7, PID 1, started 2026-01-01T00:00:00"):
        with lock_run(folder, stale_after_s=60):
            pass
    old = time.time() - 61
    os.utime(lock, (old, old))
    with lock_run(folder, stale_after_s=60):
        assert json.loads(lock.read_text())["host"] == socket.gethostname()
    assert "no heartbeat for 61 s (more than 60 s)" in capsys.readouterr().err
    # a live holder keeps its lock fresh
    with lock_run(folder, heartbeat_s=0.05):
        os.utime(lock, (old, old))
        time.sleep(0.5)
        assert time.time() - lock.stat().st_mtime < 5


def test_a_second_pretraining_run_of_the_same_name_stops_at_once_naming_the_first(
    tmp_path, holder, capsys, monkeypatch
):
    """The lock is taken before anything else (Ray, the log, the config file): the second run
    writes nothing into the first's folder and never joins or starts Ray (``ray.init`` is made
    to fail loudly: this session may already run a Ray of its own)."""
    import ray

    from histokd.pretrain.config import PretrainConfig
    from histokd.pretrain.job import run_pretraining

    def no_ray(*args, **kwargs):
        raise AssertionError("ray.init called by a run that should have stopped at its lock")

    monkeypatch.setattr(ray, "init", no_ray)

    storage = tmp_path / "runs"
    (tmp_path / "no_slides").mkdir()  # without the lock, the driver would fail here, not train
    config = PretrainConfig(
        storage_path=str(storage),
        run_name="same",
        teacher="demo",
        slides=[str(tmp_path / "no_slides")],
    )
    first = holder(config.work_dir)
    before = sorted(os.listdir(config.work_dir))
    with pytest.raises(RunLockedError, match=f"PID {first.pid}, started"):
        run_pretraining(config)
    job = _load_job("rckd_pretrain")
    started = time.monotonic()
    argv = ["--storage-path", str(storage), "--run-name", "same", "--teacher", "demo", "--slides", str(tmp_path / "no_slides")]  # fmt: skip
    code = job.main(argv)
    assert code == 2 and time.monotonic() - started < 10
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: {config.work_dir}: in use by another run"
    )
    assert f"PID {first.pid}" in lines[0]
    assert sorted(os.listdir(config.work_dir)) == before == [LOCK_FILE]  # no log, no config.yaml


def _load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(
        spec
    )  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


# every job and tool that writes under a storage folder: its config class(es)
_WRITERS = {}
for _job in sorted((REPO / "jobs").glob("*.py")):
    _module = _load_job(_job.stem)
    _configs = [
        v
        for v in vars(_module).values()
        if isinstance(v, type) and issubclass(v, RunFolderConfig) and v.__module__ != "histokd.run"
    ]
    _WRITERS[_job.stem] = _configs
# these write demo data to --demo-dir, never under a storage folder or a run name
_NO_STORAGE = {"make_demo_slides", "make_demo_tasks"}


def test_every_job_but_the_demo_data_makers_has_a_run_folder():
    assert {job for job, configs in _WRITERS.items() if not configs} == _NO_STORAGE


@pytest.mark.parametrize("name", ["../x", "/abs", ".hidden", "a=b", "a+b", "..", "-x", "a/b"])
@pytest.mark.parametrize(
    "config_cls",
    sorted({c for cs in _WRITERS.values() for c in cs}, key=lambda c: c.__qualname__),
    ids=lambda c: c.__qualname__,
)
def test_one_run_name_rule_for_every_job(config_cls, name, tmp_path):
    rule = r": must be 1-128 characters of letters, digits and \. _ -, not starting with \. or -$"
    with pytest.raises(SystemExit, match=f"error: run_name={re.escape(repr(name))}{rule}"):
        parse_config(config_cls, [f"--run-name={name}", f"--storage-path={tmp_path}"])


def test_a_run_folder_that_resolves_outside_the_storage_folder_is_refused(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=r"run_name: .*link' resolves to .*elsewhere', outside the storage folder"):  # fmt: skip
        RunConfig(storage_path=str(tmp_path / "runs"), run_name="link")
    assert (
        RunConfig(storage_path=str(tmp_path / "runs"), run_name="ok_1.v-2").run_name == "ok_1.v-2"
    )


def test_a_relative_output_path_in_a_ray_job_resolves_under_histokd_home(
    tmp_path, monkeypatch, capsys
):
    """`ray job submit --working-dir .` runs the job in a folder Ray deletes: a relative storage
    path goes under $HISTOKD_HOME there, said once; elsewhere it is relative to the cwd."""
    from histokd import run
    from histokd.pretrain.config import PretrainConfig

    job_dir = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)
    monkeypatch.setenv("HISTOKD_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(run, "_ANNOUNCED", set())
    assert run.ray_job_working_dir() == str(job_dir)
    config = PretrainConfig()  # the defaults: storage `runs`, demo data `demo_data`
    assert config.storage_path == str(tmp_path / "home" / "runs")
    assert config.demo_dir == str(tmp_path / "home" / "demo_data")
    assert config.work_dir == tmp_path / "home" / "runs" / config.run_name
    PretrainConfig()
    notices = [line for line in capsys.readouterr().err.splitlines() if "Ray job" in line]
    assert len(notices) == 2 and "storage_path='runs'" in notices[0]  # once per path
    assert run.resolve_output_path("/abs/runs", "storage_path") == "/abs/runs"
    assert run.resolve_output_path("s3://b/runs", "storage_path") == "s3://b/runs"
    monkeypatch.chdir(tmp_path)
    assert run.ray_job_working_dir() is None
    assert run.resolve_output_path("runs", "storage_path") == str(tmp_path / "runs")
