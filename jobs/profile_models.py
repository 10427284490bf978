"""Parameters and GMAC of every backbone, as RCKD Table 6 and Table 3's Params/GMAC columns.

Usage:
    python jobs/profile_models.py --output-dir runs/profile [--backbones csat resnet18]
        [--input-sizes 224 384 512] [--num-classes 1000]

Prints the table and writes ``profile.json`` and ``profile.md`` into the output folder.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads weights

from histokd.models.factory import BACKBONES  # noqa: E402
from histokd.models.profile import ProfileConfig, format_table, run_profile  # noqa: E402


def parse_args(argv: list[str] | None = None) -> ProfileConfig:
    """Build the job's config from the command line."""
    defaults = ProfileConfig(output_dir="runs/profile")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", default=str(defaults.output_dir))
    parser.add_argument(
        "--backbones",
        nargs="+",
        default=list(defaults.backbones),
        metavar="NAME",
        help=f"any of {', '.join(BACKBONES)}",
    )
    parser.add_argument("--input-sizes", nargs="+", type=int, default=list(defaults.input_sizes))
    parser.add_argument("--num-classes", type=int, default=defaults.num_classes)
    args = parser.parse_args(argv)
    return ProfileConfig(
        output_dir=args.output_dir,
        backbones=tuple(args.backbones),
        input_sizes=tuple(args.input_sizes),
        num_classes=args.num_classes,
    )


def main(argv: list[str] | None = None) -> None:
    """Profile the backbones and print the table."""
    config = parse_args(argv)
    print(format_table(run_profile(config)))
    print(f"\nwritten: {config.output_dir / 'profile.json'}, {config.output_dir / 'profile.md'}")


if __name__ == "__main__":
    main()
