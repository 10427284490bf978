"""End to end: the demo fine-tuning trains a segmentation model, inference recovers a held-out slide's regions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

HELD_OUT_SEED = 5  # demo tasks use seed 1, pretraining 0, the teacher tests 7


def _iou(prediction: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    out = np.full(num_classes, np.nan)
    for k in range(num_classes):
        union = ((prediction == k) | (truth == k)).sum()
        if union:
            out[k] = ((prediction == k) & (truth == k)).sum() / union
    return out


@pytest.mark.slow
def test_a_demo_fine_tuned_model_recovers_the_regions_of_a_held_out_slide(
    ray_cluster, tmp_path, record_property
):
    from histokd.demos.synthetic import make_demo_slides
    from histokd.demos.tasks import make_demo_tasks
    from histokd.finetune import FinetuneConfig, run_finetune
    from histokd.inference import PredictConfig, run_prediction

    tasks = make_demo_tasks(
        tmp_path / "tasks",
        n_slides=2,
        slide_size=2048,
        patch_size=256,
        segmentation_patch_size=256,
        max_per_class=8,
    )
    finetune = FinetuneConfig(
        data=str(tasks.segmentation_dir), task="segmentation", backbone="resnet18", storage_path=str(tmp_path / "runs"),
        run_name="seg", input_size=64, batch_size=16, epochs=10, patience=10, lr=0.05, num_splits=1,
        bootstrap_resamples=200, num_workers=0,
    )  # fmt: skip
    trained = run_finetune(finetune, tracking=False)
    held_out = make_demo_slides(
        tmp_path / "held_out", n=1, seed=HELD_OUT_SEED, width=2048, height=2048
    )[0]

    # The run folder stands for its best split; its model file says the patches were 256 px at 20x.
    config = PredictConfig(
        model=trained.run_dir, slides=[str(held_out.slide_path)], storage_path=str(tmp_path / "predict"),
        output_magnification=5,
    )  # fmt: skip
    result = run_prediction(config, tracking=False)
    summary = result.slides[0]
    assert summary["class_names"] == ["background", "stroma", "tumor", "lymphocyte"]
    labels = tifffile.imread(f"{summary['dir']}/labels.ome.tif")
    assert labels.shape == (512, 512)  # 2048 px at 20x shown at 5x
    truth = held_out.read_truth(0, 0, 2048, 2048, kind="regions", size=(512, 512))
    prediction = np.where(labels == 255, 0, labels)  # tiles without tissue: background
    iou = _iou(prediction, truth, 4)
    # chance: labels drawn from the true class frequencies, independently of the image
    freq = np.bincount(truth.ravel(), minlength=4) / truth.size
    chance = freq**2 / (2 * freq - freq**2)
    report = {name: round(float(v), 3) for name, v in zip(summary["class_names"], iou, strict=True)}
    report.update(mean=round(float(np.nanmean(iou)), 3), chance_mean=round(float(chance.mean()), 3))
    record_property("region_iou", json.dumps(report))
    print("region IoU on the held-out slide:", report)
    assert np.nanmean(iou) >= 0.6 and np.nanmean(iou) >= 2 * chance.mean()
    assert (iou[1:] >= 0.45).all()  # every tissue class is found
    fractions = np.bincount(truth[truth > 0], minlength=4)[1:] / (truth > 0).sum()
    predicted = np.array([summary["class_fractions"][n] for n in ("stroma", "tumor", "lymphocyte")])
    predicted = predicted / predicted.sum()
    np.testing.assert_allclose(
        predicted, fractions, atol=0.12
    )  # slide-level class fractions of the tissue
