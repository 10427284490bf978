"""Checkpoints trusted only when whole (histokd.resume): checksums, set-aside, fallback; and
the end of an interrupted job (cli.run_job). Real files and torch files; no Ray."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from histokd.resume import (
    CHECKSUM_FILE,
    SET_ASIDE_NOTE,
    find_good_checkpoint,
    load_verified,
    seal_folder,
    write_atomic,
    write_sidecar,
)


def _checkpoint(run: Path, stamp: str, epoch: int, seal: bool = True) -> Path:
    folder = run / f"checkpoint_2026-01-01_00-00-{stamp}.000000"
    folder.mkdir(parents=True)
    write_atomic(folder / "checkpoint.pt", lambda f: torch.save({"epoch": epoch}, f))
    (folder / "overlay.png").write_bytes(bytes(range(256)) * 4)
    if seal:
        seal_folder(folder)
    return folder


def _load(folder: str) -> dict:
    return torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_latest_checkpoint_is_set_aside_and_the_previous_used(tmp_path, capsys):
    run = tmp_path / "run"
    first, second = _checkpoint(run, "01", 1), _checkpoint(run, "02", 2)
    _truncate(second / "checkpoint.pt")
    fs = pafs.LocalFileSystem()
    path, state = find_good_checkpoint(fs, str(second), _load)
    assert (path, state) == (str(first), {"epoch": 1})
    bad = run / (second.name + ".bad")
    assert (bad / "checkpoint.pt").is_file() and (bad / CHECKSUM_FILE).is_file()  # kept to look at
    # the name stays (Ray Train's run snapshot lists it), empty but for a note saying why
    assert [p.name for p in second.iterdir()] == [SET_ASIDE_NOTE]
    assert "checkpoint.pt fails its checksum" in (second / SET_ASIDE_NOTE).read_text()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        f"warning: checkpoint {second}: damaged (DamagedFile: checkpoint.pt fails its checksum); "
        f"set aside as {bad.name}"
    )
    assert out[1] == f"resuming from the newest good checkpoint, {first}"
    # asked again (Ray hands back the same latest), it is skipped without a second set-aside
    assert find_good_checkpoint(fs, str(second), _load) == (str(first), {"epoch": 1})
    assert not (run / (second.name + ".bad2")).exists()
    assert "set aside as" not in capsys.readouterr().out


def test_checksums_catch_what_loading_misses_and_loading_checks_unsealed_ones(tmp_path, capsys):
    run = tmp_path / "run"
    oldest = _checkpoint(run, "01", 1, seal=False)  # written before checksums: loads, so used
    legacy = _checkpoint(run, "02", 2, seal=False)  # truncated without checksums: fails to load
    _truncate(legacy / "checkpoint.pt")
    flipped = _checkpoint(run, "03", 3)  # the state loads, but another file changed
    data = bytearray((flipped / "overlay.png").read_bytes())
    data[100] ^= 1
    (flipped / "overlay.png").write_bytes(bytes(data))
    newer = _checkpoint(run, "04", 4)  # newer than Ray's latest (an upload cut short): ignored
    path, state = find_good_checkpoint(pafs.LocalFileSystem(), str(flipped), _load)
    assert (path, state) == (str(oldest), {"epoch": 1})
    out = capsys.readouterr().out
    assert "overlay.png fails its checksum" in out and str(legacy) in out
    assert (run / (legacy.name + ".bad")).is_dir() and (run / (flipped.name + ".bad")).is_dir()
    assert (newer / "checkpoint.pt").is_file() and not (run / (newer.name + ".bad")).exists()


def test_no_good_checkpoint_starts_from_scratch_and_other_ranks_only_skip(tmp_path, capsys):
    run = tmp_path / "run"
    only = _checkpoint(run, "01", 1)
    (only / "checkpoint.pt").unlink()
    fs = pafs.LocalFileSystem()
    assert find_good_checkpoint(fs, str(only), _load, set_aside_bad=False) == (None, None)
    assert (only / CHECKSUM_FILE).is_file() and capsys.readouterr().out == ""  # untouched
    assert find_good_checkpoint(fs, str(only), _load) == (None, None)
    out = capsys.readouterr().out
    assert "checkpoint.pt is missing" in out
    assert out.rstrip().endswith(f"no good checkpoint left in {run}: starting from scratch")


def test_a_reused_file_is_checked_and_a_damaged_one_set_aside(tmp_path, capsys):
    path = tmp_path / "result.json"
    write_atomic(path, lambda f: Path(f).write_text(json.dumps({"accuracy": 0.75})))
    write_sidecar(path)
    assert load_verified(path, lambda p: json.loads(p.read_text())) == {"accuracy": 0.75}
    path.write_text(json.dumps({"accuracy": 0.95}))  # still valid JSON, but not what was written
    assert load_verified(path, lambda p: json.loads(p.read_text()), "split result") is None
    assert not path.exists() and not Path(f"{path}.sha256").exists()
    assert json.loads((tmp_path / "result.json.bad").read_text()) == {"accuracy": 0.95}
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"warning: {path}: damaged split result (DamagedFile: checksum mismatch")
    assert line.endswith("; set aside as result.json.bad, it will be redone")
    path.write_text('{"accuracy": 0.')  # no checksum (written before them): loading decides
    assert load_verified(path, lambda p: json.loads(p.read_text())) is None
    assert (tmp_path / "result.json.bad2").is_file()
    assert load_verified(tmp_path / "missing.json", json.loads) is None


def test_a_damaged_cache_shard_is_set_aside_and_its_patches_labelled_again(tmp_path, capsys):
    import numpy as np

    from histokd.teachers.cache import RecordCache

    cache = RecordCache(tmp_path, "teacher-abc", 8)
    images = np.zeros((2, 8, 8, 3), np.uint8)
    labels = np.zeros((2, 8, 8), np.uint8)
    labels[0, :4] = 1
    good = cache.write(["a", "b"], ["s", "s"], [0, 8], [0, 0], images, labels)
    flipped = cache.write(["c"], ["s"], [16], [0], images[:1], labels[:1])
    truncated = cache.write(["d"], ["s"], [24], [0], images[:1], labels[:1])
    unsealed = cache.write(["e"], ["s"], [32], [0], images[:1], labels[:1])
    assert Path(f"{good}.sha256").read_text().strip() != ""
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    _truncate(truncated)
    Path(f"{unsealed}.sha256").unlink()
    _truncate(unsealed)
    index = cache.index()
    assert sorted(index) == ["a", "b"]  # the damaged shards' patches go back to the teacher
    assert RecordCache.read(index["a"][0], [0, 1])[1].tolist() == labels.tolist()
    assert cache.shards() == [good]
    for shard in (flipped, truncated, unsealed):
        assert Path(f"{shard}.bad").is_file() and not Path(f"{shard}.sha256").exists()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all("damaged record cache shard" in x for x in lines)
    # labelled again, the patch's new shard is used
    cache.write(["c"], ["s"], [16], [0], images[:1], labels[:1])
    assert sorted(cache.index()) == ["a", "b", "c"]


def test_ctrl_c_ends_the_jobs_mlflow_runs_as_killed(tmp_path, capsys):
    """The shared end of every job (cli.run_job): one line, exit code 130, KILLED runs (SIGTERM:
    tests/pretrain/test_job.py, on a real job)."""
    import mlflow

    from histokd.cli import run_job
    from histokd.run import RunConfig, open_mlflow_run

    def run(config):
        done = open_mlflow_run(config, "test", run_name="child-done")
        done.finish("FINISHED")
        failed = open_mlflow_run(config, "test", run_name="child-failed")
        open_mlflow_run(config, "test")
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException:
            failed.finish("FAILED")  # as a driver's except clause might on the way out
            raise
        raise AssertionError("the signal did not stop the job")

    argv = ["--run-name", "sig", "--storage-path", str(tmp_path / "runs")]
    handler = signal.getsignal(signal.SIGTERM)  # Ray's own, where this session started Ray
    with pytest.raises(SystemExit) as stopped:
        run_job(RunConfig, run, argv)
    assert stopped.value.code == 130
    config = RunConfig(run_name="sig", storage_path=str(tmp_path / "runs"))
    client = mlflow.MlflowClient(config.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(config.mlflow_experiment).experiment_id])  # fmt: skip
    status = {r.info.run_name: r.info.status for r in runs}
    assert status == {"child-done": "FINISHED", "child-failed": "KILLED", "sig": "KILLED"}
    err = [x for x in capsys.readouterr().err.splitlines() if "mlflow" not in x]
    assert len(err) == 1 and err[0].startswith("stopped by SIGINT (Ctrl-C): MLflow run(s) ")
    assert err[0].endswith(f"ended as KILLED; the checkpoints in {config.run_dir} are kept: "
                           "rerun with the same --run-name to resume")  # fmt: skip
    assert signal.getsignal(signal.SIGTERM) is handler  # the handler is put back
