"""The patch manifest: which tissue patches of which slides every later stage reads.

RCKD Sec. 2.1.1 samples S_n tissue patches of 1024x1024 pixels at 20x from unlabeled slides.
Building the list once, seeded, and writing it to Parquet means the teacher stream, every epoch
and every rerun read exactly the same patches.

Steps, each slide independently (Ray tasks):
1. scan: a thumbnail tissue mask gives each grid cell a tissue fraction; cells under the
   threshold are skipped without reading them at full resolution;
2. sample: the candidates of all slides in one seeded random order;
3. verify: candidates are read, in that order, and kept if their mean intensity is in
   [50, 245] (RCKD Sec. 2.1.1) until S_n are kept. The mean is read from the coarsest pyramid
   level that still gives ``rule_size`` pixels a side: area averaging keeps the mean.

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

from histokd.slides import SlideError, SlideReader
from histokd.tissue import TissueFilter, mean_intensity, tissue_fraction, tissue_mask

__all__ = [
    "ManifestConfig",
    "ManifestError",
    "ManifestResult",
    "PatchReader",
    "SLIDE_EXTENSIONS",
    "build_manifest",
    "discover_slides",
    "grid_cells",
    "read_manifest",
    "scan_slide",
]

log = logging.getLogger(__name__)

SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm", ".czi",
)  # fmt: skip

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
        ("extent", pa.int64()),  # level-0 pixels the patch covers (width = height)
        ("level", pa.int32()),  # pyramid level the reader reads from
        ("magnification", pa.float32()),  # magnification of the patch
        ("base_magnification", pa.float32()),  # of level 0, as the reader resolved it
        ("patch_size", pa.int32()),  # pixels at `magnification`
        ("tissue_fraction", pa.float32()),  # measured at rule_size
        ("mean_intensity", pa.float32()),  # RCKD Sec. 2.1.1 rule input, at rule_size
    ]
)


class ManifestError(RuntimeError):
    """The manifest could not be built (every slide bad, nothing to sample, bad settings)."""


@dataclass(frozen=True)
class ManifestConfig:
    """What patches to take from the slides.

    Attributes:
        magnification: Magnification of the patches (RCKD Sec. 2.1.1: 20x).
        patch_size: Patch width and height in pixels at ``magnification`` (RCKD: 1024).
        num_patches: S_n, patches sampled over all slides; None takes every tissue patch.
            RCKD Sec. 2.1.1 uses 400,000; the demo default is small.
        seed: Seed of the sampling order.
        base_magnification: Level-0 magnification for slides that record neither objective
            power nor MPP. Slides that record one ignore it.
        thumbnail_pixels_per_patch: Thumbnail resolution of the tissue mask, in thumbnail
            pixels along a patch side.
        rule_size: Side in pixels at which each candidate is read for the mean-intensity rule
            and its tissue fraction. A mean is unchanged by area downsampling, so reading a
            1024 px patch at 128 px from a coarser pyramid level gives the same decision (within
            about one grey level, measured in the tests) at a fraction of the decoding cost.
            None reads every candidate at full resolution.
        tissue: Thresholds of the tissue mask and the mean-intensity rule.
    """

    magnification: float = 20.0  # RCKD Sec. 2.1.1
    patch_size: int = 1024  # RCKD Sec. 2.1.1
    num_patches: int | None = None
    seed: int = 0
    base_magnification: float | None = None
    thumbnail_pixels_per_patch: int = 16
    rule_size: int | None = 128
    tissue: TissueFilter = field(default_factory=TissueFilter)

    def __post_init__(self) -> None:
        if not (isinstance(self.patch_size, int) and self.patch_size > 0):
            raise ValueError(f"patch_size={self.patch_size!r}: must be a positive integer")
        if not self.magnification > 0:
            raise ValueError(f"magnification={self.magnification!r}: must be positive (e.g. 20)")
        if self.num_patches is not None and not (
            isinstance(self.num_patches, int) and self.num_patches > 0
        ):
            raise ValueError(
                f"num_patches={self.num_patches!r}: must be a positive integer or None (all)"
            )
        if self.base_magnification is not None and not self.base_magnification > 0:
            raise ValueError(
                f"base_magnification={self.base_magnification!r}: must be positive or None"
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
    path = os.path.abspath(path)
    digest = hashlib.sha1(path.encode()).hexdigest()[:8]
    return f"{Path(path).stem}-{digest}"


def discover_slides(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Slide paths from files, folders (searched recursively by extension) or list files.

    A ``.txt`` input lists one slide path per line. Order is sorted and duplicates dropped,
    so the same inputs always give the same list. In folders, the ground-truth masks that
    demo slides keep beside them (``<stem>.nuclei.tif``, ``<stem>.regions.tif`` next to
    ``<stem>.json``) are not slides and are left out.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: set[str] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for ext in SLIDE_EXTENSIONS:
                found.update(
                    os.path.abspath(p) for p in path.rglob(f"*{ext}") if not _is_demo_truth(p)
                )
        elif path.suffix == ".txt" and path.is_file():
            lines = [ln.strip() for ln in path.read_text().splitlines()]
            found.update(os.path.abspath(ln) for ln in lines if ln and not ln.startswith("#"))
        else:
            found.add(os.path.abspath(path))  # missing files are reported per slide later
    return sorted(found)


def _is_demo_truth(path: Path) -> bool:
    """A demo slide's ground-truth mask (see :mod:`histokd.demos.synthetic.demo`), not a slide."""
    for suffix in (".nuclei.tif", ".regions.tif"):
        if path.name.endswith(suffix):
            return path.with_name(path.name[: -len(suffix)] + ".json").is_file()
    return False


def grid_cells(width: int, height: int, extent: int) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 top-left corners of the non-overlapping full patches of a slide."""
    cols, rows = width // extent, height // extent
    ys, xs = np.meshgrid(np.arange(rows) * extent, np.arange(cols) * extent, indexing="ij")
    return xs.ravel().astype(np.int64), ys.ravel().astype(np.int64)


def scan_slide(path: str, config: ManifestConfig) -> SlideScan:
    """Tissue candidates of one slide from a thumbnail.

    Raises:
        SlideError: The slide cannot be opened or read, the magnification is above the scan's,
            the patch is larger than the slide, or no grid cell has enough tissue.
    """
    with SlideReader(path, config.base_magnification) as reader:
        downsample = reader.downsample_for(config.magnification)
        extent = round(config.patch_size * downsample)
        width, height = reader.info.dimensions
        if extent > width or extent > height:
            raise SlideError(
                path,
                f"patch of {config.patch_size} px at {config.magnification:g}x covers {extent} "
                f"level-0 px, larger than the slide ({width}x{height} px at "
                f"{reader.info.base_magnification:g}x); allowed: a patch that fits",
            )
        xs, ys = grid_cells(width, height, extent)
        # Thumbnail at the magnification where one patch spans `thumbnail_pixels_per_patch`
        # pixels, never above the scan's.
        thumb_mag = min(
            reader.info.base_magnification,
            config.magnification * config.thumbnail_pixels_per_patch / config.patch_size,
        )
        thumb = reader.thumbnail(thumb_mag)
        mask = tissue_mask(thumb, config.tissue).astype(np.float64)
        scale = thumb.shape[1] / width  # thumbnail px per level-0 px
        fractions = _block_means(mask, xs, ys, extent, scale)
        keep = fractions >= config.tissue.min_tissue_fraction
        if not keep.any():
            raise SlideError(
                path,
                f"no tissue: none of {len(xs)} grid cells has a tissue fraction of at least "
                f"{config.tissue.min_tissue_fraction:g} on the thumbnail",
            )
        return SlideScan(
            path=reader.path,
            slide_id=slide_id_for(reader.path),
            base_magnification=reader.info.base_magnification,
            level=reader.best_level(config.magnification),
            extent=extent,
            grid_cells=len(xs),
            xs=xs[keep],
            ys=ys[keep],
            thumbnail_tissue_fraction=fractions[keep].astype(np.float32),
        )


def _block_means(
    mask: np.ndarray, xs: np.ndarray, ys: np.ndarray, extent: int, scale: float
) -> np.ndarray:
    """Mean of ``mask`` over each cell's footprint on the thumbnail, by an integral image."""
    integral = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = mask.shape
    x0 = np.clip(np.floor(xs * scale).astype(int), 0, w - 1)
    y0 = np.clip(np.floor(ys * scale).astype(int), 0, h - 1)
    x1 = np.clip(np.ceil((xs + extent) * scale).astype(int), x0 + 1, w)
    y1 = np.clip(np.ceil((ys + extent) * scale).astype(int), y0 + 1, h)
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
        reader = SlideReader(path, config.base_magnification)
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
    magnification = config.magnification * size / config.patch_size  # same level-0 extent
    with reader:
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            try:
                patch = reader.read_region(int(x), int(y), size, magnification)
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
    """Identity of a build: settings and each slide's path, size and mtime."""
    stats = []
    for p in slides:
        try:
            st = os.stat(p)
            stats.append((p, st.st_size, int(st.st_mtime)))
        except OSError:
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

    # One seeded order over all candidates of all slides.
    owner = (
        np.concatenate([np.full(len(s.xs), i) for i, s in enumerate(good)])
        if good
        else np.zeros(0, int)
    )
    local = np.concatenate([np.arange(len(s.xs)) for s in good]) if good else np.zeros(0, int)
    order = np.random.default_rng(config.seed).permutation(len(owner))
    target = len(order) if config.num_patches is None else config.num_patches

    kept: list[tuple[int, int, float, float]] = []  # (order position, candidate, mean, fraction)
    read_errors: dict[int, list[str]] = {}
    attempts: dict[int, int] = {}
    position = 0
    while position < len(order) and len(kept) < target:
        # Oversample a little: some candidates fail the mean rule.
        want = target - len(kept)
        take = order[position : position + max(want + want // 4 + 1, 1)]
        batch_positions = np.arange(position, position + len(take))
        position += len(take)
        jobs, index = [], []
        for slide in np.unique(owner[take]):
            sel = owner[take] == slide
            cand = take[sel]
            for start in range(0, len(cand), verify_chunk):
                chunk = cand[start : start + verify_chunk]
                scan = good[slide]
                jobs.append((scan.path, scan.xs[local[chunk]], scan.ys[local[chunk]], config))
                index.append((slide, chunk, batch_positions[sel][start : start + verify_chunk]))
        results = executor.map(verify_patches, jobs, "verify patches")
        for (slide, chunk, positions), res in zip(index, results, strict=True):
            attempts[slide] = attempts.get(slide, 0) + len(chunk)
            if res["errors"]:
                read_errors.setdefault(slide, []).extend(res["errors"])
            rule = config.tissue
            ok = (
                res["readable"]
                & (res["mean_intensity"] >= rule.min_mean_intensity)
                & (res["mean_intensity"] <= rule.max_mean_intensity)
            )
            for j in np.flatnonzero(ok):
                kept.append(
                    (
                        int(positions[j]),
                        int(chunk[j]),
                        float(res["mean_intensity"][j]),
                        float(res["tissue_fraction"][j]),
                    )
                )
        kept.sort()
        kept = kept[:target]

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
            }
        )
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
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
