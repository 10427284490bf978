"""Sample tissue patches from slides into a Parquet manifest (RCKD Sec. 2.1.1).

    python jobs/build_manifest.py SLIDES... --out runs/manifest --num-patches 400000

SLIDES are slide files, folders (searched recursively) or .txt files listing one path per line.
Bad slides are skipped and listed in OUT/bad_slides.csv; rerunning with the same inputs and
settings reuses the manifest.
"""

from __future__ import annotations

import argparse
import logging
import sys

from histokd.manifest import ManifestConfig, ManifestError, build_manifest
from histokd.tissue import TissueFilter


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d, t = ManifestConfig(), TissueFilter()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("slides", nargs="+", help="slide files, folders or .txt lists of paths")
    p.add_argument(
        "--out", required=True, help="folder for manifest.parquet, manifest.json, bad_slides.csv"
    )
    p.add_argument(
        "--magnification",
        type=float,
        default=d.magnification,
        help="patch magnification (RCKD: 20)",
    )
    p.add_argument(
        "--patch-size",
        type=int,
        default=d.patch_size,
        help="patch side in pixels at --magnification (RCKD: 1024)",
    )
    p.add_argument(
        "--num-patches",
        type=int,
        default=None,
        help="S_n, patches over all slides (RCKD: 400000); default: every tissue patch",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the sampling order")
    p.add_argument(
        "--base-magnification",
        type=float,
        default=None,
        help="level-0 magnification for slides that record neither objective power nor MPP",
    )
    p.add_argument(
        "--min-tissue-fraction",
        type=float,
        default=t.min_tissue_fraction,
        help="thumbnail tissue fraction a candidate patch needs",
    )
    p.add_argument(
        "--min-mean-intensity",
        type=float,
        default=t.min_mean_intensity,
        help="RCKD rule: lowest mean intensity kept",
    )
    p.add_argument(
        "--max-mean-intensity",
        type=float,
        default=t.max_mean_intensity,
        help="RCKD rule: highest mean intensity kept",
    )
    p.add_argument("--local", action="store_true", help="run in this process instead of Ray tasks")
    p.add_argument(
        "--overwrite", action="store_true", help="rebuild even if an up-to-date manifest exists"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        config = ManifestConfig(
            magnification=args.magnification,
            patch_size=args.patch_size,
            num_patches=args.num_patches,
            seed=args.seed,
            base_magnification=args.base_magnification,
            tissue=TissueFilter(
                min_tissue_fraction=args.min_tissue_fraction,
                min_mean_intensity=args.min_mean_intensity,
                max_mean_intensity=args.max_mean_intensity,
            ),
        )
        result = build_manifest(
            args.slides, args.out, config, use_ray=not args.local, overwrite=args.overwrite
        )
    except (ValueError, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"manifest: {result.manifest_path} ({result.num_patches} patches, {result.num_bad_slides} bad slides: {result.bad_slides_path})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
