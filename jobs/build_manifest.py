"""Sample tissue patches from slides into a Parquet manifest (RCKD Sec. 2.1.1).

    python jobs/build_manifest.py --slides /data/wsi --run-name tcga-manifest --num-patches 400000

SLIDES are slide files, folders (searched recursively) or .txt files listing one path per line.
The manifest goes to STORAGE/RUN_NAME (manifest.parquet, manifest.json); bad slides are skipped
and listed in bad_slides.csv there. Rerunning with the same inputs and settings reuses it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

from histokd.cli import arg, print_fields, run_job
from histokd.run import RunFolderConfig, take_legacy_out


@dataclass
class ManifestJobConfig(RunFolderConfig):
    """The manifest job: which slides, which patches, where the manifest goes."""

    run_name: str = arg("manifest", "the manifest's folder name")
    slides: list[str] = arg(help="slide files, folders or .txt lists of paths", factory=list)
    mpp: float | None = arg(None, "um per patch pixel; default 0.5 (RCKD: 20x)")
    magnification: float | None = arg(None, "alias of --mpp: 10 / magnification (20x: 0.5 um/px)")
    patch_size: int | None = arg(None, "patch side in pixels; default 1024 (RCKD: 1024)")
    patch_size_um: float | None = arg(None, "patch side in um instead (512 um = 1024 px at 0.5)")
    num_patches: int | None = arg(None, "S_n, patches over all slides (RCKD: 400000); default: all")
    assume_mpp: float | None = arg(None, "um/px of slides recording no MPP, resolution or power")
    base_magnification: float | None = arg(None, "older way to give --assume-mpp: 10 / this")
    sampling: Literal["uniform", "capped", "proportional"] | None = arg(
        None, "patches per slide: uniform, capped, proportional; auto: capped if a cap is set"
    )
    max_patches_per_slide: int | None = arg(None, "cap of capped/proportional sampling")
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
        self.settings()  # every unit and sampling conflict fails here, before any work

    def settings(self):
        """The manifest's settings (`histokd.manifest.ManifestConfig`)."""
        from histokd.manifest import ManifestConfig
        from histokd.tissue import TissueFilter

        tissue = TissueFilter(
            min_tissue_fraction=self.min_tissue_fraction,
            min_mean_intensity=self.min_mean_intensity,
            max_mean_intensity=self.max_mean_intensity,
        )
        return ManifestConfig(
            mpp=self.mpp, magnification=self.magnification, patch_size=self.patch_size,
            patch_size_um=self.patch_size_um, num_patches=self.num_patches, seed=self.seed,
            assume_mpp=self.assume_mpp, base_magnification=self.base_magnification,
            sampling=self.sampling, max_patches_per_slide=self.max_patches_per_slide,
            tissue=tissue,
        )  # fmt: skip


def _run(config: ManifestJobConfig):
    from histokd.manifest import ManifestError, build_manifest

    settings = config.settings()
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
    from histokd.manifest import balance_line

    balance, lopsided = balance_line(result.summary.get("patches_per_slide", {}))
    print_fields({
        "manifest": f"{result.manifest_path} ({result.num_patches} patches, "
        f"{result.num_bad_slides} bad slides: {result.bad_slides_path})",
        "balance": balance + (" (over half from one slide: see --max-patches-per-slide)" if lopsided else ""),
        "pixel size": f"{result.summary.get('num_slides_mpp_from_objective', 0)} slide(s) from the objective power only",
    })  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return run_job(ManifestJobConfig, _run, argv, description=__doc__, report=_report)


if __name__ == "__main__":
    sys.exit(main())
