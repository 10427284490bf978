"""Tissue classes and the large-scale layout of a synthetic slide.

A slide is a tissue section of irregular outline on white glass, with a few white holes
(lumens, fat) inside it, divided into large regions of a handful of tissue classes. The
classes differ in what a pathologist (and a classifier) sees: how dense, how large, how
elongated and how dark their nuclei are, and how their background stains. The region
mask is the ground truth for the demo's tissue classification and region segmentation
tasks; the nuclei drawn into it (:mod:`histokd.demos.synthetic.nuclei`) are the ground truth
for the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histokd.demos.synthetic.noise import fractal_noise, resize_field, smooth_noise

__all__ = ["DEFAULT_CLASSES", "TissueClass", "TissueLayout", "draw_layout"]


def _check(owner: str, field: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"TissueClass {owner!r}: {field}={value!r} is outside [{low}, {high}]")


def _check_range(
    owner: str, field: str, value: tuple[float, float], low: float, high: float
) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ValueError(
            f"TissueClass {owner!r}: {field}={value!r} must be (min, max) with "
            f"{low} <= min <= max <= {high}"
        )


@dataclass(frozen=True)
class TissueClass:
    """How one tissue class looks: its nuclei and the background they sit in.

    Sizes are physical, so a class looks the same at 20x and at 40x.

    Attributes:
        name: Class name, as written into the slide's metadata.
        nuclei_per_mm2: Mean number of nuclei per square millimetre of the class's area
            (before overlapping candidates are dropped, which thins the densest classes).
        length_um: Range of the nucleus's long axis, in micrometres.
        aspect: Range of long axis / short axis (1 = round).
        irregularity: Amplitude of the random wobble of the outline (0 = an exact ellipse).
            Shapes stay star-convex whatever the value, as StarDist assumes.
        hematoxylin: Range of the per-nucleus haematoxylin concentration (darkness).
        vesicular: Fraction of nuclei with open chromatin: a pale centre, a dark rim and
            a nucleolus, as in many carcinoma cells.
        eosin: Eosin concentration of the background between nuclei.
        cytoplasm_hematoxylin: Haematoxylin tint of that background (basophilic cytoplasm).
        fibre: Weight in [0, 1] of the streaky collagen texture in the background.
        align_to_fibres: Orient nuclei along the local fibre direction (spindle cells).
        cell_borders: Strength of the eosin lines drawn between neighbouring cells
            (epithelium shows its cell membranes; stroma and lymphocytes do not).
    """

    name: str
    nuclei_per_mm2: float
    length_um: tuple[float, float]
    aspect: tuple[float, float]
    irregularity: float
    hematoxylin: tuple[float, float]
    vesicular: float = 0.0
    eosin: float = 0.4
    cytoplasm_hematoxylin: float = 0.03
    fibre: float = 0.0
    align_to_fibres: bool = False
    cell_borders: float = 0.0

    def __post_init__(self) -> None:
        """Reject values that cannot be drawn."""
        _check(self.name, "nuclei_per_mm2", self.nuclei_per_mm2, 0, 50_000)
        _check_range(self.name, "length_um", self.length_um, 1.0, 100.0)
        _check_range(self.name, "aspect", self.aspect, 1.0, 10.0)
        _check(self.name, "irregularity", self.irregularity, 0.0, 0.5)
        _check_range(self.name, "hematoxylin", self.hematoxylin, 0.05, 5.0)
        _check(self.name, "vesicular", self.vesicular, 0.0, 1.0)
        _check(self.name, "eosin", self.eosin, 0.0, 3.0)
        _check(self.name, "cytoplasm_hematoxylin", self.cytoplasm_hematoxylin, 0.0, 3.0)
        _check(self.name, "fibre", self.fibre, 0.0, 1.0)
        _check(self.name, "cell_borders", self.cell_borders, 0.0, 3.0)


# Nuclear sizes follow textbook histology at 0.5 um/px (20x): fibroblasts are spindles of
# about 10-18 x 3-6 um, carcinoma nuclei 9-16 um and pleomorphic, lymphocytes 6-8 um.
DEFAULT_CLASSES: tuple[TissueClass, ...] = (
    TissueClass(
        name="stroma",
        nuclei_per_mm2=900,
        length_um=(11.0, 18.0),
        aspect=(2.6, 4.0),
        irregularity=0.08,
        hematoxylin=(0.75, 1.05),
        eosin=0.48,
        cytoplasm_hematoxylin=0.02,
        fibre=1.0,
        align_to_fibres=True,
    ),
    TissueClass(
        name="tumor",
        nuclei_per_mm2=8000,
        length_um=(9.0, 16.0),
        aspect=(1.0, 1.6),
        irregularity=0.16,
        hematoxylin=(0.6, 1.0),
        vesicular=0.7,
        eosin=0.36,
        cytoplasm_hematoxylin=0.10,
        fibre=0.0,
        cell_borders=0.6,
    ),
    TissueClass(
        name="lymphocyte",
        nuclei_per_mm2=9000,
        length_um=(6.0, 8.5),
        aspect=(1.0, 1.3),
        irregularity=0.07,
        hematoxylin=(1.15, 1.5),
        eosin=0.28,
        cytoplasm_hematoxylin=0.05,
        fibre=0.15,
    ),
)


@dataclass(frozen=True)
class TissueLayout:
    """Where the tissue is and which class each part belongs to, at level 0.

    Attributes:
        tissue: Boolean mask of tissue (False on glass and inside lumens).
        regions: uint8 class map: 0 where there is no tissue, else 1 + class index.
    """

    tissue: np.ndarray
    regions: np.ndarray


def draw_layout(
    rng: np.random.Generator,
    shape: tuple[int, int],
    *,
    mpp: float,
    n_classes: int,
    tissue_fraction: float,
    lumen_fraction: float,
    region_size_um: float,
    class_weights: tuple[float, ...] | None = None,
) -> TissueLayout:
    """Draw a tissue outline, lumens and class regions.

    Args:
        rng: Source of randomness.
        shape: Level-0 (rows, columns).
        mpp: Micrometres per level-0 pixel.
        n_classes: Number of tissue classes; every class gets at least one region.
        tissue_fraction: Fraction of the slide inside the tissue outline.
        lumen_fraction: Fraction of the outline that is left white as lumens.
        region_size_um: Typical diameter of one class region.
        class_weights: Relative share of the regions per class; None: dealt out evenly.

    Returns:
        The layout at level 0.
    """
    h, w = shape
    # Work out the shapes on a coarse grid (about 512 px on the long side) and threshold
    # bicubically upsampled fields at full size, so that outlines are smooth curves.
    step = max(1, int(np.ceil(max(h, w) / 512)))
    coarse = (int(np.ceil(h / step)), int(np.ceil(w / step)))
    outline_field = _outline_field(rng, coarse)
    threshold = np.quantile(outline_field, 1.0 - tissue_fraction)
    outline_coarse = outline_field > threshold
    # Ragged edges and lumens are drawn on a grid of half the level-0 size. Tissue is where
    # both "inside the outline" and "not in a lumen" hold, i.e. where the smaller of the two
    # margins is positive; that one field is upsampled and thresholded at full size.
    half = ((h + 1) // 2, (w + 1) // 2)
    outline = resize_field(outline_field, half)
    outline += 0.015 * smooth_noise(rng, half, 6.0 / (2 * mpp))
    outline -= threshold
    lumen = fractal_noise(rng, half, 90.0 / (2 * mpp), octaves=2)
    inside = lumen[::4, ::4][outline[::4, ::4] > 0]
    lumen_threshold = np.quantile(inside, 1.0 - lumen_fraction) if inside.size else np.inf
    margin = np.minimum(outline, lumen_threshold - lumen)
    tissue = resize_field(margin, shape) > 0

    region_id = _region_map(
        rng, coarse, outline_coarse, step * mpp, n_classes, region_size_um, shape, class_weights
    )
    regions = np.where(tissue, region_id, 0).astype(np.uint8)
    return TissueLayout(tissue=tissue, regions=regions)


def _outline_field(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A field whose upper level set is one main blob with an irregular border."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy = (yy / max(h - 1, 1)) * 2 - 1
    xx = (xx / max(w - 1, 1)) * 2 - 1
    cy, cx = rng.uniform(-0.15, 0.15, size=2)
    angle = rng.uniform(0, np.pi)
    ay, ax = rng.uniform(0.65, 1.0, size=2)
    u = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / ax
    v = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / ay
    return -(u**2 + v**2) + 0.55 * fractal_noise(rng, shape, max(h, w) / 2.5, octaves=4)


def _region_map(
    rng: np.random.Generator,
    coarse: tuple[int, int],
    outline: np.ndarray,
    coarse_mpp: float,
    n_classes: int,
    region_size_um: float,
    shape: tuple[int, int],
    class_weights: tuple[float, ...] | None = None,
) -> np.ndarray:
    """Class id (1..n_classes) per level-0 pixel from a warped Voronoi diagram of seeds."""
    size = region_size_um / coarse_mpp  # region diameter in coarse pixels
    area = max(int(outline.sum()), 1)
    n_regions = max(n_classes, int(round(area / size**2)))
    candidates = np.argwhere(outline)
    if candidates.size == 0:
        candidates = np.argwhere(np.ones(coarse, bool))
    seeds = _spread_points(rng, candidates.astype(np.float32), n_regions, 0.6 * size)
    if class_weights is None:
        # Balanced class assignment: whole permutations first, so every class is present.
        repeats = int(np.ceil(len(seeds) / n_classes))
        classes = np.concatenate([rng.permutation(n_classes) for _ in range(repeats)])[: len(seeds)]
    else:
        p = np.asarray(class_weights, np.float64)
        classes = rng.choice(n_classes, size=len(seeds), p=p / p.sum())

    yy, xx = np.mgrid[0 : coarse[0], 0 : coarse[1]].astype(np.float32)
    yy += 0.35 * size * smooth_noise(rng, coarse, size)
    xx += 0.35 * size * smooth_noise(rng, coarse, size)
    # Borders are resolved on a grid of half the level-0 size: steps of 2 px do not show.
    half = ((shape[0] + 1) // 2, (shape[1] + 1) // 2)
    best_dist = None
    best_class = None
    for k in range(n_classes):
        members = seeds[classes == k]
        dist = np.full(coarse, np.inf, np.float32)
        for sy, sx in members:
            np.minimum(dist, np.hypot(yy - sy, xx - sx), out=dist)
        full = resize_field(dist, half)
        if best_dist is None:
            best_dist, best_class = full, np.ones(half, np.uint8)
        else:
            closer = full < best_dist
            best_dist = np.where(closer, full, best_dist)
            best_class[closer] = k + 1
    return best_class.repeat(2, axis=0).repeat(2, axis=1)[: shape[0], : shape[1]]


def _spread_points(
    rng: np.random.Generator, candidates: np.ndarray, n: int, min_distance: float
) -> np.ndarray:
    """Pick ``n`` candidate points, preferring ones at least ``min_distance`` apart."""
    order = rng.permutation(len(candidates))[:4000]
    chosen: list[np.ndarray] = []
    for distance in (min_distance, min_distance / 2, 0.0):
        for i in order:
            if len(chosen) == n:
                return np.stack(chosen)
            point = candidates[i]
            if all(np.hypot(*(point - c)) >= distance for c in chosen) and not any(
                np.array_equal(point, c) for c in chosen
            ):
                chosen.append(point)
    return np.stack(chosen)
