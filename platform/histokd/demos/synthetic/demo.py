"""Demo slides on disk: SVS images with their exact ground truth beside them.

For slide ``i`` of seed ``s`` the folder holds::

    demo-s{s}-{i:03d}.svs           the image (Aperio SVS, JPEG tiles, pyramid)
    demo-s{s}-{i:03d}.nuclei.tif    nuclei instances at level 0 (uint32, 0 = none)
    demo-s{s}-{i:03d}.regions.tif   tissue classes at level 0 (uint8, 0 = no tissue)
    demo-s{s}-{i:03d}.json          how it was made and what it holds

The JSON is written last, so a slide with a JSON is complete; it records every
parameter, and :func:`make_demo_slides` regenerates a slide only when they differ.
Slide ``i`` is drawn from ``numpy.random.SeedSequence([s, i])``: asking for more slides
later adds slides without changing the first ones.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from histokd.demos.synthetic.slide import SlideSpec, synthesize_slide
from histokd.demos.synthetic.tiff import _atomic, read_tiff_region, write_label_tiff, write_svs

__all__ = ["GENERATOR_VERSION", "DemoSlide", "load_demo_slide", "make_demo_slides", "read_truth"]

logger = logging.getLogger(__name__)

# Bump whenever the drawing changes, so that make_demo_slides redraws stale slides.
GENERATOR_VERSION = 1

TruthKind = Literal["nuclei", "regions"]
_SPEC_FIELDS = {f.name for f in dataclasses.fields(SlideSpec)}


@dataclass(frozen=True)
class DemoSlide:
    """A demo slide on disk and what is known about it.

    Attributes:
        slide_path: The SVS image.
        nuclei_path: Level-0 nuclei instance mask (uint32 TIFF).
        regions_path: Level-0 tissue class mask (uint8 TIFF).
        metadata_path: The JSON sidecar.
        seed: Seed of the set the slide belongs to.
        index: Index of the slide within its set.
        width: Level-0 width in pixels.
        height: Level-0 height in pixels.
        mpp: Micrometres per level-0 pixel.
        magnification: Objective power of level 0.
        class_names: Tissue class names; region mask value k is ``class_names[k - 1]``.
        n_nuclei: Number of nuclei (the largest id in the nuclei mask).
    """

    slide_path: Path
    nuclei_path: Path
    regions_path: Path
    metadata_path: Path
    seed: int
    index: int
    width: int
    height: int
    mpp: float
    magnification: float
    class_names: tuple[str, ...]
    n_nuclei: int

    def read_truth(self, x: int, y: int, width: int, height: int, **kwargs) -> np.ndarray:
        """Crop of a ground-truth mask (``kind``, ``size``); see :func:`read_truth`."""
        return read_truth(self, x, y, width, height, **kwargs)

    @property
    def path(self) -> Path:
        """The slide file (``slide_path``), for code that takes any slide's path."""
        return self.slide_path

    def __fspath__(self) -> str:
        """Let a demo slide stand wherever a path is taken (``openslide.OpenSlide(slide)``)."""
        return str(self.slide_path)

    @property
    def metadata(self) -> dict:
        """The JSON sidecar as a dict."""
        return json.loads(self.metadata_path.read_text())


def make_demo_slides(
    out_dir: str | os.PathLike,
    n: int = 4,
    seed: int = 0,
    *,
    spec: SlideSpec | None = None,
    tile_size: int = 256,
    level_downsample: int = 4,
    jpeg_quality: int = 90,
    **spec_fields,
) -> list[DemoSlide]:
    """Write ``n`` demo slides with their ground truth, skipping those already written.

    Args:
        out_dir: Folder for the slides (created if missing).
        n: Number of slides.
        seed: Seed of the set; slide ``i`` uses ``SeedSequence([seed, i])``.
        spec: What to draw; default ``SlideSpec()`` (4096 px square, 20x, 0.5 um/px).
        tile_size: SVS tile side in pixels.
        level_downsample: Size ratio between SVS pyramid levels.
        jpeg_quality: JPEG quality of the SVS tiles.
        **spec_fields: :class:`SlideSpec` fields that override ``spec``, for instance
            ``width=2048, height=2048, mpp=0.25`` (a 40x scan).

    Returns:
        The slides, in index order.
    """
    unknown = sorted(set(spec_fields) - _SPEC_FIELDS)
    if unknown:
        raise ValueError(f"unknown slide fields {unknown}: allowed are {sorted(_SPEC_FIELDS)}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r} is invalid: must be an integer >= 0")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} is invalid: must be an integer >= 0")
    if not isinstance(tile_size, int) or tile_size < 16 or tile_size % 16:
        raise ValueError(f"tile_size={tile_size!r} is invalid: must be a positive multiple of 16")
    if not isinstance(level_downsample, int) or level_downsample < 2:
        raise ValueError(
            f"level_downsample={level_downsample!r} is invalid: must be an integer >= 2"
        )
    if not isinstance(jpeg_quality, int) or not 1 <= jpeg_quality <= 100:
        raise ValueError(
            f"jpeg_quality={jpeg_quality!r} is invalid: must be an integer in [1, 100]"
        )
    spec = dataclasses.replace(spec or SlideSpec(), **spec_fields)
    writer = {
        "tile_size": tile_size,
        "level_downsample": level_downsample,
        "jpeg_quality": jpeg_quality,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [_make_one(out, seed, i, spec, writer) for i in range(n)]


def load_demo_slide(path: str | os.PathLike) -> DemoSlide:
    """Load a demo slide from its JSON sidecar or its SVS path.

    Raises:
        FileNotFoundError: When the sidecar is missing (the slide is not a complete demo slide).
    """
    path = Path(path)
    metadata_path = path if path.suffix == ".json" else path.with_suffix(".json")
    if not metadata_path.is_file():
        raise FileNotFoundError(f"{path}: no demo slide sidecar {metadata_path.name} beside it")
    meta = json.loads(metadata_path.read_text())
    folder = metadata_path.parent
    files = meta["files"]
    return DemoSlide(
        slide_path=folder / files["slide"],
        nuclei_path=folder / files["nuclei"],
        regions_path=folder / files["regions"],
        metadata_path=metadata_path,
        seed=meta["seed"],
        index=meta["index"],
        width=meta["width"],
        height=meta["height"],
        mpp=meta["mpp"],
        magnification=meta["magnification"],
        class_names=tuple(meta["class_names"]),
        n_nuclei=meta["counts"]["nuclei"],
    )


def read_truth(
    source: DemoSlide | str | os.PathLike,
    x: int,
    y: int,
    width: int,
    height: int,
    *,
    kind: TruthKind = "nuclei",
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Read a crop of a demo slide's ground truth, aligned with ``read_region``.

    Coordinates are level-0 pixels, as in OpenSlide's ``read_region``. To match a patch
    read at a lower magnification (``P`` pixels at 20x from a 40x slide cover ``2P``
    level-0 pixels), pass the level-0 extent and ``size=(P, P)``: each output pixel takes
    the label of the level-0 pixel under its centre (nearest neighbour), so ids stay ids.

    Args:
        source: A :class:`DemoSlide`, or the path of its SVS or JSON sidecar.
        x: Left edge in level-0 pixels.
        y: Top edge in level-0 pixels.
        width: Width in level-0 pixels.
        height: Height in level-0 pixels.
        kind: ``"nuclei"`` for the instance mask (uint32, 0 = background, each nucleus
            its own id) or ``"regions"`` for the class mask (uint8, 0 = no tissue, k =
            ``class_names[k - 1]``).
        size: Output (width, height); None keeps the level-0 size.

    Returns:
        A (height, width) array; outside the slide it is 0.
    """
    slide = source if isinstance(source, DemoSlide) else load_demo_slide(source)
    if kind not in ("nuclei", "regions"):
        raise ValueError(f"kind={kind!r} is invalid: must be 'nuclei' or 'regions'")
    path = slide.nuclei_path if kind == "nuclei" else slide.regions_path
    crop = read_tiff_region(path, x, y, width, height)
    if size is None or tuple(size) == (width, height):
        return crop
    out_w, out_h = size
    if out_w <= 0 or out_h <= 0:
        raise ValueError(f"size={size!r} is invalid: both sides must be > 0")
    rows = ((np.arange(out_h) + 0.5) * height / out_h).astype(np.int64)
    cols = ((np.arange(out_w) + 0.5) * width / out_w).astype(np.int64)
    return crop[rows[:, None], cols[None, :]]


def _make_one(out: Path, seed: int, index: int, spec: SlideSpec, writer: dict) -> DemoSlide:
    stem = f"demo-s{seed}-{index:03d}"
    files = {
        "slide": f"{stem}.svs",
        "nuclei": f"{stem}.nuclei.tif",
        "regions": f"{stem}.regions.tif",
    }
    metadata_path = out / f"{stem}.json"
    params = _jsonable(
        {
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "index": index,
            "spec": dataclasses.asdict(spec),
            "writer": writer,
        }
    )
    if metadata_path.is_file() and all((out / f).is_file() for f in files.values()):
        try:
            if json.loads(metadata_path.read_text()).get("params") == params:
                logger.info("demo slide %s is up to date, skipped", stem)
                return load_demo_slide(metadata_path)
        except json.JSONDecodeError:
            pass  # a damaged sidecar: draw the slide again
    started = time.perf_counter()
    drawn = synthesize_slide(spec, np.random.SeedSequence([seed, index]))
    levels = write_svs(
        out / files["slide"],
        drawn.image,
        mpp=spec.mpp,
        magnification=spec.objective_power,
        tile_size=writer["tile_size"],
        level_downsample=writer["level_downsample"],
        jpeg_quality=writer["jpeg_quality"],
    )
    write_label_tiff(out / files["nuclei"], drawn.nuclei, mpp=spec.mpp)
    write_label_tiff(out / files["regions"], drawn.regions, mpp=spec.mpp)
    area = np.bincount(drawn.regions.ravel(), minlength=len(spec.classes) + 1) / drawn.regions.size
    per_class = np.bincount(drawn.nucleus_class[1:], minlength=len(spec.classes) + 1)
    meta = {
        "params": params,
        "files": files,
        "seed": seed,
        "index": index,
        "width": spec.width,
        "height": spec.height,
        "mpp": spec.mpp,
        "magnification": spec.objective_power,
        "level_dimensions": levels,
        "class_names": list(spec.class_names),
        "counts": {
            "nuclei": drawn.n_nuclei,
            "nuclei_per_class": {
                c: int(per_class[k]) for k, c in enumerate(spec.class_names, start=1)
            },
            "tissue_fraction": float(1 - area[0]),
            "area_fraction_per_class": {
                c: float(area[k]) for k, c in enumerate(spec.class_names, start=1)
            },
        },
    }
    with _atomic(metadata_path) as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=2) + "\n")
    logger.info(
        "demo slide %s drawn in %.1f s: %d nuclei",
        stem,
        time.perf_counter() - started,
        drawn.n_nuclei,
    )
    return load_demo_slide(metadata_path)


def _jsonable(value: object) -> object:
    """The value as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value))
