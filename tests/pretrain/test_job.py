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
    assert {"backbone", "overlays", "curves.png", "config.yaml", "label_share.csv"} <= artifacts
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


def test_resume_after_stop(ray_cluster, tiny_pretrain_config):
    from histokd.pretrain.job import run_pretraining

    first = run_pretraining(
        tiny_pretrain_config(run_name="resumable", stop_after_epoch=1, teacher="deconvolution")
    )
    assert [h["epoch"] for h in first.history] == [1]
    second = run_pretraining(tiny_pretrain_config(run_name="resumable", teacher="deconvolution"))
    assert [h["epoch"] for h in second.history] == [1, 2, 3]
    assert second.history[0] == first.history[0]  # epoch 1 was not redone
    assert second.mlflow_run_id == first.mlflow_run_id
    history = json.loads((Path(second.run_dir) / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
