"""Parameters and GMAC of every backbone, as RCKD Table 6 and Table 3's Params/GMAC columns.

    python jobs/profile_models.py --run-name profile [--backbones csat resnet18]
        [--input-sizes 224 384 512] [--num-classes 1000]

Prints the table and writes ``profile.json`` and ``profile.md`` into STORAGE/RUN_NAME.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from histokd.cli import arg, run_job
from histokd.run import RunFolderConfig, take_legacy_out


@dataclass
class ProfileJobConfig(RunFolderConfig):
    """Which backbones at which input sizes."""

    run_name: str = arg("profile", "the output folder's name")
    backbones: list[str] = arg(help="histokd backbone names; default: all", factory=list)
    input_sizes: list[int] = arg(help="square input sides", factory=lambda: [224, 384, 512])
    num_classes: int = arg(1000, "classes of the head counted (RCKD Table 6: 1000)")
    output_dir: str | None = arg(None, "deprecated", hidden=True)

    def __post_init__(self) -> None:
        take_legacy_out(self, self.output_dir, "--output-dir")
        self.output_dir = None
        super().__post_init__()


def _run(config: ProfileJobConfig):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads weights
    from histokd.models.profile import ProfileConfig, format_table, run_profile

    settings = ProfileConfig(config.run_dir, input_sizes=config.input_sizes,
                             num_classes=config.num_classes,
                             **({"backbones": config.backbones} if config.backbones else {}))  # fmt: skip
    return format_table(run_profile(settings)), settings.output_dir


def _report(result) -> None:
    table, folder = result
    print(table)
    print(f"\nwritten: {folder / 'profile.json'}, {folder / 'profile.md'}")


def main(argv: list[str] | None = None) -> int:
    return run_job(ProfileJobConfig, _run, argv, description=__doc__, report=_report)


if __name__ == "__main__":
    sys.exit(main())
