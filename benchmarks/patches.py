"""Tissue patches per second: histokd's slide layer against a naive full-resolution loop.

Slides: real ones from ``../shared/testdata/slides`` (CMU-1 small region, the TCGA JPEG 2000
slide), 4096 px synthetic demo slides, and large "mosaic" slides: real H&E (CMU-1's tissue,
mirrored so it tiles seamlessly) inside a few random tissue blobs on white glass, written as
Aperio SVS with 512 px JPEG tiles and a 4x pyramid at 0.5 um/px, so that the run has over
2,000 grid cells of 1024 px at 20x (issue 18: >= 2,000).

Naive: every grid cell is read with ``read_region`` at level 0, made RGB, and kept if its mean
intensity is in [50, 245] (RCKD's rule alone). histokd: a thumbnail tissue mask skips background
cells, then only the candidates are read, each at ``ManifestConfig.rule_size`` (128 px a side)
from the coarsest pyramid level that still gives that size (a mean is unchanged by area
averaging), and the same rule applied (``build_manifest`` with every patch, default
``ManifestConfig``). Both run as Ray tasks over the same slides, with 1 and 2
workers, side by side in one run; the figure is tissue patches (the layer's count) per second.

    python benchmarks/patches.py --out benchmarks/patches.json
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from harness import argument_parser, write_json


def mosaic_slide(path: Path, size: int, seed: int, source: np.ndarray) -> str:
    """A ``size`` px square Aperio slide at 0.5 um/px: real tissue in blobs on white glass."""
    from histokd.demos.synthetic.tiff import write_svs

    if path.exists():
        return str(path)
    rng = np.random.default_rng(seed)
    block = np.concatenate(
        [
            np.concatenate([source, source[:, ::-1]], 1),
            np.concatenate([source[::-1], source[::-1, ::-1]], 1),
        ]
    )  # mirrored: tiles without seams
    reps = (size // block.shape[0] + 2, size // block.shape[1] + 2, 1)
    dy, dx = rng.integers(0, block.shape[0]), rng.integers(0, block.shape[1])
    tissue = np.tile(block, reps)[dy : dy + size, dx : dx + size]
    # tissue blobs on a coarse grid (64 px), upsampled: about 30-50 % of the slide
    coarse = size // 64
    yy, xx = np.mgrid[:coarse, :coarse] / coarse
    mask = np.zeros((coarse, coarse), bool)
    for _ in range(int(rng.integers(3, 6))):
        cy, cx = rng.uniform(0.15, 0.85, 2)
        ry, rx = rng.uniform(0.1, 0.3, 2)
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    mask = np.repeat(np.repeat(mask, 64, 0), 64, 1)
    glass = rng.normal(242, 2.0, (64, 64, 3)).clip(0, 255).astype(np.uint8)
    image = np.where(mask[..., None], tissue, np.tile(glass, (coarse, coarse, 1)))
    write_svs(path, np.ascontiguousarray(image), mpp=0.5, magnification=20, tile_size=512)
    return str(path)


def naive_slide(
    path: str, patch_size: int, magnification: float, base_magnification: float | None
) -> dict:
    """Every grid cell at level 0, then the mean rule; no thumbnail, no pyramid."""
    import openslide

    from histokd.slides import SlideReader

    info = SlideReader(path, base_magnification).info
    extent = round(patch_size * info.base_magnification / magnification)
    slide = openslide.OpenSlide(path)
    width, height = slide.dimensions
    kept = total = 0
    for y in range(0, height - extent + 1, extent):
        for x in range(0, width - extent + 1, extent):
            region = np.asarray(slide.read_region((x, y), 0, (extent, extent)).convert("RGB"))
            total += 1
            kept += int(50 <= region.mean() <= 245)
    slide.close()
    return {"cells": total, "kept": kept}


def run_naive(
    slides: list[tuple[str, float | None]], patch_size: int, magnification: float
) -> tuple[float, int, int]:
    import ray

    task = ray.remote(num_cpus=1)(naive_slide)
    start = time.perf_counter()
    results = ray.get([task.remote(p, patch_size, magnification, b) for p, b in slides])
    return (
        time.perf_counter() - start,
        sum(r["kept"] for r in results),
        sum(r["cells"] for r in results),
    )


def run_layer(
    slides: list[tuple[str, float | None]], patch_size: int, magnification: float, out: Path
) -> tuple[float, int]:
    """One ``build_manifest`` over every slide: a slide without a pixel size (the TCGA one) is
    read at its ``--assume-mpp``; slides that record theirs ignore it."""
    from histokd.manifest import ManifestConfig, build_manifest

    assumed = {10.0 / b for _, b in slides if b is not None}
    if len(assumed) > 1:
        raise ValueError(f"one assumed pixel size per run, got {sorted(assumed)}")
    config = ManifestConfig(
        mpp=10.0 / magnification,
        patch_size=patch_size,
        num_patches=None,
        assume_mpp=assumed.pop() if assumed else None,
    )
    start = time.perf_counter()
    total = build_manifest([p for p, _ in slides], out / "manifest", config, overwrite=True)
    return time.perf_counter() - start, total.num_patches


def main() -> None:
    p = argument_parser(__doc__, Path(__file__).with_suffix(".json"))
    p.add_argument("--patch-size", type=int, default=1024, help="RCKD Sec. 2.1.1: 1024 at 20x")
    p.add_argument("--magnification", type=float, default=20.0)
    p.add_argument("--demo-slides", type=int, default=8)
    p.add_argument("--mosaic-slides", type=int, default=8, help="large real-tissue slides")
    p.add_argument("--mosaic-size", type=int, default=16384, help="their side in px at 0.5 um/px")
    p.add_argument("--work", type=Path, default=None, help="folder for the slides (kept)")
    p.add_argument("--repeats", type=int, default=3, help="best of N for each side")
    args = p.parse_args()

    import ray

    from histokd.demos.synthetic import make_demo_slides

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-patches-"))
    slides: list[tuple[str, float | None]] = [
        (str(s.path), None) for s in make_demo_slides(work / "slides", n=args.demo_slides, seed=0)
    ]
    testdata = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "slides"
    if args.mosaic_slides:
        from histokd.slides import SlideReader

        with SlideReader(testdata / "cmu-1-small-region.svs") as reader:  # real H&E, 20x
            w, h = reader.info.dimensions
            source = reader.read_region(0, 0, (w, h), reader.info.base_magnification)
        (work / "mosaic").mkdir(parents=True, exist_ok=True)
        for i in range(args.mosaic_slides):
            path = work / "mosaic" / f"mosaic-{args.mosaic_size}-{i:02d}.svs"
            slides.append((mosaic_slide(path, args.mosaic_size, i, source), None))
            print(f"mosaic slide {i + 1}/{args.mosaic_slides}: {path}", flush=True)
    if testdata.is_dir():
        slides += [
            (str(testdata / "cmu-1-small-region.svs"), None),
            (str(testdata / "tcga-cr-7395-01a-01-ts1.svs"), 40.0),
        ]

    results = []
    for workers in (1, 2):
        ray.init(
            num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
        naive_best, layer_best = float("inf"), float("inf")
        for _ in range(args.repeats):  # interleaved, so background load hits both sides alike
            t, naive_kept, cells = run_naive(slides, args.patch_size, args.magnification)
            naive_best = min(naive_best, t)
            t, tissue = run_layer(slides, args.patch_size, args.magnification, work)
            layer_best = min(layer_best, t)
        ray.shutdown()
        row = {
            "workers": workers,
            "slides": len(slides),
            "grid_cells": cells,
            "tissue_patches": tissue,
            "naive_kept_by_mean_rule_alone": naive_kept,
            "naive_seconds": round(naive_best, 3),
            "histokd_seconds": round(layer_best, 3),
            "naive_tissue_patches_per_s_per_core": round(tissue / naive_best / workers, 2),
            "histokd_tissue_patches_per_s_per_core": round(tissue / layer_best / workers, 2),
            "speedup": round(naive_best / layer_best, 2),
        }
        results.append(row)
        print(json.dumps(row))
    report = {
        "benchmark": "tissue patches per second, histokd slide layer vs naive level-0 loop",
        "patch_size": args.patch_size,
        "magnification": args.magnification,
        "results": results,
    }
    write_json(args.out, report)


if __name__ == "__main__":
    main()
