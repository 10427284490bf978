"""Teacher placement: the teacher actor pool or the training workers label the same patches alike.

``teacher_placement="actors"`` labels in a Ray Data actor pool (``pseudo_label_dataset``);
``"trainer"`` streams the read patches only (``patch_dataset``) and each training worker labels
them with a :class:`~histokd.teachers.stream.TrainerTeacher` on its device. Both label the
full-size patch and then resize the label, so the labels must be equal pixel for pixel.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from histokd.pretrain.config import PretrainConfig
from histokd.streams import plan_resources
from histokd.teachers.stream import (
    TeacherActor,
    TrainerTeacher,
    patch_dataset,
    pseudo_label_dataset,
    read_patch_batch,
    resize_label,
    resize_label_tensor,
)

INPUT = 64  # the student's input side here (RCKD: 512 from 1024)


@pytest.fixture(scope="module")
def manifest(demo_slides_dir, tmp_path_factory) -> str:
    """A real manifest of 12 tissue patches of 256 px at 20x from the two demo slides."""
    from histokd.manifest import ManifestConfig, build_manifest

    out = tmp_path_factory.mktemp("placement_manifest")
    config = ManifestConfig(magnification=20, patch_size=256, num_patches=12)
    return str(build_manifest([str(demo_slides_dir)], out, config, use_ray=False).manifest_path)


def _collect(ds) -> dict[str, np.ndarray]:
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _by_patch(records: dict[str, np.ndarray], column: str) -> dict[str, np.ndarray]:
    return {
        str(pid): value for pid, value in zip(records["patch_id"], records[column], strict=True)
    }


@pytest.mark.parametrize(
    "side, size",
    [(256, 64), (1024, 512), (1000, 512), (300, 128), (512, 200), (100, 128), (64, 64)],
)
def test_resize_label_tensor_is_resize_label(side, size):
    """Nucleus-like blobs and salt noise, at integer, non-integer and upsampling ratios."""
    from scipy.ndimage import uniform_filter

    rng = np.random.default_rng(side * 1000 + size)
    blobs = [
        (uniform_filter(rng.random((side, side)), 9) > 0.52).astype(np.uint8) for _ in range(2)
    ]
    noise = [(rng.random((side, side)) < 0.3).astype(np.uint8) for _ in range(2)]
    labels = np.stack(blobs + noise)
    expected = np.stack([resize_label(label, size) for label in labels])
    got = resize_label_tensor(torch.from_numpy(labels), size)
    assert got.dtype == torch.uint8 and tuple(got.shape) == (4, size, size)
    np.testing.assert_array_equal(got.numpy(), expected)
    assert 0.05 < expected.mean() < 0.5  # there were edges to get wrong


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"teacher_placement": "gpu"}, "teacher_placement='gpu': allowed: actors, trainer"),
        ({"teacher": "deconvolution"}, "needs a StarDist teacher.*teacher='deconvolution'"),
        ({"teacher_actors": 2}, "teacher_actors=2: a setting of the teacher actor pool"),
        (
            {"teacher_resources": {"teacher_node": 1}},
            "teacher_resources=.*a setting of the teacher actor pool",
        ),
    ],
)
def test_trainer_placement_settings_fail_early(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PretrainConfig(**{"teacher_placement": "trainer", "teacher": "demo", **kwargs})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"teacher_backend": "tensorflow"},
            "teacher_placement='trainer' runs the teacher's network in the training worker's PyTorch",
        ),
        (
            {"mask_mode": "instances"},
            "mask_mode='instances' runs StarDist's NMS in TensorFlow, which teacher_placement='trainer' cannot",
        ),
    ],
)
def test_trainer_placement_needs_torch(kwargs, message):
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ("tensorflow", "stardist")):
        message = "needs TensorFlow and StarDist"  # refused before the placement is looked at
    with pytest.raises(ValueError, match=message):
        PretrainConfig(teacher_placement="trainer", teacher="demo", **kwargs)


def test_trainer_placement_resources():
    """No actor pool and no GPU for the stream; each training worker takes a whole GPU."""
    from histokd.pretrain.job import _worker_resources

    plan = plan_resources(
        {"CPU": 2.0, "GPU": 1.0}, num_gpus=0.5, reserved_cpus=1.0, placement="trainer"
    )
    assert (plan.num_actors, plan.actor_cpus, plan.actor_gpus) == (0, 0.0, 0.0)
    assert plan.read_cpus == 0.5  # two read tasks at a time in the CPU the worker leaves
    actors = PretrainConfig(teacher_gpus=0.25)
    trainer = PretrainConfig(teacher_gpus=0.25, teacher_placement="trainer", teacher="demo")
    assert _worker_resources(actors, use_gpu=True, gpus=1)["GPU"] == 0.75
    assert _worker_resources(trainer, use_gpu=True, gpus=1) == {"CPU": 1.0, "GPU": 1.0}


def test_both_placements_give_the_same_records(ray_cluster, manifest):
    """The actor pool's records against the patch stream labelled as a training worker does."""
    table = pq.read_table(manifest)
    kwargs = PretrainConfig(teacher="demo", alpha=None).teacher_kwargs()
    actors = _collect(
        pseudo_label_dataset(manifest, "demo", kwargs, input_size=INPUT, batch_size=4)
    )
    stream = _collect(patch_dataset(manifest, input_size=INPUT, batch_size=4))
    ids = sorted(table.column("patch_id").to_pylist())
    assert (
        sorted(stream["patch_id"]) == ids and sorted(actors["patch_id"]) == ids
    )  # each patch once
    assert "pseudo_label" not in stream and stream["patch"].shape == (len(ids), 256, 256, 3)
    assert stream["image"].shape == (len(ids), INPUT, INPUT, 3)

    teacher = TrainerTeacher("demo", kwargs, INPUT, batch_size=5, device="cpu")  # calls of 5, 5, 2
    labels = teacher(stream).numpy()
    assert labels.dtype == np.uint8 and labels.shape == (len(ids), INPUT, INPUT)
    stream["pseudo_label"] = labels
    expected_images, expected_labels = _by_patch(actors, "image"), _by_patch(actors, "pseudo_label")
    for pid, image in _by_patch(stream, "image").items():
        np.testing.assert_array_equal(image, expected_images[pid])
    for pid, label in _by_patch(stream, "pseudo_label").items():
        np.testing.assert_array_equal(label, expected_labels[pid], err_msg=pid)
    assert (
        0.02 < labels.mean() < 0.6
    )  # the demo teacher found nuclei: the comparison meant something


@pytest.mark.slow
def test_trainer_placement_trains_on_the_actors_labels(ray_cluster, tiny_pretrain_config):
    """A short run with the teacher in the worker: every patch once an epoch, and the hold-out
    labels it scored against are those the teacher actors give (their nuclei share, to the pixel)."""
    from histokd.pretrain.job import run_pretraining
    from histokd.pretrain.loop import patch_checksum

    # The hold-out is chosen by a hash of the patch ids, which hold the slides' temporary paths:
    # at 0.2 of 24 patches a run gets a single hold-out patch about once in 30; at 0.4, once in 20,000.
    config = tiny_pretrain_config(
        run_name="in-trainer", teacher_placement="trainer", epochs=2, holdout_fraction=0.4
    )
    result = run_pretraining(config)
    run_dir = Path(result.run_dir)
    assert [h["epoch"] for h in result.history] == [1, 2]
    ids = pq.read_table(run_dir / "manifest" / "train.parquet").column("patch_id").to_pylist()
    for h in result.history:
        assert (h["patches"], h["patch_checksum"]) == (len(ids), patch_checksum(ids))
        assert math.isfinite(h["loss"]) and math.isfinite(h["holdout_loss"])
    assert not (run_dir / "records").exists()  # no actors, no record cache
    assert json.loads((run_dir / "history.json").read_text())[-1]["epoch"] == 2

    # The actors' labels of the hold-out patches, computed here by a TeacherActor.
    holdout = pq.read_table(run_dir / "manifest" / "holdout.parquet")
    actor = TeacherActor(config.teacher, config.teacher_kwargs(), config.input_size, None, "")
    batch = {k: np.asarray(v) for k, v in holdout.to_pydict().items()}
    labels = actor(read_patch_batch(batch))["pseudo_label"]
    assert len(labels) == holdout.num_rows >= 2
    expected = float(labels.mean())
    assert 0.02 < expected < 0.6
    for h in result.history:
        assert h["holdout_label_foreground"] == pytest.approx(expected, abs=0.5 / labels.size)
