"""Write the demo downstream tasks: tissue-class patches (a folder per class) and region masks.

    python jobs/make_demo_tasks.py --demo-dir demo_data/tasks

Cut from synthetic slides (seed 1, unseen by the pretraining demo, which uses seed 0). Reruns
with the same settings reuse the files.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from histokd.cli import arg, print_fields, run_job


@dataclass
class DemoTasksConfig:
    """The demo tasks: how many slides they are cut from, and the patch sizes."""

    demo_dir: str = arg("demo_data/tasks", "output folder", aliases=["out"])
    n_slides: int = arg(4, "synthetic slides to cut")
    seed: int | None = arg(None, "seed of the slides; default: the demo's own (1)")
    slide_size: int = arg(4096, "slide side in pixels at 0.5 um/px")
    patch_size: int = arg(256, "classification patch side at 20x")
    segmentation_patch_size: int = arg(512, "segmentation patch side at 20x")
    purity: float = arg(0.95, "least share of a classification patch in one class")
    max_per_class: int | None = arg(None, "cap on classification patches per class")


def _run(config: DemoTasksConfig):
    from histokd.demos.tasks import make_demo_tasks

    seed = {} if config.seed is None else {"seed": config.seed}
    return make_demo_tasks(
        config.demo_dir, n_slides=config.n_slides, **seed, slide_size=config.slide_size,
        patch_size=config.patch_size, segmentation_patch_size=config.segmentation_patch_size,
        purity=config.purity, max_per_class=config.max_per_class,
    )  # fmt: skip


def _report(tasks) -> None:
    print_fields({
        "classification": f"{tasks.classification_dir}  {tasks.classification_counts}",
        "segmentation": f"{tasks.segmentation_dir}  {tasks.segmentation_count} image/mask pairs",
    })  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return run_job(DemoTasksConfig, _run, argv, description=__doc__, report=_report)


if __name__ == "__main__":
    sys.exit(main())
