"""A whole synthetic H&E slide in memory: image, nuclei instances and tissue regions.

The image is rendered with the Beer-Lambert model that colour deconvolution inverts
(Ruifrok and Johnston, 2001): every pixel holds a haematoxylin and an eosin concentration,
its optical density is their mix of the two stains' absorbance vectors, and its intensity
is ``255 * 10 ** -OD``. Haematoxylin sits in the nuclei (and faintly in cytoplasm); eosin
in the stroma and cytoplasm, streaky where the class is fibrous. The stains vary a little
from slide to slide and over each slide, as section thickness and staining do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from skimage import segmentation

from histokd.demos.synthetic.noise import fibre_field, resize_field, smooth_noise
from histokd.demos.synthetic.nuclei import draw_nuclei
from histokd.demos.synthetic.tissue import DEFAULT_CLASSES, TissueClass, draw_layout

__all__ = ["SlideSpec", "SyntheticSlide", "synthesize_slide"]

# Optical density per unit concentration (R, G, B). Haematoxylin is Ruifrok's vector (as in
# skimage's `hed_from_rgb`); eosin absorbs more blue than Ruifrok's pure eosin, which is
# what scanned H&E shows (a pink, not magenta, stroma; compare Macenko's reference matrix).
_HEMATOXYLIN = np.array([0.55, 0.78, 0.30])
_EOSIN = np.array([0.10, 0.85, 0.36])
# Bare glass: about 249 in every channel, so background patches fail the RCKD mean-intensity
# rule (kept only if the mean is in [50, 245]) even after JPEG and noise.
_GLASS_OD = np.array([0.0045, 0.0050, 0.0040])


@dataclass(frozen=True)
class SlideSpec:
    """What to draw: size, scan resolution, tissue amount and classes.

    Attributes:
        width: Level-0 width in pixels.
        height: Level-0 height in pixels.
        mpp: Micrometres per level-0 pixel (0.5 is a 20x scan, 0.25 a 40x scan).
        magnification: Objective power written into the slide; None means 10 / mpp
            (20x at 0.5 um/px, 40x at 0.25 um/px). See :attr:`objective_power`.
        tissue_fraction: Fraction of the slide inside the tissue outline (the rest is glass).
        lumen_fraction: Fraction of the outline left white as lumens and fat.
        region_size_um: Typical diameter of one tissue-class region.
        classes: The tissue classes; region mask value k is ``classes[k - 1]``.
        class_weights: Relative share of the class regions each class gets, one weight per
            class; None (the default) deals them out evenly. Weights make a slide with a
            dominant class, e.g. for slide-level labels.
        stain_jitter: Relative slide-to-slide variation of stain strength and hue.
        blur_um: Gaussian blur sigma of the optics, in micrometres.
        noise: Standard deviation of sensor noise, in 8-bit grey levels.
    """

    width: int = 4096
    height: int = 4096
    mpp: float = 0.5
    magnification: float | None = None
    tissue_fraction: float = 0.6
    lumen_fraction: float = 0.03
    region_size_um: float = 500.0
    classes: tuple[TissueClass, ...] = field(default=DEFAULT_CLASSES)
    class_weights: tuple[float, ...] | None = None
    stain_jitter: float = 0.08
    blur_um: float = 0.5
    noise: float = 2.0

    def __post_init__(self) -> None:
        """Validate every field and fill in the magnification."""
        for name in ("width", "height"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or not 16 <= value <= 200_000:
                raise ValueError(
                    f"SlideSpec.{name}={value!r} is invalid: an integer in [16, 200000]"
                )
        _require(0.05 <= self.mpp <= 20, "mpp", self.mpp, "micrometres per pixel in [0.05, 20]")
        if self.magnification is not None:
            _require(
                0 < self.magnification <= 200,
                "magnification",
                self.magnification,
                "in (0, 200] or None",
            )
        _require(
            0 <= self.tissue_fraction <= 0.95,
            "tissue_fraction",
            self.tissue_fraction,
            "in [0, 0.95]",
        )
        _require(
            0 <= self.lumen_fraction <= 0.5, "lumen_fraction", self.lumen_fraction, "in [0, 0.5]"
        )
        _require(self.region_size_um > 0, "region_size_um", self.region_size_um, "> 0")
        _require(1 <= len(self.classes) <= 255, "classes", len(self.classes), "1 to 255 classes")
        names = [c.name for c in self.classes]
        _require(len(set(names)) == len(names), "classes", names, "distinct class names")
        if self.class_weights is not None:
            object.__setattr__(
                self, "class_weights", tuple(float(w) for w in self.class_weights)
            )  # frozen
            _require(
                len(self.class_weights) == len(self.classes) and min(self.class_weights) >= 0 and sum(self.class_weights) > 0,
                "class_weights", self.class_weights, f"{len(self.classes)} non-negative weights, not all 0, or None",
            )  # fmt: skip
        _require(0 <= self.stain_jitter <= 0.5, "stain_jitter", self.stain_jitter, "in [0, 0.5]")
        _require(0 <= self.blur_um <= 5, "blur_um", self.blur_um, "in [0, 5]")
        _require(0 <= self.noise <= 50, "noise", self.noise, "in [0, 50]")

    @property
    def objective_power(self) -> float:
        """The magnification written into the slide: ``magnification``, else 10 / mpp."""
        if self.magnification is not None:
            return float(self.magnification)
        return round(10.0 / self.mpp, 6)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in mask order (mask value k is ``class_names[k - 1]``)."""
        return tuple(c.name for c in self.classes)


@dataclass(frozen=True)
class SyntheticSlide:
    """A drawn slide at level 0.

    Attributes:
        image: RGB uint8 image, (height, width, 3).
        nuclei: uint32 instance labels, 0 outside nuclei, 1..n inside.
        regions: uint8 class map, 0 where there is no tissue, k for ``classes[k - 1]``.
        nucleus_class: uint8 class id of each nucleus (index = label; entry 0 unused).
    """

    image: np.ndarray
    nuclei: np.ndarray
    regions: np.ndarray
    nucleus_class: np.ndarray

    @property
    def n_nuclei(self) -> int:
        """Number of nuclei drawn."""
        return len(self.nucleus_class) - 1


def synthesize_slide(
    spec: SlideSpec, seed: int | Sequence[int] | np.random.SeedSequence
) -> SyntheticSlide:
    """Draw one slide; the same spec and seed give byte-identical arrays.

    Args:
        spec: What to draw.
        seed: Anything :func:`numpy.random.default_rng` accepts.

    Returns:
        The image and its ground truth.
    """
    rng = np.random.default_rng(seed)
    shape = (spec.height, spec.width)
    mpp = spec.mpp
    layout = draw_layout(
        rng,
        shape,
        mpp=mpp,
        n_classes=len(spec.classes),
        tissue_fraction=spec.tissue_fraction,
        lumen_fraction=spec.lumen_fraction,
        region_size_um=spec.region_size_um,
        class_weights=spec.class_weights,
    )
    # Background texture is smooth at the scale of a pixel, so it is drawn at half size.
    half = ((shape[0] + 1) // 2, (shape[1] + 1) // 2)
    fibres, direction = fibre_field(
        rng, half, width=1.2 / (2 * mpp), length=14.0 / (2 * mpp), domain_scale=150 / (2 * mpp)
    )
    nuclei = draw_nuclei(rng, layout.regions, layout.tissue, spec.classes, mpp, direction)
    borders = None
    if any(c.cell_borders for c in spec.classes):
        borders = _cell_borders(nuclei.labels[::2, ::2], 10.0 / (2 * mpp))
    eosin_half, tint_half = _background_stains(rng, layout.regions[::2, ::2], fibres, borders, spec)
    eosin = resize_field(eosin_half, shape)
    hematoxylin = resize_field(tint_half, shape)
    inside = nuclei.labels > 0
    hematoxylin[inside] = nuclei.hematoxylin[inside]
    eosin[inside] *= 0.45  # nuclei take up little eosin
    sigma = spec.blur_um / mpp
    if sigma > 0:
        hematoxylin = ndimage.gaussian_filter(hematoxylin, sigma)
    image = _beer_lambert(rng, hematoxylin, eosin, spec)
    return SyntheticSlide(image, nuclei.labels, layout.regions, nuclei.nucleus_class)


def _cell_borders(labels: np.ndarray, radius: float) -> np.ndarray:
    """Soft lines where the cells around neighbouring nuclei meet (a Voronoi diagram)."""
    cells = segmentation.expand_labels(labels, distance=radius)
    lines = segmentation.find_boundaries(cells, mode="inner") & (labels == 0)
    return ndimage.gaussian_filter(lines.astype(np.float32), 0.8)


def _background_stains(
    rng: np.random.Generator,
    regions: np.ndarray,
    fibres: np.ndarray,
    borders: np.ndarray | None,
    spec: SlideSpec,
) -> tuple[np.ndarray, np.ndarray]:
    """Eosin and cytoplasmic haematoxylin between nuclei, at the resolution of ``regions``."""
    mpp = 2 * spec.mpp
    shape = regions.shape
    mottle = smooth_noise(rng, shape, 3.0 / mpp)
    mottle += 0.5 * smooth_noise(rng, shape, 12.0 / mpp)
    thickness = 1.0 + 0.12 * smooth_noise(rng, shape, 500.0 / mpp)
    # Collagen: bundles with thin pale clefts between them.
    fibrous = np.clip(0.85 + 0.35 * fibres, 0.15, 1.4)
    mottled = 1.0 + 0.18 * mottle
    eosin = np.zeros(shape, np.float32)
    tint = np.zeros(shape, np.float32)
    total = np.zeros(shape, np.float32)
    blend = 15.0 / mpp  # class styles fade into each other over ~15 um
    step = max(1, int(blend / 4))  # blurring that much is done on a coarser grid
    for k, tissue_class in enumerate(spec.classes, start=1):
        weight = ndimage.gaussian_filter(
            (regions[::step, ::step] == k).astype(np.float32), blend / step
        )
        weight = np.clip(resize_field(weight, shape), 0, 1)
        texture = tissue_class.fibre * fibrous + (1 - tissue_class.fibre) * mottled
        if tissue_class.cell_borders and borders is not None:
            texture = texture + tissue_class.cell_borders * borders
        eosin += weight * tissue_class.eosin * texture
        tint += weight * tissue_class.cytoplasm_hematoxylin * mottled
        total += weight
    tissue = ndimage.gaussian_filter((regions > 0).astype(np.float32), 0.7)
    scale = tissue * thickness / np.maximum(total, 1e-3)
    return eosin * scale, tint * scale


def _beer_lambert(
    rng: np.random.Generator, hematoxylin: np.ndarray, eosin: np.ndarray, spec: SlideSpec
) -> np.ndarray:
    """RGB uint8 from stain concentrations, with per-slide stain variation and noise."""
    jitter = spec.stain_jitter
    h_vec = _HEMATOXYLIN * (1 + jitter * rng.uniform(-1, 1, 3)) * (1 + jitter * rng.uniform(-1, 1))
    e_vec = _EOSIN * (1 + jitter * rng.uniform(-1, 1, 3)) * (1 + jitter * rng.uniform(-1, 1))
    noise = rng.standard_normal(hematoxylin.shape, dtype=np.float32)
    noise *= spec.noise
    image = np.empty((*hematoxylin.shape, 3), np.uint8)
    ln10 = np.float32(np.log(10))
    for c in range(3):
        density = hematoxylin * np.float32(h_vec[c])
        density += eosin * np.float32(e_vec[c])
        density += np.float32(_GLASS_OD[c])
        density *= -ln10
        channel = np.exp(density, out=density)
        channel *= 255
        channel += noise
        channel += 0.5
        image[..., c] = np.clip(channel, 0, 255)
    return image


def _require(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"SlideSpec.{name}={value!r} is invalid: must be {allowed}")
