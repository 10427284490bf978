"""Write synthetic H&E demo slides (Aperio SVS) with their exact nuclei and tissue-class masks.

Example:
    python jobs/make_demo_slides.py --out data/demo --n 4 --seed 0 --size 4096

Slides already written with the same parameters are skipped, so the command is cheap to rerun.
"""

from __future__ import annotations

import argparse
import logging

from histokd.synthetic import SlideSpec, make_demo_slides


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        required=True,
        help="folder for the slides, masks and JSON sidecars (created if missing)",
    )
    parser.add_argument("--n", type=int, default=4, help="number of slides (default: 4)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the set; slide i is drawn from SeedSequence([seed, i]) (default: 0)",
    )
    parser.add_argument(
        "--size", type=int, default=4096, help="level-0 width and height in pixels (default: 4096)"
    )
    parser.add_argument(
        "--mpp",
        type=float,
        default=0.5,
        help="micrometres per level-0 pixel: 0.5 is a 20x scan, 0.25 a 40x scan (default: 0.5)",
    )
    parser.add_argument(
        "--magnification",
        type=float,
        default=None,
        help="objective power written into the slide (default: 10 / mpp)",
    )
    parser.add_argument(
        "--tissue-fraction",
        type=float,
        default=0.6,
        help="fraction of the slide inside the tissue outline (default: 0.6)",
    )
    parser.add_argument(
        "--tile-size",
        type=int,
        default=256,
        help="SVS tile side in pixels, a multiple of 16 (default: 256)",
    )
    parser.add_argument(
        "--level-downsample",
        type=int,
        default=4,
        help="size ratio between pyramid levels, usually 2 or 4 (default: 4)",
    )
    parser.add_argument(
        "--jpeg-quality",
        type=int,
        default=90,
        help="JPEG quality of the tiles, 1-100 (default: 90)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Build the slide spec from the arguments and write the slides."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        spec = SlideSpec(
            width=args.size,
            height=args.size,
            mpp=args.mpp,
            magnification=args.magnification,
            tissue_fraction=args.tissue_fraction,
        )
        slides = make_demo_slides(
            args.out,
            n=args.n,
            seed=args.seed,
            spec=spec,
            tile_size=args.tile_size,
            level_downsample=args.level_downsample,
            jpeg_quality=args.jpeg_quality,
        )
    except ValueError as error:
        raise SystemExit(f"make_demo_slides: {error}") from error
    for slide in slides:
        counts = slide.metadata["counts"]
        print(
            f"{slide.slide_path}  {slide.width}x{slide.height} @ {slide.magnification:g}x "
            f"({slide.mpp:g} um/px)  nuclei={slide.n_nuclei}  "
            f"tissue={counts['tissue_fraction']:.2f}"
        )


if __name__ == "__main__":
    main()
