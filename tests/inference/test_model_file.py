"""Model files of the fine-tuning job: rebuilt from their config, strictly loaded, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from histokd.inference import ModelFileError, find_best_model, load_task_model


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_round_trip_gives_the_saved_model(tmp_path, save_task_model, task):
    from histokd.finetune.loop import build_task_model

    names = ("x", "y") if task == "classification" else ("background", "x", "y")
    path = save_task_model(tmp_path / "best_model.pt", task=task, class_names=names, seed=5)
    model, info = load_task_model(path)
    assert (info.task, info.backbone, info.num_classes, info.class_names, info.input_size) == (
        task,
        "resnet18",
        len(names),
        names,
        64,
    )
    assert info.best_epoch == 3 and info.magnification is None and info.patch_size is None
    assert not model.training
    torch.manual_seed(5)
    reference = build_task_model(task, "resnet18", len(names)).eval()  # same seed: same weights
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out, reference(x))
    assert out.shape == ((2, len(names)) if task == "classification" else (2, len(names), 64, 64))


def test_missing_geometry_comes_from_the_caller(classification_model_file):
    _, info = load_task_model(classification_model_file)
    with pytest.raises(
        ModelFileError,
        match=r"best_model\.pt: .*magnification the model was trained at.*--magnification",
    ):
        info.resolve()
    resolved = info.resolve(magnification=20, patch_size=256)
    assert (resolved.magnification, resolved.patch_size, resolved.read_magnification) == (
        20.0,
        256,
        5.0,
    )
    assert info.resolve(magnification=10).patch_size == 64  # default: images used at the input size
    assert info.resolve(magnification=20, class_names=["p", "q", "r"]).class_names == (
        "p",
        "q",
        "r",
    )
    with pytest.raises(ModelFileError, match=r"class_names has 2 names .* the model has 3 classes"):
        info.resolve(magnification=20, class_names=["p", "q"])
    with pytest.raises(ModelFileError, match=r"patch_size=0: must be a positive integer"):
        info.resolve(magnification=20, patch_size=0)


def test_geometry_recorded_in_the_file_is_used(tmp_path, save_task_model):
    path = save_task_model(tmp_path / "m.pt", magnification=10.0, patch_size=128)
    _, info = load_task_model(path)
    assert (info.magnification, info.patch_size) == (10.0, 128)
    resolved = info.resolve()
    assert resolved.read_magnification == pytest.approx(5.0)
    assert info.resolve(magnification=20).magnification == 20.0  # a given value wins


def test_unusable_files_name_the_file_and_the_problem(tmp_path, save_task_model):
    with pytest.raises(ModelFileError, match=r"nope\.pt: file not found"):
        load_task_model(tmp_path / "nope.pt")
    bare = tmp_path / "bare.pt"
    torch.save({"weight": torch.zeros(1)}, bare)
    with pytest.raises(
        ModelFileError,
        match=r"bare\.pt: holds \['weight'\]; a fine-tuning model file holds 'model'",
    ):
        load_task_model(bare)
    text = tmp_path / "text.pt"
    text.write_text("not a torch file")
    with pytest.raises(ModelFileError, match=r"text\.pt: cannot be read as a torch file"):
        load_task_model(text)
    path = save_task_model(tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["config"]["num_classes"] = 5
    payload["config"]["class_names"] = list("abcde")
    torch.save(payload, tmp_path / "wrong.pt")
    with pytest.raises(
        ModelFileError,
        match=r"wrong\.pt: weights do not fit a classification model with backbone 'resnet18' and 5 classes",
    ):
        load_task_model(tmp_path / "wrong.pt")
    payload["config"]["backbone"] = "vgg16"
    torch.save(payload, tmp_path / "vgg.pt")
    with pytest.raises(
        ModelFileError, match=r"config\['backbone'\]='vgg16': allowed: csat, .*resnet18"
    ):
        load_task_model(tmp_path / "vgg.pt")


def test_a_run_folder_gives_the_split_with_the_lowest_validation_loss(tmp_path, save_task_model):
    for split, loss in ((0, 0.5), (1, 0.3), (2, 0.9)):
        model = save_task_model(
            tmp_path / "run" / f"split_{split}" / "ckpt" / "best_model.pt", seed=split
        )
        result = {"split": split, "best_val_loss": loss, "best_model": str(model)}
        (tmp_path / "run" / f"split_{split}" / "result.json").write_text(json.dumps(result))
    assert (
        find_best_model(tmp_path / "run") == tmp_path / "run" / "split_1" / "ckpt" / "best_model.pt"
    )
    moved = json.loads((tmp_path / "run" / "split_1" / "result.json").read_text())
    moved["best_model"] = "/gone/best_model.pt"  # a checkpoint path that no longer exists
    (tmp_path / "run" / "split_1" / "result.json").write_text(json.dumps(moved))
    assert (
        find_best_model(tmp_path / "run") == tmp_path / "run" / "split_1" / "ckpt" / "best_model.pt"
    )
    _, info = load_task_model(tmp_path / "run")
    assert info.path.endswith("split_1/ckpt/best_model.pt")
    with pytest.raises(ModelFileError, match=r"empty: no split_\*/result.json with a best_model"):
        (tmp_path / "empty").mkdir()
        find_best_model(tmp_path / "empty")


def test_a_resolution_distillation_classifier_loads(tmp_path):
    """resdist saves its networks in this format, with their magnification and input statistics."""
    from histokd.resdist.model import create_resdist_model, save_model_file

    torch.manual_seed(0)
    net = create_resdist_model("resdist_resnet", num_classes=2).eval()
    config = {"backbone": "resdist_resnet", "num_classes": 2, "class_names": ["a", "b"],
              "magnification": 1.25, "input_size": 96, "mean": [0.7, 0.5, 0.6], "std": [0.2] * 3}  # fmt: skip
    model, info = load_task_model(save_model_file(tmp_path / "model.pt", net, config, best_epoch=2))
    assert (info.task, info.backbone, info.class_names, info.best_epoch) == ("classification", "resdist_resnet", ("a", "b"), 2)  # fmt: skip
    assert (info.magnification, info.patch_size, info.mean, info.std) == (1.25, 96, (0.7, 0.5, 0.6), (0.2,) * 3)  # fmt: skip
    assert info.resdist == {"num_groups": 32, "hint_channels": None}
    x = torch.rand(1, 3, 96, 96)
    mean, std = (
        torch.tensor([0.7, 0.5, 0.6]).view(1, 3, 1, 1),
        torch.tensor([0.2] * 3).view(1, 3, 1, 1),
    )
    with torch.no_grad():  # images in [0, 1] in: the file's own statistics applied inside
        torch.testing.assert_close(model(x), net((x - mean) / std))
        assert model(x).shape == (1, 2)
