"""The RCKD pretraining job end to end on a local Ray: output, faults, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from histokd.pretrain.loop import patch_checksum

pytestmark = pytest.mark.slow


def _expected_train_checksum(run_dir: Path) -> tuple[int, int]:
    ids = pq.read_table(run_dir / "manifest" / "train.parquet").column("patch_id").to_pylist()
    return len(ids), patch_checksum(ids)


def test_whole_job_gives_a_backbone_that_loads(ray_cluster, tiny_pretrain_config):
    from histokd.models import ClassificationModel
    from histokd.pretrain.job import run_pretraining

    result = run_pretraining(tiny_pretrain_config())
    assert Path(result.backbone_path).is_file()
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    model = ClassificationModel("csat", num_classes=3, backbone_file=result.backbone_path)
    state = torch.load(result.backbone_path, weights_only=True)
    first = next(k for k in state if k.endswith("weight"))
    assert torch.equal(model.backbone_state_dict()[first], state[first])
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    # every epoch saw every training patch exactly once
    count, checksum = _expected_train_checksum(Path(result.run_dir))
    for h in result.history:
        assert (h["patches"], h["patch_checksum"]) == (count, checksum)
    # MLflow has the params, the per-epoch metrics, and the backbone
    import mlflow

    client = mlflow.MlflowClient(result.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["backbone"] == "csat" and run.data.params["alpha"] == "0.5"
    assert len(client.get_metric_history(result.mlflow_run_id, "holdout_foreground_iou")) == 3
    assert "histokd.git_commit" in run.data.tags
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {"backbone", "overlays", "curves.png", "config.yaml", "label_share.csv",
            "augmentation_examples.png"} <= artifacts  # fmt: skip
    assert (Path(result.run_dir) / "augmentation_examples.png").is_file()
    # the backbone as an MLflow model (tests/pretrain/test_backbone_model.py loads one back)
    source = f"source_run_id = '{result.mlflow_run_id}'"
    (model,) = client.search_logged_models([run.info.experiment_id], filter_string=source)
    assert model.name == "backbone" and str(model.status).endswith("READY")
    # each slide's pseudo-label nucleus share (issue 15): both demo slides, every patch counted once
    assert {Path(r["slide"]).name for r in result.label_share} == {
        "demo-s0-000.svs",
        "demo-s0-001.svs",
    }
    assert sum(r["patches"] for r in result.label_share) == count
    assert all(
        0.02 < r["mean_nucleus_share"] < 0.7 and r["empty_fraction"] < 0.5
        for r in result.label_share
    )
    assert (
        "over 2 slides" in result.label_share_summary
        and "mostly empty" not in result.label_share_summary
    )
    shares = client.get_metric_history(result.mlflow_run_id, "train_label_nucleus_share")
    assert (
        len(shares) == 3 and len({m.value for m in shares}) == 1
    )  # the teacher's labels: the same each epoch
    # beside the rolling checkpoints, the best epoch by hold-out IoU (first of any tie)
    best = torch.load(Path(result.run_dir) / "best" / "model.pt", weights_only=True)
    ious = [h["holdout_foreground_iou"] for h in result.history]
    assert best["epoch"] == 1 + ious.index(max(ious)) and best["holdout_foreground_iou"] == max(
        ious
    )
    assert any(
        k.startswith("decoder.") for k in best["model"]
    )  # the whole student, decoder included


def test_worker_fault_recovers_from_checkpoint(ray_cluster, tiny_pretrain_config):
    from histokd.pretrain.job import run_pretraining

    config = tiny_pretrain_config(
        run_name="faulty", fail_at_epoch=2, max_failures=1, teacher="deconvolution"
    )
    result = run_pretraining(config)
    run_dir = Path(result.run_dir)
    assert (run_dir / ".fault_injected").exists()  # the fault did happen
    # epochs continue from the checkpoint: 1 is not trained again, none is missing or doubled
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    count, checksum = _expected_train_checksum(run_dir)
    assert all((h["patches"], h["patch_checksum"]) == (count, checksum) for h in result.history)
    # a restart from scratch would also end with epochs [1, 2, 3]; MLflow shows epoch 1 ran once
    import mlflow

    client = mlflow.MlflowClient(result.tracking_uri)
    assert [m.step for m in client.get_metric_history(result.mlflow_run_id, "loss")] == [1, 2, 3]


def test_two_ddp_workers_share_each_epoch(ray_cluster, tiny_pretrain_config):
    """Two training workers: each patch is trained at most once per epoch across both shards.

    Ray Train splits the stream with ``equal=True`` so that DDP workers take the same number of
    steps: with W workers up to W - 1 patches an epoch are left out (like a sampler's drop_last).
    """
    from histokd.pretrain.job import run_pretraining

    config = tiny_pretrain_config(run_name="ddp", teacher="deconvolution", epochs=2, num_workers=2,
                  cpus_per_worker=0.5)  # fmt: skip
    result = run_pretraining(config)
    run_dir = Path(result.run_dir)
    count, checksum = _expected_train_checksum(run_dir)
    ids = pq.read_table(run_dir / "manifest" / "train.parquet").column("patch_id").to_pylist()
    left_out_sums = {0} | {patch_checksum([pid]) for pid in ids}  # none, or any one patch
    assert [h["epoch"] for h in result.history] == [1, 2]
    for h in result.history:
        assert h["patches"] in (count, count - 1), (h["patches"], count)
        assert checksum - h["patch_checksum"] in left_out_sums  # the rest is each patch once
        assert (h["patches"] == count) == (h["patch_checksum"] == checksum)


def test_resume_after_stop_from_the_newest_whole_checkpoint(
    ray_cluster, tiny_pretrain_config, capsys
):
    """A stopped run resumes under its name, in its MLflow run; a cut-short latest checkpoint
    (issue 17: it made the run impossible to resume) is set aside and the one before it used.
    The records made by the first run (``records/`` in the run folder) serve the rerun: it
    labels nothing and rewrites no shard."""
    from histokd.pretrain.job import run_pretraining
    from histokd.resume import SET_ASIDE_NOTE

    config = dict(run_name="resumable", teacher="deconvolution")
    first = run_pretraining(tiny_pretrain_config(stop_after_epoch=2, **config))
    assert [h["epoch"] for h in first.history] == [1, 2]
    printed = capsys.readouterr().out
    n = first.num_train_patches + first.num_holdout_patches
    assert "record cache: " in printed and "patches labelled and stored" in printed
    assert (
        f"records-64px-jpeg95: {n} records, " in printed
        and "400,000 records (RCKD's S_n) would take" in printed
    )
    shards = {
        p: p.stat().st_mtime_ns for p in (Path(first.run_dir) / "records").rglob("shard-*.parquet")
    }
    assert len(shards) >= 2
    latest = Path(first.checkpoint_path)
    state = latest / "checkpoint.pt"
    state.write_bytes(state.read_bytes()[:2048])  # a copy cut short (disk full, a killed upload)
    second = run_pretraining(tiny_pretrain_config(**config))
    assert [h["epoch"] for h in second.history] == [1, 2, 3]
    printed = capsys.readouterr().out
    assert "labelled and stored" not in printed and f": {n} records, " in printed
    assert {
        p: p.stat().st_mtime_ns for p in (Path(first.run_dir) / "records").rglob("shard-*.parquet")
    } == shards
    assert second.history[0] == first.history[0]  # resumed from epoch 1's checkpoint
    assert second.history[1]["seconds"] != first.history[1]["seconds"]  # epoch 2 ran again
    assert second.mlflow_run_id == first.mlflow_run_id
    history = json.loads((Path(second.run_dir) / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    bad = latest.with_name(latest.name + ".bad")
    assert (bad / "checkpoint.pt").stat().st_size == 2048  # set aside, kept to look at
    assert "checkpoint.pt fails its checksum" in (latest / SET_ASIDE_NOTE).read_text()


def test_sigterm_ends_a_running_job_with_its_mlflow_run_killed(tmp_path, tiny_pretrain_config):
    """SIGTERM to a running ``jobs/rckd_pretrain.py``: exit 143, one line, the run KILLED."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import mlflow

    from histokd.cli import save_config

    config = tiny_pretrain_config(teacher="deconvolution", epochs=100, run_name="term")
    storage = Path(config.storage_path)
    save_config(config, tmp_path / "term.yaml")
    argv = ["--config", str(tmp_path / "term.yaml")]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).parents[2] / "jobs" / "rckd_pretrain.py"), *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not list(storage.glob("term/checkpoint_*")):  # an epoch is done: it is training
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("stopped by SIGTERM: MLflow run(s) ")
    client = mlflow.MlflowClient(f"sqlite:///{storage}/mlflow.db")
    (run,) = client.search_runs(
        [client.get_experiment_by_name(config.mlflow_experiment).experiment_id]
    )
    assert run.info.status == "KILLED" and run.info.run_name == "term"
    assert list(storage.glob("term/checkpoint_*/checksums.json"))  # the checkpoints stay
    assert not (storage / "term" / ".histokd.lock").exists()  # released, not left to go stale
