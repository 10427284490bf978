"""Sample tissue patches from slides into a Parquet manifest (RCKD Sec. 2.1.1).

    python jobs/build_manifest.py --slides /data/wsi --run-name tcga-manifest --num-patches 400000

SLIDES are slide files, folders (searched recursively) or .txt files listing one path per line.
The manifest goes to STORAGE/RUN_NAME (manifest.parquet, manifest.json); bad slides are skipped
and listed in bad_slides.csv there. Rerunning with the same inputs and settings reuses it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from histokd.cli import arg, print_fields, run_job
from histokd.run import RunFolderConfig, take_legacy_out


@dataclass
class ManifestJobConfig(RunFolderConfig):
    """The manifest job: which slides, which patches, where the manifest goes."""

    run_name: str = arg("manifest", "the manifest's folder name")
    slides: list[str] = arg(help="slide files, folders or .txt lists of paths", factory=list)
    magnification: float = arg(20.0, "patch magnification (RCKD: 20)")
    patch_size: int = arg(1024, "patch side in pixels at --magnification (RCKD: 1024)")
    num_patches: int | None = arg(None, "S_n, patches over all slides (RCKD: 400000); default: all")
    base_magnification: float | None = arg(None, "level-0 magnification if a slide lacks power/MPP")
    min_tissue_fraction: float = arg(0.35, "thumbnail tissue fraction a candidate patch needs")
    min_mean_intensity: float = arg(50.0, "RCKD rule: lowest mean intensity kept")
    max_mean_intensity: float = arg(245.0, "RCKD rule: highest mean intensity kept")
    ray_address: str | None = arg(None, "Ray cluster to join; default: $RAY_ADDRESS, else local")
    local: bool = arg(False, "run in this process, not Ray tasks")
    overwrite: bool = arg(False, "rebuild even if an up-to-date manifest exists")
    out: str | None = arg(None, "deprecated", hidden=True)

    def __post_init__(self) -> None:
        take_legacy_out(self, self.out)
        self.out = None
        super().__post_init__()
        if not self.slides:
            raise ValueError("slides=[]: give slide files, folders or .txt lists (--slides)")


def _run(config: ManifestJobConfig):
    from histokd.manifest import ManifestConfig, ManifestError, build_manifest
    from histokd.tissue import TissueFilter

    tissue = TissueFilter(
        min_tissue_fraction=config.min_tissue_fraction,
        min_mean_intensity=config.min_mean_intensity,
        max_mean_intensity=config.max_mean_intensity,
    )
    settings = ManifestConfig(
        magnification=config.magnification, patch_size=config.patch_size,
        num_patches=config.num_patches, seed=config.seed,
        base_magnification=config.base_magnification, tissue=tissue,
    )  # fmt: skip
    if not config.local:
        from histokd.cluster import init_ray

        init_ray(config.ray_address)
    try:
        return build_manifest(
            config.slides, config.run_dir, settings, use_ray=not config.local,
            overwrite=config.overwrite,
        )  # fmt: skip
    except ManifestError as exc:
        raise ValueError(str(exc)) from exc


def _report(result) -> None:
    print_fields({
        "manifest": f"{result.manifest_path} ({result.num_patches} patches, "
        f"{result.num_bad_slides} bad slides: {result.bad_slides_path})",
    })  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return run_job(ManifestJobConfig, _run, argv, description=__doc__, report=_report)


if __name__ == "__main__":
    sys.exit(main())
