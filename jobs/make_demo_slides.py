"""Write synthetic H&E demo slides (Aperio SVS) with their exact nuclei and tissue-class masks.

    python jobs/make_demo_slides.py --demo-dir demo_data --n-slides 4 --seed 0 --slide-size 4096

Slides already written with the same parameters are skipped, so the command is cheap to rerun.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from histokd.cli import arg, run_job


@dataclass
class DemoSlidesConfig:
    """The demo slides: how many, how large, at which scale."""

    demo_dir: str = arg("demo_data", "folder of the slides, masks, JSON sidecars", aliases=["out"])
    n_slides: int = arg(4, "number of slides", aliases=["n"])
    seed: int = arg(0, "seed of the set; slide i: SeedSequence([seed, i])")
    slide_size: int = arg(4096, "level-0 width and height in pixels", aliases=["size"])
    mpp: float = arg(0.5, "um per level-0 pixel: 0.5 is 20x, 0.25 is 40x")
    magnification: float | None = arg(None, "objective power the slide records; default: 10 / mpp")
    tissue_fraction: float = arg(0.6, "share of the slide inside the tissue outline")
    tile_size: int = arg(256, "SVS tile side in pixels, a multiple of 16")
    level_downsample: int = arg(4, "size ratio between pyramid levels (2 or 4)")
    jpeg_quality: int = arg(90, "JPEG quality of the tiles, 1-100")


def _run(config: DemoSlidesConfig):
    from histokd.demos.synthetic import SlideSpec, make_demo_slides

    spec = SlideSpec(
        width=config.slide_size, height=config.slide_size, mpp=config.mpp,
        magnification=config.magnification, tissue_fraction=config.tissue_fraction,
    )  # fmt: skip
    return make_demo_slides(
        config.demo_dir, n=config.n_slides, seed=config.seed, spec=spec, tile_size=config.tile_size,
        level_downsample=config.level_downsample, jpeg_quality=config.jpeg_quality,
    )  # fmt: skip


def _report(slides) -> None:
    for slide in slides:
        print(
            f"{slide.slide_path}  {slide.width}x{slide.height} @ {slide.magnification:g}x "
            f"({slide.mpp:g} um/px)  nuclei={slide.n_nuclei}  "
            f"tissue={slide.metadata['counts']['tissue_fraction']:.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    return run_job(DemoSlidesConfig, _run, argv, description=__doc__, report=_report)


if __name__ == "__main__":
    sys.exit(main())
