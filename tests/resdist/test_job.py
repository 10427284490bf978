"""The phases end to end on the tiny demo data: teacher, KD, KD (AD) + fine-tuning, evaluation.

Ray Train runs in its local mode here (``num_workers=0``: the worker function in this process),
so the test takes seconds; ``test_ray_train_worker`` runs the same loop in a real Ray Train worker.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from histokd.resdist.config import DistillConfig, EvaluateConfig, SupervisedConfig
from histokd.resdist.evaluation import run_evaluation
from histokd.resdist.job import run_distill, run_supervised, training_stats
from histokd.resdist.model import load_model_file


def _common(tiny_demo, **extra) -> dict:
    return dict(
        data=str(tiny_demo["table"]), storage_path=str(tiny_demo["storage"]), magnifications=tiny_demo["magnifications"],
        min_region_area_um2=5000.0, accumulation_steps=2, num_workers=0, **extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_demo):
    """Teacher (10x, 2 epochs), KD at 2.5x and KD (AD) at 1.25x with fine-tuning, 1 epoch each."""
    teacher = run_supervised(
        SupervisedConfig(**_common(tiny_demo), run_name="t-teacher", magnification=10.0, epochs=2)
    )
    kd = run_distill(
        DistillConfig(
            **_common(tiny_demo),
            run_name="t-kd",
            teacher=teacher.model_path,
            magnification=2.5,
            epochs=1,
        )
    )
    kd_aux = run_distill(DistillConfig(**_common(tiny_demo), run_name="t-kd-aux", teacher=teacher.run_dir, magnification=1.25,
                                       epochs=1, train_splits=["aux"], val_splits=["val"], finetune_epochs=2))  # fmt: skip
    return {"teacher": teacher, "kd": kd, "kd_aux": kd_aux}


def test_teacher(trained, tiny_demo):
    teacher = trained["teacher"]
    model, meta = load_model_file(teacher.model_path)
    assert (meta["method"], meta["magnification"], meta["backbone"]) == ("teacher", 10.0, "resdist_resnet")  # fmt: skip
    assert (
        meta["class_names"] == ["lymphocyte", "stroma", "tumor"]
        and meta["task"] == "classification"
    )
    stats = training_stats(tiny_demo["region_set"], ["train"], 10.0)
    assert [meta["mean"], meta["std"]] == [list(v) for v in stats]
    result = teacher.result
    assert [row["epoch"] for row in result["history"]] == [1, 2]
    assert result["selected"] == "best" and result["kept_epoch"] in (
        1,
        2,
    )  # validation set outside training
    n_train = len(tiny_demo["region_set"].select(["train"], labelled=True))
    assert result["sizes"]["train"] == n_train
    # accumulation over 2 images: ceil(n / 2) optimizer steps per epoch
    assert result["history"][0]["optimizer_steps"] == -(-n_train // 2)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (Path(teacher.run_dir) / "config.yaml").is_file()


def test_kd_on_the_labelled_set_skips_fine_tuning(trained, tiny_demo):
    kd = trained["kd"]
    _, meta = load_model_file(kd.model_path)
    assert (meta["method"], meta["magnification"], meta["teacher_magnification"]) == (
        "KD",
        2.5,
        10.0,
    )
    assert meta["phase"] == "distill" and meta["resdist"] == {
        "num_groups": 32,
        "hint_channels": 256,
    }
    stats = training_stats(tiny_demo["region_set"], ["train"], 2.5)
    assert [meta["mean"], meta["std"]] == [list(v) for v in stats]
    rows = kd.result["history"]
    assert rows[0]["train_loss"] == pytest.approx(
        rows[0]["train_soft"] + rows[0]["train_pixel"], rel=1e-5
    )
    assert kd.result["selected"] == "last"  # no validation outside the distillation set
    assert kd.result["sizes"]["train"] == len(tiny_demo["region_set"].select(["train", "val"]))
    assert not (Path(kd.run_dir) / "finetune").exists()  # Sec. 3.4: same data in both phases


def test_kd_aux_is_fine_tuned_on_the_last_layer_only(trained, tiny_demo):
    kd_aux = trained["kd_aux"]
    distilled, _ = load_model_file(Path(kd_aux.run_dir) / "distill" / "model.pt")
    final, meta = load_model_file(kd_aux.model_path)
    assert meta["method"] == "KD (AD)" and meta["finetuned"] and meta["phase"] == "finetune"
    assert kd_aux.result["trainable_params"] == 256 * 3 + 3  # the linear layer alone
    body_same = [
        torch.equal(a, b)
        for (name, a), (_, b) in zip(
            distilled.state_dict().items(), final.state_dict().items(), strict=True
        )
        if not name.startswith("fc.")
    ]
    assert all(body_same)
    assert not torch.equal(distilled.fc.weight, final.fc.weight)
    distill_result = json.loads((Path(kd_aux.run_dir) / "distill" / "result.json").read_text())
    assert distill_result["sizes"]["train"] == len(tiny_demo["region_set"].select(["aux"]))


def test_student_file_is_a_task_model_for_slide_inference(trained, tiny_demo):
    """The student's model.pt is what jobs/predict_slides.py reads: same network, same scores."""
    from histokd.inference import load_task_model
    from histokd.resdist.dataset import load_rgb
    from histokd.resdist.evaluation import predict
    from histokd.resdist.region_set import median_size

    path, region_set = trained["kd"].model_path, tiny_demo["region_set"]
    model, info = load_task_model(path)
    student, meta = load_model_file(path)
    names = ("lymphocyte", "stroma", "tumor")
    assert (info.task, info.backbone, info.num_classes, info.class_names) == ("classification", "resdist_resnet", 3, names)  # fmt: skip
    side = max(median_size(region_set.select(["train"], labelled=True), 2.5))
    assert (info.magnification, info.input_size, info.patch_size) == (2.5, side, side)
    assert info.resolve().read_magnification == 2.5  # tiles of the median region's side at 2.5x
    assert (list(info.mean), list(info.std)) == (meta["mean"], meta["std"]) and info.mean != (0.485, 0.456, 0.406)  # fmt: skip
    items = region_set.items(["test"], [2.5], labelled=True)
    _, predicted, expected = predict(student, items, (meta["mean"], meta["std"]))
    for item, probs, label in zip(items, expected, predicted, strict=True):
        tile = torch.from_numpy(load_rgb(item["paths"]["2.5x"])).permute(2, 0, 1)[None]
        with (
            torch.no_grad()
        ):  # uint8 in, as slide inference gives it: the file's mean and std inside
            got = model(tile).softmax(1)[0]
        assert (
            torch.allclose(got, torch.from_numpy(probs), atol=1e-6) and int(got.argmax()) == label
        )


def test_rerun_reuses_the_finished_run(trained, tiny_demo, capsys):
    again = run_supervised(
        SupervisedConfig(**_common(tiny_demo), run_name="t-teacher", magnification=10.0, epochs=2)
    )
    assert "finished before" in capsys.readouterr().out
    assert again.result == trained["teacher"].result


def test_student_must_be_below_the_teacher(trained, tiny_demo):
    with pytest.raises(ValueError, match="below the teacher"):
        run_distill(
            DistillConfig(
                **_common(tiny_demo),
                run_name="t-bad",
                teacher=trained["teacher"].model_path,
                magnification=10.0,
                epochs=1,
            )
        )


def test_evaluation_tables_chart_and_mlflow(trained, tiny_demo):
    import mlflow

    config = EvaluateConfig(
        model=[trained["teacher"].model_path, trained["kd"].run_dir, trained["kd_aux"].model_path], data=str(tiny_demo["table"]),
        storage_path=str(tiny_demo["storage"]), run_name="t-eval", dataset_name="tiny", bootstrap_resamples=500,
    )  # fmt: skip
    result = run_evaluation(config)
    n_test = len(tiny_demo["region_set"].select(["test"], labelled=True))
    assert [ev.method for ev in result.evaluations] == ["teacher", "KD", "KD (AD)"]
    for ev in result.evaluations:
        assert ev.num_images == n_test
        assert all(iv.low <= iv.estimate <= iv.high for iv in ev.metrics.values())
    gflops = {ev.magnification: ev.gflops_median for ev in result.evaluations}
    assert gflops[10.0] > gflops[2.5] > gflops[1.25] > 0
    rows = list(csv.DictReader(open(result.files["csv"])))
    assert len(rows) == 3 * 5 and {r["metric"] for r in rows} == {
        "accuracy",
        "f1",
        "precision",
        "recall",
        "top1_accuracy",
    }
    markdown = Path(result.files["markdown"]).read_text()
    assert (
        "## Teacher (Table 5)" in markdown
        and "mag = 2.5x (4 µm/pixel)" in markdown
        and "KD (AD)" in markdown
    )
    assert Path(result.files["chart"]).stat().st_size > 10_000
    client = mlflow.MlflowClient(tracking_uri=config.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert (
        "teacher_10x_accuracy" in run.data.metrics and "KD_AD_1.25x_f1_ci_low" in run.data.metrics
    )
    teacher_run = client.get_run(trained["teacher"].mlflow_run_id)
    assert (
        teacher_run.data.params["magnification"] == "10.0"
        and "val_loss" in teacher_run.data.metrics
    )
    kd_aux_run = client.get_run(trained["kd_aux"].mlflow_run_id)
    assert (
        "train_pixel" in kd_aux_run.data.metrics
        and "finetune_train_loss" in kd_aux_run.data.metrics
    )


@pytest.mark.slow
def test_ray_train_workers_with_ddp(tiny_demo, ray_cluster):
    """The loop on a real Ray Train worker group of two (DDP, fractional CPUs), with checkpoints."""
    common = _common(tiny_demo)
    common.update(num_workers=2, cpus_per_worker=0.5)
    result = run_supervised(
        SupervisedConfig(
            **common, run_name="t-ray-baseline", magnification=1.25, method="baseline", epochs=2
        )
    )
    _, meta = load_model_file(result.model_path)
    assert meta["method"] == "baseline" and meta["magnification"] == 1.25
    n_train = len(tiny_demo["region_set"].select(["train"], labelled=True))
    per_worker = -(-n_train // 2)  # the epoch's images shared out, padded to equal shares
    steps = per_worker  # accumulation over 2 images in all: 1 per worker and step
    assert [row["optimizer_steps"] for row in result.result["history"]] == [steps, 2 * steps]
    assert list(
        (Path(result.run_dir) / "ray").rglob("result.json")
    )  # the final report's checkpoint
