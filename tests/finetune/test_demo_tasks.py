"""The demo downstream tasks: patches labelled by the slides' region masks."""

import numpy as np
from PIL import Image

from histokd.demos.synthetic import load_demo_slide
from histokd.demos.tasks import make_demo_tasks
from histokd.finetune.datasets import load_task_dataset


def test_classification_patches_lie_in_their_class(demo_tasks_small):
    data = load_task_dataset(demo_tasks_small.classification_dir, "classification")
    assert data.class_names == ("lymphocyte", "stroma", "tumor")  # folder names, sorted
    assert data.class_counts() == {"lymphocyte": 12, "stroma": 12, "tumor": 12}
    slides = {p.stem: load_demo_slide(p) for p in demo_tasks_small.slides_dir.glob("*.json")}
    for path, label in zip(data.images[::5], data.labels[::5], strict=True):
        stem, x, y = path.rsplit("/", 1)[1][:-4].rsplit("_", 2)
        slide = slides[stem]
        regions = slide.read_truth(int(x[1:]), int(y[1:]), 64, 64, kind="regions")
        share = np.mean(regions == slide.class_names.index(data.class_names[label]) + 1)
        assert share >= 0.95
        assert Image.open(path).size == (64, 64)


def test_segmentation_pairs_and_classes(demo_tasks_small):
    data = load_task_dataset(demo_tasks_small.segmentation_dir, "segmentation")
    assert data.class_names == ("background", "stroma", "tumor", "lymphocyte")
    assert len(data) == demo_tasks_small.segmentation_count > 0
    values = set()
    for mask in data.masks:
        values |= set(np.unique(np.asarray(Image.open(mask))).tolist())
    assert values <= {0, 1, 2, 3} and len(values) >= 3


def test_second_call_reuses_the_files(demo_tasks_small):
    first = sorted(demo_tasks_small.classification_dir.rglob("*.png"))[0]
    mtime = first.stat().st_mtime_ns
    again = make_demo_tasks(
        demo_tasks_small.classification_dir.parent, n_slides=2, slide_size=1024, patch_size=64,
        segmentation_patch_size=128, max_per_class=12,
    )  # fmt: skip
    assert again == demo_tasks_small and first.stat().st_mtime_ns == mtime
