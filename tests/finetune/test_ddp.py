"""Data parallelism changes nothing but speed: two DDP workers train as one worker does with the
same global batch (fine-tuning's real Ray Train loop, ``train_fn_per_worker``)."""

from __future__ import annotations

import pytest

from histokd.finetune import FinetuneConfig, run_finetune


@pytest.mark.slow
def test_two_workers_train_like_one_with_the_same_global_batch(
    ray_cluster, tmp_path, demo_tasks_small
):
    """Losses per epoch of 1 worker (batch 22) and 2 workers (11 each) agree to 1e-5.

    Why the comparison is exact up to float rounding:
    - convnextv2_atto normalises with LayerNorm (and GRN), per sample: no BatchNorm, so no
      per-worker batch statistics;
    - no augmentation and no dropout: the forward pass is deterministic;
    - the global batch is the whole training split (22 of the 36 demo images), so each epoch is
      one SGD step on the same 22 images in both runs, whatever order the samplers draw: DDP's
      mean of two 11-image gradient means is the 22-image mean.
    What remains is summation order in float32 (about 1e-7 relative per step); 1e-5 is two
    orders above it and far below what a broken reduction changes: workers stepping on their
    own halves without DDP, or both on the same half, move the losses by 30-150 %.
    """
    common = dict(
        data=str(demo_tasks_small.classification_dir), storage_path=str(tmp_path / "runs"),
        backbone="convnextv2_atto", input_size=32, batch_size=22, epochs=3, patience=10, lr=0.05,
        augment=False, drop_rate=0.0, num_splits=1, bootstrap_resamples=100, cpus_per_worker=1,
    )  # fmt: skip
    # One worker in Ray Train's local mode (this process), the same loop function: it saves
    # starting a second worker group.
    one = run_finetune(FinetuneConfig(run_name="one", num_workers=0, **common), tracking=False)
    two = run_finetune(FinetuneConfig(run_name="two", num_workers=2, **common), tracking=False)
    (a,), (b,) = one.split_results, two.split_results
    assert a["sizes"] == b["sizes"] == {"train": 22, "val": 7, "test": 7}
    assert [h["epoch"] for h in a["history"]] == [h["epoch"] for h in b["history"]] == [1, 2, 3]
    for key in ("train_loss", "val_loss"):
        assert [h[key] for h in b["history"]] == pytest.approx(
            [h[key] for h in a["history"]], rel=1e-5
        ), key
    assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-5)
    # The steps did change the model: otherwise equal losses would prove nothing.
    losses = [h["train_loss"] for h in a["history"]]
    assert abs(losses[2] - losses[0]) > 0.01 * losses[0], losses
