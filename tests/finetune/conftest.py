"""Small demo tasks cut from two small synthetic slides, shared by the fine-tuning tests."""

from __future__ import annotations

import pytest


def _demo_tasks(folder, max_per_class: int):
    """Demo tasks cut from two 1024 px synthetic slides: 64 px patches, 128 px masks, at 20x."""
    from histokd.demos.tasks import make_demo_tasks

    return make_demo_tasks(
        folder, n_slides=2, slide_size=1024, patch_size=64, segmentation_patch_size=128,
        max_per_class=max_per_class,
    )  # fmt: skip


@pytest.fixture(scope="session")
def demo_tasks_small(tmp_path_factory):
    """36 classification patches (12 per tissue class, 64 px at 20x) and region-mask pairs."""
    return _demo_tasks(tmp_path_factory.mktemp("demo_tasks"), max_per_class=12)


@pytest.fixture(scope="session")
def demo_tasks_medium(tmp_path_factory):
    """117 classification patches (up to 40 per tissue class, 64 px at 20x): a test split of 23,
    enough to tell a model that learned from one that did not."""
    return _demo_tasks(tmp_path_factory.mktemp("demo_tasks_medium"), max_per_class=40)


@pytest.fixture(scope="session")
def backbone_file(tmp_path_factory):
    """A randomly initialised CSAT backbone written as a backbone file (what RCKD pretraining writes)."""
    import torch

    from histokd.models import create_backbone, save_backbone

    torch.manual_seed(123)
    return save_backbone(create_backbone("csat"), tmp_path_factory.mktemp("backbone") / "csat.pth")
