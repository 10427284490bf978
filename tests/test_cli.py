"""The one CLI helper and the run scaffold's config: integer checks, where a run lives, run
names, deprecated flag names, hidden test flags, nested job configs, and a fast --help."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from histokd.cli import check_ints, check_positive, parse_config, parse_json_object, print_fields
from histokd.run import RunConfig, WorkerConfig, check_run_name

REPO = Path(__file__).resolve().parents[1]


@dataclass
class _Job(RunConfig):
    workers: int | None = 2
    lr: float = 0.1
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
    check_ints(_Job(workers=None), ["workers"], auto="None (the model file's)")


@pytest.mark.parametrize(
    ("value", "example", "auto", "message"),
    [(0, "", False, "lr=0: must be positive$"), (-1.5, "20", False, r"lr=-1.5: must be positive \(e.g. 20\)$"),
     (True, "", False, "lr=True: must be positive"), ("2", "", False, "lr='2': must be positive"),
     (None, "", False, "lr=None: must be positive$"),
     (0.0, "20", "None (the dataset's)", r"lr=0.0: must be positive \(e.g. 20\) or None \(the dataset's\)$")],
)  # fmt: skip
def test_check_positive_names_the_field_value_and_what_is_allowed(value, example, auto, message):
    with pytest.raises(ValueError, match=message):
        check_positive(_Job(lr=value), ["epochs", "lr"], example=example, auto=auto)


def test_check_positive_accepts_what_it_allows_and_check_ints_says_what_none_means():
    check_positive(_Job(lr=1e-9), ["lr"])
    check_positive(_Job(lr=None), ["lr"], auto="None")
    with pytest.raises(
        ValueError, match=r"^workers=0: must be a positive integer or None \(the dataset's\)$"
    ):
        check_ints(_Job(workers=0), ["workers"], auto="None (the dataset's)")


def test_print_fields_aligns_the_values(capsys):
    print_fields({"outputs": "runs/a", "bad slides": 2, "MLflow": "sqlite:///m.db  run 7"})
    assert capsys.readouterr().out.splitlines() == [
        "outputs:    runs/a",
        "bad slides: 2",
        "MLflow:     sqlite:///m.db  run 7",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [("{", r"^x.json: not JSON \(Expecting property name enclosed in double quotes\); expected an object such as \{\}$"),
     ("[20]", r"^x.json: holds a list; expected an object such as \{\}$")],
)  # fmt: skip
def test_parse_json_object_names_where_and_shows_an_example(text, message):
    with pytest.raises(ValueError, match=message):
        parse_json_object(text, "x.json", "{}")
    assert parse_json_object('{"a": 1}', "x.json", "{}") == {"a": 1}


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


@pytest.mark.parametrize("name", ["a/b", "", "-x", "a b", "x" * 129, "..", "run\n", "a=b", "a+b"])
def test_run_names_are_folder_and_mlflow_safe(name):
    with pytest.raises(
        ValueError,
        match=r"run_name=.*: must be 1-128 characters of letters, digits and \. _ -, not starting",
    ):
        _Job(run_name=name)
    assert check_run_name("tcga-csat_lr0.1_pe.v2") == "tcga-csat_lr0.1_pe.v2"


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


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [("lr: fast", "lr='fast': must be a number"), ("epochs: 2.5", "epochs=2.5: must be an integer"),
     ("workers: true", "workers=True: must be an integer or null"),
     ("augment: 'yes'", "augment='yes': must be true or false"),
     ("lrs: 0.1", "lrs=0.1: must be a list of numbers"), ("lrs: [0.1, x]", r"lrs\[1\]='x': must be a number"),
     ("job: {lr: '1/2'}", "job: lr='1/2': must be a number"), ("run_name: 2024", "run_name=2024: must be a string")],
)  # fmt: skip
def test_a_yaml_value_of_the_wrong_type_names_the_field(tmp_path, yaml_text, message):
    """Before: ``'>' not supported between instances of 'str' and 'int'``, or no error at all."""
    (tmp_path / "c.yaml").write_text(yaml_text + "\n")
    with pytest.raises(SystemExit, match=rf"^error: --config .*c\.yaml: {message}$"):
        parse_config(
            _Search if yaml_text.startswith(("lrs", "job")) else _Job,
            ["--config", str(tmp_path / "c.yaml")],
        )


def test_yaml_numbers_become_the_fields_types(tmp_path):
    """Ints are numbers; YAML 1.1 reads ``1e-4`` as text, which is a number here."""
    (tmp_path / "c.yaml").write_text("lrs: [1, 1e-4]\njob: {lr: 1, workers: null, epochs: 4}\n")
    config = parse_config(_Search, ["--config", str(tmp_path / "c.yaml")])
    assert config.lrs == [1.0, 1e-4] and all(type(v) is float for v in config.lrs)
    assert (config.job.lr, type(config.job.lr), config.job.workers, config.job.epochs) == (
        1.0,
        float,
        None,
        4,
    )


def test_a_job_config_names_the_field_of_a_string_where_a_float_belongs(tmp_path):
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        from build_manifest import ManifestJobConfig
    finally:
        sys.path.remove(str(REPO / "jobs"))
    (tmp_path / "m.yaml").write_text("slides: [a.svs]\nmin_tissue_fraction: high\n")
    with pytest.raises(SystemExit, match="min_tissue_fraction='high': must be a number$"):
        parse_config(ManifestJobConfig, ["--config", str(tmp_path / "m.yaml")])


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
     (["--workers", "two"], "argument --workers: invalid int value: 'two'"),
     (["--augment=yes"], "argument --augment/--no-augment: ignored explicit argument 'yes'"),
     (["--lrs", "0.1", "x"], "argument --lrs: invalid float value: 'x'")],
)  # fmt: skip
def test_a_flag_of_the_wrong_type_names_the_field(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(_Search, argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def _writes_read_only_folders() -> bool:
    """True where chmod cannot stop this process (root, with CAP_DAC_OVERRIDE)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o555)
        try:
            open(os.path.join(folder, "probe"), "w").close()
            return True
        except PermissionError:
            return False
        finally:
            os.chmod(folder, 0o755)


def _manifest_job(tmp_path, slides_dir, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / "build_manifest.py"), "--local", "--slides",
         str(slides_dir / "cmu-1-small-region.svs"), "--storage-path", str(tmp_path / "runs"),
         "--run-name", "m", "--magnification", "5", "--patch-size", "64", "--num-patches", "30"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, **popen,
    )  # fmt: skip


@pytest.mark.skipif(
    _writes_read_only_folders(), reason="this user (root) writes into read-only folders"
)
@pytest.mark.parametrize("read_only", ["storage", "run"])
def test_build_manifest_on_a_read_only_folder_is_one_line_and_exit_1(
    tmp_path, slides_dir, read_only
):
    """Before: a raw OSError traceback (jobs/build_manifest.py:55)."""
    storage, run_dir = tmp_path / "runs", tmp_path / "runs" / "m"
    if read_only == "storage":
        storage.mkdir()
        storage.chmod(0o555)
    else:  # only the job's log can be written
        (run_dir / "logs").mkdir(parents=True)
        run_dir.chmod(0o555)
    try:
        out = _manifest_job(tmp_path, slides_dir)
    finally:
        for folder in (storage, run_dir):
            if folder.exists():
                folder.chmod(0o755)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr[-2000:]
    named = run_dir if read_only == "storage" else run_dir / "manifest.parquet"
    assert lines[0] == f"error: cannot write {named}: Permission denied"
    left = sorted(str(p.relative_to(storage)) for p in storage.rglob("*"))
    assert left == ([] if read_only == "storage" else ["m", "m/logs", "m/logs/driver.log"])


def test_build_manifest_on_a_full_disk_leaves_no_partial_output(tmp_path, slides_dir):
    """A file-size limit stands for a full disk (it holds for root too): the log fits, the
    manifest does not. The error names the file; no temporary or half file is left."""
    import resource

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill

    out = _manifest_job(tmp_path, slides_dir, preexec_fn=limit_file_size)
    run_dir = tmp_path / "runs" / "m"
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr[-2000:]
    assert lines[0] == f"error: cannot write {run_dir / 'manifest.parquet'}: File too large"
    assert sorted(p.name for p in run_dir.iterdir()) == ["logs"]
    assert _manifest_job(tmp_path, slides_dir).returncode == 0  # the same job, with room
    assert {"manifest.parquet", "manifest.json", "bad_slides.csv"} <= {
        p.name for p in run_dir.iterdir()
    }


def test_a_manifest_that_cannot_be_put_in_place_leaves_none_of_its_files(tmp_path, slides_dir):
    """The last step fails (``manifest.json`` is a folder): the manifest and the bad-slide list
    already moved into place are taken back, and no temporary file stays."""
    run_dir = tmp_path / "runs" / "m"
    (run_dir / "manifest.json").mkdir(parents=True)
    out = _manifest_job(tmp_path, slides_dir)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr[-2000:]
    assert lines[0] == f"error: cannot write {run_dir / 'manifest.json'}: Is a directory"
    assert sorted(p.name for p in run_dir.iterdir()) == ["logs", "manifest.json"]


def test_only_disk_errors_become_one_line():
    import errno

    from histokd.cli import disk_error_line

    assert disk_error_line(PermissionError(errno.EACCES, "Permission denied", "/x/y")) == (
        "cannot write /x/y: Permission denied"
    )
    assert disk_error_line(OSError(errno.ENOSPC, "No space left on device")) == (
        "a disk write failed: [Errno 28] No space left on device"
    )
    assert disk_error_line(ConnectionRefusedError(errno.ECONNREFUSED, "refused")) is None
    assert disk_error_line(TimeoutError("slow")) is None
    assert disk_error_line(TimeoutError(errno.ETIMEDOUT, "timed out sending the file")) is None
