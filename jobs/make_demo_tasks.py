"""Write the demo downstream tasks: tissue-class patches (a folder per class) and region masks.

    python jobs/make_demo_tasks.py --out demo_data/tasks

Cut from synthetic slides (seed 1, unseen by the pretraining demo, which uses seed 0). Reruns
with the same settings reuse the files.
"""

from __future__ import annotations

import argparse
import sys

from histokd.finetune.demo_tasks import DEMO_TASK_SEED, make_demo_tasks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default="demo_data/tasks", help="output folder (default: demo_data/tasks)"
    )
    parser.add_argument(
        "--n-slides", type=int, default=4, help="synthetic slides to cut (default: 4)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEMO_TASK_SEED,
        help=f"seed of the slides (default: {DEMO_TASK_SEED})",
    )
    parser.add_argument(
        "--slide-size",
        type=int,
        default=4096,
        help="slide side in pixels at 0.5 um/px (default: 4096)",
    )
    parser.add_argument(
        "--patch-size",
        type=int,
        default=256,
        help="classification patch side at 20x (default: 256)",
    )
    parser.add_argument(
        "--segmentation-patch-size",
        type=int,
        default=512,
        help="segmentation patch side at 20x (default: 512)",
    )
    parser.add_argument(
        "--purity",
        type=float,
        default=0.95,
        help="least share of a classification patch in one class (default: 0.95)",
    )
    parser.add_argument(
        "--max-per-class", type=int, default=None, help="cap on classification patches per class"
    )
    args = parser.parse_args(argv)
    try:
        tasks = make_demo_tasks(
            args.out, n_slides=args.n_slides, seed=args.seed, slide_size=args.slide_size, patch_size=args.patch_size,
            segmentation_patch_size=args.segmentation_patch_size, purity=args.purity, max_per_class=args.max_per_class,
        )  # fmt: skip
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"classification: {tasks.classification_dir}  {tasks.classification_counts}")
    print(f"segmentation:   {tasks.segmentation_dir}  {tasks.segmentation_count} image/mask pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
