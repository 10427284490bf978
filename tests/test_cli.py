"""The one CLI helper and the run scaffold's config: integer checks, where a run lives, run
names, deprecated flag names, hidden test flags, nested job configs, and a fast --help."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from histokd.cli import check_ints, parse_config
from histokd.run import RunConfig, WorkerConfig, check_run_name

REPO = Path(__file__).resolve().parents[1]


@dataclass
class _Job(RunConfig):
    workers: int | None = 2
    epochs: int = field(default=3, metadata={"help": "epochs", "aliases": ["max_epochs"]})
    augment: bool = field(default=True, metadata={"help": "flip", "aliases": ["flip"]})
    fail_at_epoch: int | None = field(default=None, metadata={"help": "x", "cli": "hidden"})


@dataclass
class _Search(RunConfig):
    job: _Job = field(default_factory=_Job)
    lrs: list[float] = field(default_factory=lambda: [0.1])

    def __post_init__(self) -> None:
        super().__post_init__()
        self.job = _Job(**self.job) if isinstance(self.job, dict) else self.job


@pytest.mark.parametrize(
    ("value", "minimum", "auto", "message"),
    [(0, 1, False, "workers=0: must be a positive integer$"), (-1, 0, False, "workers=-1: must be a non-negative integer$"),
     (True, 0, False, "workers=True: must be a non-negative integer"), (2.0, 1, True, "workers=2.0: must be a positive integer or auto"),
     (None, 1, False, "workers=None"), (1, 2, False, "workers=1: must be an integer >= 2")],
)  # fmt: skip
def test_check_ints_names_the_field_value_and_what_is_allowed(value, minimum, auto, message):
    with pytest.raises(ValueError, match=message):
        check_ints(_Job(workers=value), ["epochs", "workers"], minimum=minimum, auto=auto)


def test_check_ints_accepts_what_it_allows():
    check_ints(_Job(workers=None), ["workers"], auto=True)
    check_ints(_Job(workers=0), ["workers"], minimum=0)


def test_run_storage_local_and_remote(tmp_path):
    local = _Job(storage_path="/data/runs", run_name="r1")
    assert (local.run_dir, local.tracking_uri) == (
        "/data/runs/r1",
        "sqlite:////data/runs/mlflow.db",
    )
    assert local.artifact_location == "/data/runs/mlartifacts" and local.work_dir == Path(
        "/data/runs/r1"
    )
    remote = _Job(storage_path="s3://bucket/runs/", run_name="r1")
    assert remote.run_dir == "s3://bucket/runs/r1" and remote.artifact_location is None
    assert remote.work_dir == Path("histokd_work").absolute() / "r1"
    with pytest.raises(
        ValueError,
        match="mlflow_tracking_uri is unset and storage_path='s3://bucket/runs/' is remote",
    ):
        _ = remote.tracking_uri
    tracked = _Job(storage_path="s3://b", mlflow_tracking_uri="http://mlflow:5000")
    assert tracked.tracking_uri == "http://mlflow:5000"
    assert _Job(storage_path="runs").storage_path == str(Path("runs").absolute())  # Ray wants it
    with pytest.raises(ValueError, match="cpus_per_worker=0: must be positive"):
        WorkerConfig(cpus_per_worker=0)


@pytest.mark.parametrize("name", ["a/b", "", "-x", "a b", "x" * 129, "..", "run\n"])
def test_run_names_are_folder_and_mlflow_safe(name):
    with pytest.raises(
        ValueError,
        match=r"run_name=.*: must be 1-128 characters of letters, digits and \. _ = \+ -",
    ):
        _Job(run_name=name)
    assert check_run_name("tcga-csat_lr=0.1+pe.v2") == "tcga-csat_lr=0.1+pe.v2"


def test_old_flag_names_work_once_more_with_a_notice(tmp_path, capsys):
    config = parse_config(_Job, ["--max-epochs", "7", "--no-flip", "--storage-path", str(tmp_path)])
    assert (config.epochs, config.augment) == (7, False)
    err = capsys.readouterr().err
    assert "notice: --max-epochs is deprecated and goes in histokd 0.2: use --epochs" in err
    assert "notice: --no-flip is deprecated" in err
    (tmp_path / "old.yaml").write_text("max_epochs: 9\n")
    assert parse_config(_Job, ["--config", str(tmp_path / "old.yaml")]).epochs == 9
    assert (
        "'max_epochs' is deprecated and goes in histokd 0.2: use 'epochs'"
        in capsys.readouterr().err
    )
    assert parse_config(_Job, ["--epochs", "4"]).epochs == 4 and capsys.readouterr().err == ""


def test_help_hides_test_hooks_and_old_names_and_groups_the_run_fields(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        parse_config(_Job, ["--help"])
    text = capsys.readouterr().out
    assert "--epochs" in text and "--fail-at-epoch" not in text and "--max-epochs" not in text
    own, common = text.split("run and cluster (the same in every job):")
    assert "--epochs" in own and "--run-name" in common and "--storage-path" in common
    assert parse_config(_Job, ["--fail-at-epoch", "2"]).fail_at_epoch == 2  # hidden, not gone


def test_a_search_holds_its_job_config(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text("lrs: [0.5]\njob: {epochs: 5}\n")
    config = parse_config(_Search, ["--config", str(tmp_path / "s.yaml"), "--workers", "4"])
    assert config.lrs == [0.5] and (config.job.epochs, config.job.workers) == (5, 4)
    (tmp_path / "bad.yaml").write_text("job: {epochz: 5}\n")
    with pytest.raises(SystemExit, match=r"--config .*bad.yaml: job: unknown field 'epochz'"):
        parse_config(_Search, ["--config", str(tmp_path / "bad.yaml")])


JOBS = sorted(p.name for p in (REPO / "jobs").glob("*.py"))


def test_every_job_answers_help_without_torch_ray_or_tensorflow():
    """Every job and tool: ``--help`` shows ``--config`` and ``--print-config`` and imports none of
    the heavy frameworks (it took 20-50 s on a busy machine when it did)."""
    code = (
        "import contextlib, io, runpy, sys\n"
        "heavy = ('torch', 'timm', 'ray', 'tensorflow', 'mlflow')\n"
        "for job in sys.argv[1:]:\n"
        "    sys.argv, out = [job, '--help'], io.StringIO()\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(out):\n"
        "            runpy.run_path(job, run_name='__main__')\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, (job, exc.code)\n"
        "    text = out.getvalue()\n"
        "    assert '--config FILE.yaml' in text and '--print-config' in text, job\n"
        "    loaded = [m for m in heavy if m in sys.modules]\n"
        "    assert not loaded, (job, loaded)\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *(str(REPO / "jobs" / j) for j in JOBS)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
