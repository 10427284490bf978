"""The patch manifest: which tissue patches of which slides every later stage reads.

RCKD Sec. 2.1.1 samples S_n tissue patches of 1024x1024 pixels at 20x (0.5 um/px) from unlabeled
slides. Patches are asked for in physical units (``mpp``; a magnification is its alias), so every
patch covers the same tissue whatever the scanner; each row records its effective um/px.
Building the list once, seeded, and writing it to Parquet means the teacher stream, every epoch
and every rerun read exactly the same patches.

Steps, each slide independently (Ray tasks):
1. scan: a thumbnail tissue mask gives each grid cell a tissue fraction; cells under the
   threshold are skipped without reading them at full resolution;
2. sample: the candidates of all slides in one seeded random order, under a per-slide quota
   (``sampling``: see :func:`slide_quotas`);
3. verify: candidates are read, in that order, and kept if their mean intensity is in
   [50, 245] (RCKD Sec. 2.1.1) and their slide is under its quota, until S_n are kept. The
   mean is read from the coarsest pyramid level that still gives ``rule_size`` pixels a side:
   area averaging keeps the mean.

A slide that cannot be used is skipped and listed with its reason in ``bad_slides.csv`` beside
the manifest; only when every slide is bad does the build fail. A slide some of whose patches
cannot be read keeps its readable ones and is listed too, as ``partial``. Columns of
``bad_slides.csv``: ``slide_path``, ``stage`` (``scan`` or ``read``), ``reason`` (the first
error), ``status`` (``skipped``: no patch of the slide is used; ``partial``: only its unreadable
patches are left out), ``unreadable_patches`` and ``tried_patches`` (patches read and failed, of
those tried; empty for the ``scan`` stage).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from histokd import object_store
from histokd.resume import write_atomic
from histokd.slides import (
    IMAGE_EXTENSIONS,
    SlideError,
    SlideReader,
    resolve_assume_mpp,
    resolve_target_mpp,
)
from histokd.tissue import TissueFilter, mean_intensity, tissue_fraction, tissue_mask

__all__ = [
    "ManifestConfig",
    "ManifestError",
    "ManifestResult",
    "PatchReader",
    "SAMPLING_RULES",
    "SLIDE_EXTENSIONS",
    "balance_line",
    "build_manifest",
    "discover_slides",
    "grid_cells",
    "read_manifest",
    "scan_slide",
    "slide_quotas",
    "write_skipped_slides",
]

log = logging.getLogger(__name__)

SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm", ".czi",
    *(ext for ext in IMAGE_EXTENSIONS if ext not in (".tif", ".tiff")),
)  # fmt: skip
SAMPLING_RULES = ("uniform", "capped", "proportional")

MANIFEST_FILE = "manifest.parquet"
SUMMARY_FILE = "manifest.json"
BAD_SLIDES_FILE = "bad_slides.csv"

MANIFEST_SCHEMA = pa.schema(
    [
        ("patch_id", pa.string()),  # stable key: slide_id/x_y
        ("sample_index", pa.int64()),  # position in the seeded order
        ("slide_id", pa.string()),
        ("slide_path", pa.string()),
        ("x", pa.int64()),  # level-0 left edge
        ("y", pa.int64()),  # level-0 top edge
        ("extent", pa.int64()),  # level-0 width the patch covers (its height: extent_y)
        ("level", pa.int32()),  # pyramid level the reader reads from
        ("magnification", pa.float32()),  # asked pixel size as a magnification: 10 / mpp asked
        ("base_magnification", pa.float32()),  # of level 0: 10 / base_mpp_x
        ("patch_size", pa.int32()),  # output pixels a side
        ("tissue_fraction", pa.float32()),  # measured at rule_size
        ("mean_intensity", pa.float32()),  # RCKD Sec. 2.1.1 rule input, at rule_size
        ("extent_y", pa.int64()),  # level-0 height the patch covers (anisotropic pixels)
        ("mpp", pa.float64()),  # effective um per patch pixel (mean of x and y)
        ("base_mpp_x", pa.float64()),  # the slide's um per level-0 pixel along x
        ("base_mpp_y", pa.float64()),
        ("mpp_source", pa.string()),  # openslide-mpp | tiff-resolution | objective-power | user
    ]
)


class ManifestError(RuntimeError):
    """The manifest could not be built (every slide bad, nothing to sample, bad settings)."""


@dataclass(frozen=True)
class ManifestConfig:
    """What patches to take from the slides.

    Attributes:
        magnification: The older way to give ``mpp``: ``10 / magnification`` (20x: 0.5).
        patch_size: Patch width and height in pixels (RCKD: 1024); None: 1024, or
            ``patch_size_um / mpp``.
        num_patches: S_n, patches sampled over all slides; None takes every tissue patch.
            RCKD Sec. 2.1.1 uses 400,000; the demo default is small.
        seed: Seed of the sampling order.
        base_magnification: The older way to give ``assume_mpp``: ``10 / base_magnification``.
        thumbnail_pixels_per_patch: Thumbnail resolution of the tissue mask, in thumbnail
            pixels along a patch side.
        rule_size: Side in pixels at which each candidate is read for the mean-intensity rule
            and its tissue fraction. A mean is unchanged by area downsampling, so reading a
            1024 px patch at 128 px from a coarser pyramid level gives the same decision (within
            about one grey level, measured in the tests) at a fraction of the decoding cost.
            None reads every candidate at full resolution.
        tissue: Thresholds of the tissue mask and the mean-intensity rule.
        mpp: Pixel size of the patches in um/px; None: ``magnification``'s, else 0.5 (RCKD
            Sec. 2.1.1: 20x). After construction ``mpp`` and ``magnification`` are both set.
        assume_mpp: um per level-0 pixel of slides that record no MPP, TIFF resolution or
            objective power; slides that record one ignore it. Without it they are bad slides.
        patch_size_um: Patch side in um (1024 px at 0.5 um/px is 512 um); sets ``patch_size``.
        sampling: The rule of :func:`slide_quotas`: ``uniform``, ``capped`` or
            ``proportional``; None: ``capped`` when ``max_patches_per_slide`` is set, else
            ``uniform``.
        max_patches_per_slide: The cap of ``capped`` and ``proportional``.
    """

    magnification: float | None = None
    patch_size: int | None = None
    num_patches: int | None = None
    seed: int = 0
    base_magnification: float | None = None
    thumbnail_pixels_per_patch: int = 16
    rule_size: int | None = 128
    tissue: TissueFilter = field(default_factory=TissueFilter)
    mpp: float | None = None  # RCKD Sec. 2.1.1: 20x, 0.5 um/px
    assume_mpp: float | None = None
    patch_size_um: float | None = None
    sampling: str | None = None
    max_patches_per_slide: int | None = None

    def __post_init__(self) -> None:
        mpp = resolve_target_mpp(self.mpp, self.magnification)
        object.__setattr__(self, "mpp", mpp)
        object.__setattr__(self, "magnification", 10.0 / mpp)
        object.__setattr__(
            self, "assume_mpp", resolve_assume_mpp(self.assume_mpp, self.base_magnification)
        )
        object.__setattr__(
            self, "patch_size", patch_size_px(self.patch_size, self.patch_size_um, mpp)
        )
        object.__setattr__(
            self, "sampling", resolve_sampling(self.sampling, self.max_patches_per_slide)
        )
        if self.num_patches is not None and not (
            isinstance(self.num_patches, int) and self.num_patches > 0
        ):
            raise ValueError(
                f"num_patches={self.num_patches!r}: must be a positive integer or None (all)"
            )
        if not self.thumbnail_pixels_per_patch >= 1:
            raise ValueError(
                f"thumbnail_pixels_per_patch={self.thumbnail_pixels_per_patch!r}: must be at least 1"
            )
        if self.rule_size is not None and not (
            isinstance(self.rule_size, int) and self.rule_size > 0
        ):
            raise ValueError(
                f"rule_size={self.rule_size!r}: must be a positive integer or None (full resolution)"
            )
        if isinstance(self.tissue, dict):  # from YAML
            object.__setattr__(self, "tissue", TissueFilter(**self.tissue))


def resolve_sampling(sampling: str | None, max_patches_per_slide: int | None) -> str:
    """The sampling rule (:func:`slide_quotas`); None: ``capped`` when a cap is set, else
    ``uniform``.

    Raises:
        ValueError: An unknown rule, a cap that is not a positive integer, ``capped`` without
            a cap, or ``uniform`` with one.
    """
    cap = max_patches_per_slide
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ValueError(f"max_patches_per_slide={cap!r}: must be a positive integer or None")
    if sampling is None:
        return "uniform" if cap is None else "capped"
    if sampling not in SAMPLING_RULES:
        raise ValueError(f"sampling={sampling!r}: allowed: {', '.join(SAMPLING_RULES)}")
    if sampling == "capped" and cap is None:
        raise ValueError("sampling='capped' needs max_patches_per_slide (e.g. 1000)")
    if sampling == "uniform" and cap is not None:
        raise ValueError(
            f"max_patches_per_slide={cap}: not used by sampling='uniform'; use capped or proportional"
        )
    return sampling


def patch_size_px(patch_size: int | None, patch_size_um: float | None, mpp: float) -> int:
    """Patch side in pixels from pixels or um (RCKD Sec. 2.1.1: 1024 px, 512 um at 0.5 um/px).

    Raises:
        ValueError: Not positive, under 1 px, or both given and disagreeing.
    """
    if patch_size is not None and not (
        isinstance(patch_size, int) and not isinstance(patch_size, bool) and patch_size > 0
    ):
        raise ValueError(f"patch_size={patch_size!r}: must be a positive integer")
    if patch_size_um is None:
        return 1024 if patch_size is None else patch_size  # RCKD Sec. 2.1.1
    if isinstance(patch_size_um, bool) or not patch_size_um > 0:
        raise ValueError(f"patch_size_um={patch_size_um!r}: must be positive (e.g. 512)")
    pixels = round(patch_size_um / mpp)
    if pixels < 1:
        raise ValueError(f"patch_size_um={patch_size_um!r}: under one pixel at {mpp:g} um/px")
    if patch_size is not None and patch_size != pixels:
        raise ValueError(
            f"patch_size={patch_size} and patch_size_um={patch_size_um!r} disagree: "
            f"{patch_size_um:g} um at {mpp:g} um/px is {pixels} px; give one of them"
        )
    return pixels


@dataclass
class SlideScan:
    """Candidate patches of one slide, from its thumbnail tissue mask."""

    path: str
    slide_id: str
    base_magnification: float
    level: int
    extent: int
    grid_cells: int
    xs: np.ndarray
    ys: np.ndarray
    thumbnail_tissue_fraction: np.ndarray
    extent_y: int = 0
    mpp: float = 0.0  # effective um per patch pixel
    base_mpp_x: float = 0.0
    base_mpp_y: float = 0.0
    mpp_source: str = ""
    tissue_area_mm2: float = 0.0  # thumbnail tissue fraction x area, over all grid cells


@dataclass
class ManifestResult:
    """Where a manifest is and what went into it.

    ``num_bad_slides`` counts the skipped slides; ``num_partial_slides`` those used in part,
    with some patches unreadable. Both are listed in ``bad_slides_path``.
    """

    manifest_path: Path
    bad_slides_path: Path
    num_patches: int
    num_slides: int
    num_bad_slides: int
    reused: bool
    summary: dict
    num_partial_slides: int = 0


@dataclass(frozen=True)
class _BadSlide:
    """One row of ``bad_slides.csv`` (columns in the module docstring)."""

    stage: str  # scan | read
    reason: str
    status: str = "skipped"  # skipped | partial
    unreadable_patches: int | None = None  # read stage only
    tried_patches: int | None = None


BAD_SLIDES_COLUMNS = (
    "slide_path",
    "stage",
    "reason",
    "status",
    "unreadable_patches",
    "tried_patches",
)


def slide_id_for(path: str) -> str:
    """A short stable id: the file stem plus a hash of the absolute path (stems repeat)."""
    path = path if object_store.is_object_url(path) else os.path.abspath(path)
    digest = hashlib.sha1(path.encode()).hexdigest()[:8]
    return f"{Path(path).stem}-{digest}"


def discover_slides(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Slide paths from files, folders (searched recursively by extension) or list files.

    A ``.txt`` input lists one slide path per line. Order is sorted and duplicates dropped,
    so the same inputs always give the same list. In folders, the ground-truth masks that
    demo slides keep beside them (``<stem>.nuclei.tif``, ``<stem>.regions.tif`` next to
    ``<stem>.json``) are not slides and are left out. Plain PNG and JPEG images are slides
    too (as one-level images), except inside another job's dataset: below a folder that holds
    one of :data:`_DATASET_MARKERS` (the demo tasks, fine-tuning and region-set folders).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: set[str] = set()
    for item in inputs:
        if object_store.is_object_url(item):  # a prefix lists like a folder
            found.update(
                object_store.list_slides(
                    item, SLIDE_EXTENSIONS, skip=lambda name, names: _demo_json(name) in names
                )
            )
            continue
        path = Path(item)
        if path.is_dir():
            for ext in SLIDE_EXTENSIONS:
                found.update(
                    os.path.abspath(p)
                    for p in path.rglob(f"*{ext}")
                    if not _is_demo_truth(p) and not _in_dataset(p, path)
                )
        elif path.suffix == ".txt" and path.is_file():
            lines = [ln.strip() for ln in path.read_text().splitlines()]
            found.update(
                ln if object_store.is_object_url(ln) else os.path.abspath(ln)
                for ln in lines
                if ln and not ln.startswith("#")
            )
        else:
            found.add(os.path.abspath(path))  # missing files are reported per slide later
    return sorted(found)


# Files that mark a folder as a dataset of image patches, not slides: the demo tasks'
# tasks.json, a fine-tuning dataset's dataset.json and classes.txt, a region set's regions.csv.
_DATASET_MARKERS = ("tasks.json", "dataset.json", "classes.txt", "regions.csv")


def _in_dataset(path: Path, root: Path) -> bool:
    """A plain image below a dataset folder (up to the searched ``root``), not a slide."""
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        return False
    for folder in path.parents:
        if any((folder / marker).is_file() for marker in _DATASET_MARKERS):
            return True
        if folder == root:
            return False
    return False


def _demo_json(name: str) -> str | None:
    """The ``<stem>.json`` beside which a file named ``name`` (a path or an object key) would be
    a demo slide's ground-truth mask (:mod:`histokd.demos.synthetic.demo`), else None."""
    for suffix in (".nuclei.tif", ".regions.tif"):
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".json"
    return None


def _is_demo_truth(path: Path) -> bool:
    """A demo slide's ground-truth mask, not a slide."""
    json_name = _demo_json(path.name)
    return json_name is not None and path.with_name(json_name).is_file()


def grid_cells(
    width: int, height: int, extent: int, extent_y: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 top-left corners of the non-overlapping full patches of a slide (cells of
    ``extent`` x ``extent_y`` level-0 px; square unless the pixels are anisotropic)."""
    extent_y = extent if extent_y is None else extent_y
    cols, rows = width // extent, height // extent_y
    ys, xs = np.meshgrid(np.arange(rows) * extent_y, np.arange(cols) * extent, indexing="ij")
    return xs.ravel().astype(np.int64), ys.ravel().astype(np.int64)


def scan_slide(path: str, config: ManifestConfig) -> SlideScan:
    """Tissue candidates of one slide from a thumbnail.

    Raises:
        SlideError: The slide cannot be opened or read, its pixel size is unknown, the target
            is finer than the scan's, the patch is larger than the slide, or no grid cell has
            enough tissue.
    """
    with SlideReader(path, assume_mpp=config.assume_mpp) as reader:
        info = reader.info
        where = reader.footprint(config.patch_size, mpp=config.mpp)
        extent, extent_y = where.extent
        width, height = info.dimensions
        if extent > width or extent_y > height:
            raise SlideError(
                path,
                f"patch of {config.patch_size} px at {config.mpp:g} um/px ({config.magnification:.3g}x) "
                f"covers {extent}x{extent_y} level-0 px, larger than the slide ({width}x{height} px "
                f"at {info.mpp_x:g} um/px); allowed: a patch that fits",
            )
        xs, ys = grid_cells(width, height, extent, extent_y)
        # Thumbnail at the pixel size where one patch spans `thumbnail_pixels_per_patch`
        # pixels, never finer than the scan's.
        thumb_mpp = max(
            min(info.mpp_x, info.mpp_y),
            config.mpp * config.patch_size / config.thumbnail_pixels_per_patch,
        )
        thumb = reader.thumbnail(mpp=thumb_mpp)
        mask = tissue_mask(thumb, config.tissue).astype(np.float64)
        scale = (thumb.shape[1] / width, thumb.shape[0] / height)  # thumbnail px per level-0 px
        fractions = _block_means(mask, xs, ys, (extent, extent_y), scale)
        keep = fractions >= config.tissue.min_tissue_fraction
        if not keep.any():
            raise SlideError(
                path,
                f"no tissue: none of {len(xs)} grid cells has a tissue fraction of at least "
                f"{config.tissue.min_tissue_fraction:g} on the thumbnail",
            )
        cell_mm2 = extent * info.mpp_x * extent_y * info.mpp_y * 1e-6
        return SlideScan(
            path=reader.path,
            slide_id=slide_id_for(reader.path),
            base_magnification=info.base_magnification,
            level=where.level,
            extent=extent,
            grid_cells=len(xs),
            xs=xs[keep],
            ys=ys[keep],
            thumbnail_tissue_fraction=fractions[keep].astype(np.float32),
            extent_y=extent_y,
            mpp=float(np.mean(where.mpp)),
            base_mpp_x=info.mpp_x,
            base_mpp_y=info.mpp_y,
            mpp_source=info.mpp_source,
            tissue_area_mm2=float(fractions.sum() * cell_mm2),
        )


def _block_means(
    mask: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    extent: tuple[int, int],
    scale: tuple[float, float],
) -> np.ndarray:
    """Mean of ``mask`` over each cell's footprint on the thumbnail, by an integral image."""
    integral = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = mask.shape
    (ex, ey), (sx, sy) = extent, scale
    x0 = np.clip(np.floor(xs * sx).astype(int), 0, w - 1)
    y0 = np.clip(np.floor(ys * sy).astype(int), 0, h - 1)
    x1 = np.clip(np.ceil((xs + ex) * sx).astype(int), x0 + 1, w)
    y1 = np.clip(np.ceil((ys + ey) * sy).astype(int), y0 + 1, h)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return total / ((x1 - x0) * (y1 - y0))


def verify_patches(
    path: str, xs: Sequence[int], ys: Sequence[int], config: ManifestConfig
) -> dict[str, np.ndarray | list[str]]:
    """Read candidates (at ``config.rule_size``) and measure the mean-intensity rule's input.

    Returns:
        ``mean_intensity``, ``tissue_fraction`` and ``readable`` per candidate, and
        ``errors``: the messages of unreadable ones.
    """
    n = len(xs)
    means = np.full(n, np.nan, np.float32)
    fractions = np.full(n, np.nan, np.float32)
    readable = np.zeros(n, bool)
    errors: list[str] = []
    try:
        reader = SlideReader(path, assume_mpp=config.assume_mpp)
    except SlideError as exc:
        return {
            "mean_intensity": means,
            "tissue_fraction": fractions,
            "readable": readable,
            "errors": [str(exc)],
        }
    size = (
        config.patch_size if config.rule_size is None else min(config.rule_size, config.patch_size)
    )
    mpp = config.mpp * config.patch_size / size  # same level-0 extent
    with reader:
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            try:
                patch = reader.read_region(int(x), int(y), size, mpp=mpp)
            except SlideError as exc:
                errors.append(str(exc))
                continue
            readable[i] = True
            means[i] = mean_intensity(patch)
            fractions[i] = tissue_fraction(patch, config.tissue)
    return {
        "mean_intensity": means,
        "tissue_fraction": fractions,
        "readable": readable,
        "errors": errors,
    }


def _scan_or_error(path: str, config: ManifestConfig) -> SlideScan | str:
    try:
        return scan_slide(path, config)
    except SlideError as exc:
        return str(exc)


def _fingerprint(slides: Sequence[str], config: ManifestConfig) -> str:
    """Identity of a build: settings and each slide's path, size and mtime (a URL's: size and
    ETag or generation, from its listing)."""
    stats = []
    for p in slides:
        try:
            if object_store.is_object_url(p):
                info = object_store.stat(p)
                stats.append((p, info.size, info.version))
                continue
            st = os.stat(p)
            stats.append((p, st.st_size, int(st.st_mtime)))
        except (OSError, object_store.ObjectStoreError):
            stats.append((p, -1, -1))
    blob = json.dumps({"config": asdict(config), "slides": stats}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class _Executor:
    """Runs a function over items locally, or as Ray tasks with bounded tasks in flight."""

    def __init__(self, use_ray: bool, max_in_flight: int = 64):
        self.use_ray = use_ray
        self.max_in_flight = max_in_flight

    def map(self, fn, arg_lists: list[tuple], label: str) -> list:
        total = len(arg_lists)
        start = time.monotonic()
        results: list = [None] * total
        done = 0

        def progress() -> None:
            if done == total or done % max(1, total // 10) == 0:
                rate = done / max(time.monotonic() - start, 1e-9)
                log.info("%s: %d/%d (%.1f/s)", label, done, total, rate)

        if not self.use_ray:
            for i, args in enumerate(arg_lists):
                results[i] = fn(*args)
                done += 1
                progress()
            return results
        import ray

        remote_fn = ray.remote(num_cpus=1, max_retries=2)(fn)
        pending: dict = {}
        next_index = 0
        while next_index < total or pending:
            while next_index < total and len(pending) < self.max_in_flight:
                pending[remote_fn.remote(*arg_lists[next_index])] = next_index
                next_index += 1
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                results[pending.pop(ref)] = ray.get(ref)
                done += 1
                progress()
        return results


def build_manifest(
    slides: str | os.PathLike | Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: ManifestConfig | None = None,
    use_ray: bool = True,
    verify_chunk: int = 128,
    overwrite: bool = False,
) -> ManifestResult:
    """Build (or reuse) the patch manifest of a set of slides.

    Args:
        slides: Slide files, folders or ``.txt`` lists (see :func:`discover_slides`).
        out_dir: Folder for ``manifest.parquet``, ``manifest.json`` and ``bad_slides.csv``.
        config: What to sample.
        use_ray: Scan and verify slides as Ray tasks (the driver must have called
            ``ray.init``, or Ray starts a local cluster); False runs them in this process.
        verify_chunk: Candidates verified per task.
        overwrite: Rebuild even when a manifest of the same inputs and settings exists.

    Returns:
        Paths and counts. An existing manifest with the same fingerprint is reused as is.

    Raises:
        ManifestError: No slides were given, or every slide is bad (the message lists why).
    """
    config = config or ManifestConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = discover_slides(slides)
    if not paths:
        raise ManifestError(
            f"no slides found in {slides!r} (extensions: {', '.join(SLIDE_EXTENSIONS)})"
        )
    fingerprint = _fingerprint(paths, config)
    manifest_path, summary_path, bad_path = (
        out_dir / MANIFEST_FILE,
        out_dir / SUMMARY_FILE,
        out_dir / BAD_SLIDES_FILE,
    )
    if not overwrite and manifest_path.exists() and summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("fingerprint") == fingerprint:
            log.info("manifest %s is up to date: reusing it", manifest_path)
            return ManifestResult(
                manifest_path, bad_path, summary["num_patches"], summary["num_slides"],
                summary["num_bad_slides"], True, summary, summary.get("num_partial_slides", 0),
            )  # fmt: skip

    executor = _Executor(use_ray)
    started = time.monotonic()
    scans = executor.map(_scan_or_error, [(p, config) for p in paths], "scan slides")
    bad: dict[str, _BadSlide] = {}  # skipped slides
    partial: dict[str, _BadSlide] = {}  # used, but some patches unreadable
    good: list[SlideScan] = []
    for path, scan in zip(paths, scans, strict=True):
        if isinstance(scan, str):
            bad[path] = _BadSlide("scan", scan)
        else:
            good.append(scan)

    # One seeded order over all candidates of all slides, each slide under its quota.
    owner = (
        np.concatenate([np.full(len(s.xs), i) for i, s in enumerate(good)])
        if good
        else np.zeros(0, int)
    )
    local = np.concatenate([np.arange(len(s.xs)) for s in good]) if good else np.zeros(0, int)
    order = np.random.default_rng(config.seed).permutation(len(owner))
    target = len(order) if config.num_patches is None else config.num_patches
    quota = slide_quotas(
        np.array([len(s.xs) for s in good], np.int64),
        np.array([s.tissue_area_mm2 for s in good], np.float64),
        target, config.sampling, config.max_patches_per_slide,
    )  # fmt: skip

    slide_at = owner[order]  # slide of each order position
    verified = np.zeros(len(order), bool)
    passed = np.zeros(len(order), bool)
    means = np.zeros(len(order), np.float32)
    fractions = np.zeros(len(order), np.float32)
    read_errors: dict[int, list[str]] = {}
    attempts: dict[int, int] = {}
    while True:
        selected = _first_per_slide(np.flatnonzero(passed), slide_at, quota)
        passing = np.bincount(slide_at[passed], minlength=len(good))
        # Each slide is verified in its own order: once it has its quota, the rest is moot.
        pending = ~verified & (passing < quota)[slide_at]
        frontier = int(np.argmax(pending)) if pending.any() else len(order)
        settled = int(np.count_nonzero(selected < frontier))
        if frontier == len(order) or settled >= target:
            break
        # Oversample a little (some candidates fail the mean rule), overall and per slide.
        want = target - settled
        need = quota - passing
        pick = pending & (_rank_within(slide_at, pending) < (need + need // 4 + 1)[slide_at])
        take = np.flatnonzero(pick)[: want + want // 4 + 1]
        verified[take] = True
        jobs, index = [], []
        for slide in np.unique(slide_at[take]):
            positions = take[slide_at[take] == slide]
            for start in range(0, len(positions), verify_chunk):
                chunk = positions[start : start + verify_chunk]
                scan, cand = good[slide], local[order[chunk]]
                jobs.append((scan.path, scan.xs[cand], scan.ys[cand], config))
                index.append((slide, chunk))
        results = executor.map(verify_patches, jobs, "verify patches")
        rule = config.tissue
        for (slide, chunk), res in zip(index, results, strict=True):
            attempts[slide] = attempts.get(slide, 0) + len(chunk)
            if res["errors"]:
                read_errors.setdefault(slide, []).extend(res["errors"])
            passed[chunk] = (
                res["readable"]
                & (res["mean_intensity"] >= rule.min_mean_intensity)
                & (res["mean_intensity"] <= rule.max_mean_intensity)
            )
            means[chunk], fractions[chunk] = res["mean_intensity"], res["tissue_fraction"]
    kept = [
        (int(pos), int(order[pos]), float(means[pos]), float(fractions[pos]))
        for pos in selected[:target]
    ]  # (order position, candidate, mean, fraction)

    for slide, errors in read_errors.items():
        path = good[slide].path
        if len(errors) >= attempts[slide]:
            bad[path] = _BadSlide("read", errors[0], "skipped", len(errors), attempts[slide])
        else:
            partial[path] = _BadSlide("read", errors[0], "partial", len(errors), attempts[slide])
            log.warning(
                "%s: %d of %d patches unreadable, skipped: %s",
                path,
                len(errors),
                attempts[slide],
                errors[0],
            )
    used = {good[owner[c]].path for _, c, _, _ in kept}
    if not kept:
        _write_atomically([(bad_path, lambda p: _write_bad_slides(p, bad, partial))])
        reasons = (
            "\n".join(f"  {p}: {b.reason}" for p, b in sorted(bad.items())) or "  (no candidates)"
        )
        raise ManifestError(
            f"no usable patches in {len(paths)} slides; {len(bad)} bad:\n{reasons}\n"
            f"report: {bad_path}"
        )

    rows = []
    for sample_index, (_, cand, mean, frac) in enumerate(kept):
        scan = good[owner[cand]]
        x, y = int(scan.xs[local[cand]]), int(scan.ys[local[cand]])
        rows.append(
            {
                "patch_id": f"{scan.slide_id}/{x}_{y}",
                "sample_index": sample_index,
                "slide_id": scan.slide_id,
                "slide_path": scan.path,
                "x": x,
                "y": y,
                "extent": scan.extent,
                "level": scan.level,
                "magnification": config.magnification,
                "base_magnification": scan.base_magnification,
                "patch_size": config.patch_size,
                "tissue_fraction": frac,
                "mean_intensity": mean,
                "extent_y": scan.extent_y,
                "mpp": scan.mpp,
                "base_mpp_x": scan.base_mpp_x,
                "base_mpp_y": scan.base_mpp_y,
                "mpp_source": scan.mpp_source,
            }
        )
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    per_slide: dict[str, int] = {}
    for row in rows:
        per_slide[row["slide_path"]] = per_slide.get(row["slide_path"], 0) + 1
    sources = [scan.mpp_source for scan in good]
    summary = {
        "fingerprint": fingerprint,
        "config": asdict(config),
        "num_patches": len(rows),
        "num_requested": config.num_patches,
        "num_slides": len(paths),
        "num_slides_used": len(used),
        "num_bad_slides": len(bad),
        "num_partial_slides": len(partial),
        "num_candidates": int(len(order)),
        "num_verified": int(sum(attempts.values())),
        "num_unreadable_patches": int(sum(len(e) for e in read_errors.values())),
        "num_slides_mpp_from_objective": sources.count("objective-power"),
        "num_slides_mpp_assumed": sources.count("user"),
        "sampling": config.sampling,
        "max_patches_per_slide": config.max_patches_per_slide,
        "patches_per_slide": dict(sorted(per_slide.items())),
        "seconds": round(time.monotonic() - started, 2),
    }
    # a reader never sees half a manifest; the summary, which marks it finished, goes last
    _write_atomically([
        (manifest_path, lambda p: pq.write_table(table, p)),
        (bad_path, lambda p: _write_bad_slides(p, bad, partial)),
        (summary_path, lambda p: p.write_text(json.dumps(summary, indent=2, default=str))),
    ])  # fmt: skip
    if config.num_patches is not None and len(rows) < config.num_patches:
        log.warning(
            "only %d tissue patches found of the %d asked for", len(rows), config.num_patches
        )
    log.info(
        "manifest: %d patches from %d of %d slides (%d bad, %d with unreadable patches, listed in %s)",
        len(rows), len(used), len(paths), len(bad), len(partial), bad_path,
    )  # fmt: skip
    return ManifestResult(
        manifest_path, bad_path, len(rows), len(paths), len(bad), False, summary, len(partial)
    )


def slide_quotas(
    candidates: np.ndarray,
    tissue_area: np.ndarray,
    target: int,
    sampling: str,
    max_per_slide: int | None = None,
) -> np.ndarray:
    """The most patches each slide may give, by the sampling rule.

    The rules (all walk one seeded order over every candidate of every slide and keep a
    candidate that passes the mean rule while its slide is under its quota, until ``target``):

    - ``uniform``: no quota beyond the slide's candidates. Big slides give most patches.
    - ``capped``: at most ``max_per_slide`` per slide.
    - ``proportional``: ``target`` shared in proportion to each slide's tissue area, each
      share at most ``max_per_slide`` (if set) and the slide's candidates; what a slide cannot
      take goes to the others, again by area. Shares are rounded down and the last few
      patches go to the largest remainders.

    A slide whose candidates fail the mean rule more often than the others may end under its
    quota; the shortfall is not moved to other slides (the manifest then has fewer patches).

    Args:
        candidates: Tissue candidates of each slide.
        tissue_area: Tissue area of each slide (any unit).
        target: Patches wanted over all slides.
        sampling: ``uniform``, ``capped`` or ``proportional``.
        max_per_slide: The cap.
    """
    limit = candidates.astype(np.int64)
    if sampling != "uniform" and max_per_slide is not None:
        limit = np.minimum(limit, max_per_slide)
    if sampling != "proportional":
        return limit
    quota = np.zeros_like(limit)
    remaining = int(min(target, limit.sum()))
    while remaining > 0:
        room = limit - quota
        weights = np.where(room > 0, np.maximum(tissue_area, 0.0), 0.0)
        if weights.sum() <= 0:
            weights = (room > 0).astype(np.float64)
        ideal = remaining * weights / weights.sum()
        base = np.floor(ideal).astype(np.int64)
        if (base > room).any():  # these slides fill up; the rest is shared again
            add = np.minimum(base, room)
            quota += add
            remaining -= int(add.sum())
            continue
        quota += base
        remaining -= int(base.sum())
        remainder = np.where(room > base, ideal - base, -1.0)
        top = np.argsort(-remainder, kind="stable")[:remaining]
        top = top[remainder[top] >= 0]
        quota[top] += 1
        remaining -= len(top)
    return quota


def _rank_within(groups: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """For each masked position, how many masked positions before it share its group."""
    rank = np.zeros(len(groups), np.int64)
    idx = np.flatnonzero(mask)
    by_group = idx[np.argsort(groups[idx], kind="stable")]
    g = groups[by_group]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]]) if len(g) else np.zeros(0, int)
    first = np.repeat(starts, np.diff(np.r_[starts, len(g)]))
    rank[by_group] = np.arange(len(g)) - first
    return rank


def _first_per_slide(positions: np.ndarray, slide_at: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """Of sorted order ``positions``, those among the first ``quota`` of their slide."""
    mask = np.zeros(len(slide_at), bool)
    mask[positions] = True
    rank = _rank_within(slide_at, mask)
    return positions[rank[positions] < quota[slide_at[positions]]]


def balance_line(patches_per_slide: dict[str, int]) -> tuple[str, bool]:
    """One line on how the patches spread over slides, and whether one slide of several gives
    over half.

    Args:
        patches_per_slide: The manifest summary's ``patches_per_slide``.
    """
    if not patches_per_slide:
        return "patches per slide: none", False
    counts = np.array(list(patches_per_slide.values()))
    top_path = max(patches_per_slide, key=patches_per_slide.get)
    share = counts.max() / counts.sum()
    line = (
        f"patches per slide: min {counts.min()}, median {np.median(counts):g}, max {counts.max()} "
        f"over {len(counts)} slides; the top slide ({Path(top_path).name}) gives {share:.0%}"
    )
    return line, bool(share > 0.5 and len(counts) > 1)


def _write_atomically(writes: list[tuple[Path, Callable[[Path], object]]]) -> None:
    """Write each file under a temporary name, then move them into place in order: all of them,
    or (on a read-only or full disk) none, with the error naming the file.

    Raises:
        OSError: With ``filename`` the file that could not be written.
    """
    temps: list[Path] = []
    placed: list[Path] = []
    path = writes[0][0]
    try:
        for path, write in writes:
            temps.append(path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"))
            write(temps[-1])
        for (path, _), tmp in zip(writes, temps, strict=True):
            os.replace(tmp, path)
            placed.append(path)
    except OSError as exc:
        for leftover in temps + placed:
            leftover.unlink(missing_ok=True)
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise OSError(exc.errno, reason, str(path)) from exc  # errno picks the subclass


def _write_bad_slides(path: Path, bad: dict[str, _BadSlide], partial: dict[str, _BadSlide]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(BAD_SLIDES_COLUMNS)
        for slide, row in sorted({**bad, **partial}.items()):
            counts = ["" if n is None else n for n in (row.unreadable_patches, row.tried_patches)]
            writer.writerow([slide, row.stage, row.reason, row.status, *counts])


def write_skipped_slides(path: str | os.PathLike, bad: dict[str, tuple[str, str]]) -> None:
    """A ``bad_slides.csv`` of slides a job skipped whole (inference, feature export): the
    first four columns of the manifest's, ``stage`` and ``reason`` from ``bad``, written
    atomically.

    Args:
        path: The CSV.
        bad: Slide path -> (stage, reason).
    """

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(BAD_SLIDES_COLUMNS[:4])
            for slide, (stage, reason) in sorted(bad.items()):
                writer.writerow([slide, stage, reason, "skipped"])

    write_atomic(Path(path), write)


def read_manifest(path: str | os.PathLike) -> pa.Table:
    """The manifest table; ``path`` may be the Parquet file or its folder."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest here; build one with build_manifest()")
    return pq.read_table(path)


class PatchReader:
    """Reads manifest rows, keeping a few slides open (one process, many patches).

    Args:
        max_open: Slides kept open at once; the least recently used one is closed.
    """

    def __init__(self, max_open: int = 8):
        self.max_open = max_open
        self._readers: OrderedDict[str, SlideReader] = OrderedDict()

    def _reader(self, path: str, base_magnification: float) -> SlideReader:
        reader = self._readers.pop(path, None)
        if reader is None:
            reader = SlideReader(path, base_magnification)
            if not math.isclose(reader.info.base_magnification, base_magnification, rel_tol=1e-3):
                raise SlideError(
                    path,
                    f"base magnification is now {reader.info.base_magnification:g}x but the "
                    f"manifest was built at {base_magnification:g}x; rebuild the manifest",
                )
        self._readers[path] = reader
        while len(self._readers) > self.max_open:
            _, old = self._readers.popitem(last=False)
            old.close()
        return reader

    def read(self, row: dict) -> np.ndarray:
        """The patch of one manifest row, RGB uint8 (patch_size, patch_size, 3)."""
        reader = self._reader(row["slide_path"], float(row["base_magnification"]))
        return reader.read_region(
            int(row["x"]), int(row["y"]), int(row["patch_size"]), float(row["magnification"])
        )

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
