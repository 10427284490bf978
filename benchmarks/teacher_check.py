"""`jobs/check_teacher.py` on held-out demo slides: the demo and colour-deconvolution teachers
against the slides' true nuclei, by alpha, normalisation and scale.

The demo teacher was trained on demo slides of seed 0; these are seed 7 (never seen). Tiles are
256 px at 20x (0.5 um/px), the pretraining patches' scale.

    python benchmarks/teacher_check.py --out benchmarks/teacher_check.json
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from harness import argument_parser, write_json


def annotated_tiles(work: Path, slides: int, tiles: int) -> tuple[Path, Path]:
    """images/ and masks/ of held-out demo tiles (256 px, 20x) with their true nuclei."""
    import tifffile
    from PIL import Image

    from histokd.demos.synthetic import make_demo_slides
    from histokd.teachers.training import demo_slide_images

    demo = make_demo_slides(work / "slides", n=slides, seed=7, width=1024, height=1024)
    items = demo_slide_images(demo, magnification=20, tile_size=256)[:tiles]
    for sub in ("images", "masks"):
        (work / sub).mkdir()
    for i, item in enumerate(items):
        Image.fromarray(item.image).save(work / "images" / f"tile{i:02d}.png")
        tifffile.imwrite(work / "masks" / f"tile{i:02d}.tif", item.labels.astype(np.uint16))
    return work / "images", work / "masks"


def main() -> None:
    parser = argument_parser(__doc__, Path(__file__).with_suffix(".json"))
    parser.add_argument("--slides", type=int, default=2)
    parser.add_argument("--tiles", type=int, default=24)
    args = parser.parse_args()
    from histokd.teachers.check import CheckConfig, check_teacher, format_table

    work = Path(tempfile.mkdtemp())
    images, masks = annotated_tiles(work, args.slides, args.tiles)
    report = {"tiles": len(list(images.iterdir())), "teachers": {}}
    # The last run asks what labelling 40x and 80x patches (0.25, 0.125 um/px) with this 20x teacher
    # would cost, against resampling them to its scale first.
    runs = {"demo": ("demo", 0.5), "deconvolution": ("deconvolution", 0.5), "demo, 40x patches": ("demo", 0.25),
            "demo, 80x patches": ("demo", 0.125)}  # fmt: skip
    for name, (teacher, patch_mpp) in runs.items():
        started = time.perf_counter()
        config = CheckConfig(teacher=teacher, images=str(images), masks=str(masks), out=str(work / name), device="cpu",
                             patch_mpp=patch_mpp)  # fmt: skip
        result = check_teacher(config)
        seconds = time.perf_counter() - started
        print(f"{name} ({seconds:.0f} s):\n{format_table(result.rows)}\nbest: {result.best}\n")
        report["teachers"][name] = {
            "rows": result.rows,
            "best": result.best,
            "seconds": round(seconds, 1),
        }
    write_json(args.out, report)


if __name__ == "__main__":
    main()
