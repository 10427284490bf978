"""Fixtures of the inference tests: model files in the fine-tuning job's format, small demo slides."""

from __future__ import annotations

from pathlib import Path

import pytest

#: Backbone and input side of the models these tests save (fast on a 2-core CPU).
BACKBONE = "resnet18"
INPUT = 64


def _save_task_model(
    path: Path,
    task: str = "classification",
    class_names: tuple[str, ...] = ("a", "b", "c"),
    backbone: str = BACKBONE,
    input_size: int = INPUT,
    seed: int = 0,
    **extra,
) -> Path:
    """Write a randomly initialised task model exactly as the fine-tuning loop writes best_model.pt:
    ``{"model": state_dict, "best_epoch", "config": FinetuneConfig as a dict + num_classes, class_names}``."""
    import torch

    from histokd.cli import config_to_dict
    from histokd.finetune import FinetuneConfig
    from histokd.finetune.loop import build_task_model

    config = config_to_dict(FinetuneConfig(task=task, backbone=backbone, input_size=input_size))
    config.update(
        num_classes=len(class_names), class_names=list(class_names), split_index=0, **extra
    )
    torch.manual_seed(seed)
    model = build_task_model(task, backbone, len(class_names))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "best_epoch": 3, "config": config}, path)
    return path


@pytest.fixture(scope="session")
def save_task_model():
    """The writer of model files (a fixture: tests cannot import conftest)."""
    return _save_task_model


@pytest.fixture(scope="session")
def classification_model_file(tmp_path_factory) -> Path:
    return _save_task_model(tmp_path_factory.mktemp("models") / "classification" / "best_model.pt")


@pytest.fixture(scope="session")
def segmentation_model_file(tmp_path_factory) -> Path:
    return _save_task_model(
        tmp_path_factory.mktemp("models") / "segmentation" / "best_model.pt",
        task="segmentation", class_names=("background", "stroma", "tumor", "lymphocyte"),
    )  # fmt: skip


@pytest.fixture(scope="session")
def small_demo_slides(tmp_path_factory) -> list:
    """Three small demo slides (768 px at 20x) of a seed no other test uses."""
    from histokd.demos.synthetic import make_demo_slides

    return make_demo_slides(
        tmp_path_factory.mktemp("predict_slides"), n=3, seed=11, width=768, height=768
    )


def _rasterise(polygons: list, shape: tuple[int, int], scale: float = 1.0):
    """Fill GeoJSON polygons (pixel-edge units times ``scale``) at pixel centres, holes cleared."""
    import numpy as np
    from skimage.draw import polygon as fill_polygon

    out = np.zeros(shape, bool)
    for exterior, *holes in polygons:
        region = np.zeros(shape, bool)
        for k, ring in enumerate([exterior, *holes]):
            xy = np.asarray(ring, np.float64) / scale - 0.5
            rr, cc = fill_polygon(xy[:, 1], xy[:, 0], shape)
            region[rr, cc] = k == 0
        out |= region
    return out


@pytest.fixture(scope="session")
def rasterise():
    """Region polygons back to a mask, independently of histokd.inference.geojson."""
    return _rasterise
