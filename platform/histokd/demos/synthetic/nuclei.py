"""Nuclei: where they are, what shape they have, and how much haematoxylin they hold.

Each nucleus is an ellipse whose radius wobbles with a few low harmonics of the polar
angle: ``rho <= 1 + sum_k a_k cos(k phi + p_k)`` in the ellipse's own coordinates. That
set is star-convex around the centre (a line through the centre meets the border once),
which is the shape family StarDist predicts, so a StarDist model can fit the ground truth
exactly. Nuclei are drawn one after another into an instance label map; a candidate that
would cover more than a small part of an earlier nucleus, or would leave the tissue, is
dropped, so instances touch but never share a pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histokd.demos.synthetic.noise import resize_field, smooth_noise
from histokd.demos.synthetic.tissue import TissueClass

__all__ = ["NucleiMaps", "draw_nuclei"]

_HARMONICS = np.arange(2, 6, dtype=np.float32)  # k = 2..5: ovals, triangles, dents
_MAX_OVERLAP = 0.08  # fraction of a candidate that may lie on earlier nuclei
_DENSITY_VARIATION = 0.45  # std of the smooth local modulation of nuclei density
_GRAIN_POOL = 512  # side of the chromatin noise pool; a nucleus box is at most half of it


@dataclass(frozen=True)
class NucleiMaps:
    """The drawn nuclei at level 0.

    Attributes:
        labels: uint32 instance map, 0 outside nuclei, 1..n inside.
        hematoxylin: float32 haematoxylin concentration, 0 outside nuclei.
        nucleus_class: uint8 array of length n + 1: class id (1-based) of each nucleus,
            with entry 0 for the background.
    """

    labels: np.ndarray
    hematoxylin: np.ndarray
    nucleus_class: np.ndarray


def draw_nuclei(
    rng: np.random.Generator,
    regions: np.ndarray,
    tissue: np.ndarray,
    classes: tuple[TissueClass, ...],
    mpp: float,
    fibre_direction: np.ndarray | None = None,
) -> NucleiMaps:
    """Scatter and draw the nuclei of every class region.

    Args:
        rng: Source of randomness.
        regions: Level-0 class map (0 = no tissue, k = ``classes[k - 1]``).
        tissue: Level-0 tissue mask; nuclei lie entirely inside it.
        classes: The tissue classes.
        mpp: Micrometres per level-0 pixel.
        fibre_direction: Local fibre direction in radians, at any resolution that divides
            the level-0 shape (used by classes with ``align_to_fibres``).

    Returns:
        The label map, the haematoxylin map and the class of every nucleus.
    """
    shape = regions.shape
    candidates = _candidates(rng, regions, classes, mpp)
    n = len(candidates)
    order = rng.permutation(n)  # one random order over all classes: no class has priority
    candidates = candidates[order]
    centre_y = candidates[:, 0] + rng.random(n)
    centre_x = candidates[:, 1] + rng.random(n)
    klass = candidates[:, 2].astype(np.int64)

    length = _per_class_uniform(rng, klass, [c.length_um for c in classes]) / mpp
    aspect = _per_class_uniform(rng, klass, [c.aspect for c in classes])
    darkness = _per_class_uniform(rng, klass, [c.hematoxylin for c in classes])
    irregular = np.array([c.irregularity for c in classes], np.float32)[klass - 1]
    vesicular = rng.random(n) < np.array([c.vesicular for c in classes])[klass - 1]
    angle = rng.uniform(0, np.pi, n)
    aligned = np.array([c.align_to_fibres for c in classes])[klass - 1]
    if fibre_direction is not None and aligned.any():
        fy = shape[0] / fibre_direction.shape[0]
        fx = shape[1] / fibre_direction.shape[1]
        iy = np.minimum((centre_y / fy).astype(np.int64), fibre_direction.shape[0] - 1)
        ix = np.minimum((centre_x / fx).astype(np.int64), fibre_direction.shape[1] - 1)
        angle = np.where(aligned, fibre_direction[iy, ix] + rng.normal(0, 0.15, n), angle)
    # Harmonic amplitudes fall off with order, so outlines wobble rather than zig-zag.
    amplitude = irregular[:, None] * rng.uniform(-1, 1, (n, len(_HARMONICS))) / (_HARMONICS - 1)
    phase = rng.uniform(0, 2 * np.pi, (n, len(_HARMONICS)))
    nucleolus = rng.uniform(-0.35, 0.35, (n, 2))
    # Chromatin grain: windows of one pool of white noise (the later blur makes granules).
    # Granules are about 0.5 um whatever the scan: coarser noise, upsampled, at 40x.
    coarse = max(8, int(round(_GRAIN_POOL * min(1.0, mpp / 0.5))))
    grain_pool = rng.standard_normal((coarse, coarse), dtype=np.float32)
    if coarse != _GRAIN_POOL:
        grain_pool = resize_field(grain_pool, (_GRAIN_POOL, _GRAIN_POOL))
        grain_pool /= grain_pool.std()
    grain_at = rng.integers(0, _GRAIN_POOL // 2, (n, 2))

    labels = np.zeros(shape, np.uint32)
    hematoxylin = np.zeros(shape, np.float32)
    nucleus_class = [0]
    nucleolus_sigma = 0.6 / mpp
    for i in range(n):
        a = 0.5 * length[i]
        b = a / aspect[i]
        reach = int(np.ceil(a * (1 + np.abs(amplitude[i]).sum()))) + 1
        cy, cx = centre_y[i], centre_x[i]
        y0, x0 = max(int(cy) - reach, 0), max(int(cx) - reach, 0)
        y1, x1 = min(int(cy) + reach + 1, shape[0]), min(int(cx) + reach + 1, shape[1])
        dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]
        dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]
        cos, sin = np.cos(angle[i]), np.sin(angle[i])
        u = (dx * cos + dy * sin) / a
        v = (dy * cos - dx * sin) / b
        rho = np.hypot(u, v)
        phi = np.arctan2(v, u)
        border = 1 + np.cos(phi[..., None] * _HARMONICS + phase[i]) @ amplitude[i]
        inside = rho <= border
        area = np.count_nonzero(inside)
        if area < 6 or not tissue[y0:y1, x0:x1][inside].all():
            continue
        label_box = labels[y0:y1, x0:x1]
        free = inside & (label_box == 0)
        if area - np.count_nonzero(free) > _MAX_OVERLAP * area:
            continue
        nucleus_id = len(nucleus_class)
        label_box[free] = nucleus_id
        nucleus_class.append(klass[i])

        depth = rho / border  # 0 at the centre, 1 on the border
        gy, gx = grain_at[i]
        grain = grain_pool[gy : gy + depth.shape[0], gx : gx + depth.shape[1]]
        if grain.shape != depth.shape:  # a nucleus larger than half the pool
            grain = np.resize(grain_pool, depth.shape)
        if vesicular[i]:
            # Open chromatin: pale centre, chromatin on the membrane, one nucleolus.
            profile = 0.4 + 0.8 * depth**6 + 0.35 * grain
            ny = (nucleolus[i, 0] * a * sin + nucleolus[i, 1] * b * cos) - dy
            nx = (nucleolus[i, 0] * a * cos - nucleolus[i, 1] * b * sin) - dx
            profile += 0.9 * np.exp(-(ny**2 + nx**2) / (2 * nucleolus_sigma**2))
        else:
            profile = 0.9 + 0.15 * depth**2 + 0.15 * grain
        hematoxylin[y0:y1, x0:x1][free] = darkness[i] * np.maximum(profile[free], 0.1)
    return NucleiMaps(labels, hematoxylin, np.asarray(nucleus_class, np.uint8))


def _candidates(
    rng: np.random.Generator, regions: np.ndarray, classes: tuple[TissueClass, ...], mpp: float
) -> np.ndarray:
    """Candidate centres as rows of (y, x, class id), thinned by a smooth density field."""
    h, w = regions.shape
    # Thinning keeps a candidate with probability m(x, y) in [0, 1] (mean about 0.5),
    # so twice the target count is drawn first.
    step = max(1, int(np.ceil(max(h, w) / 1024)))
    modulation = smooth_noise(
        rng, (int(np.ceil(h / step)), int(np.ceil(w / step))), 150 / mpp / step
    )
    modulation = np.clip(1 + _DENSITY_VARIATION * modulation, 0.05, 2.0) / 2.0
    rows = []
    for k, tissue_class in enumerate(classes, start=1):
        where = np.flatnonzero(regions == k)
        expected = tissue_class.nuclei_per_mm2 * where.size * (mpp / 1000) ** 2
        count = rng.poisson(2 * expected)
        if where.size == 0 or count == 0:
            continue
        flat = where[rng.integers(0, where.size, count)]
        y, x = np.divmod(flat, w)
        keep = rng.random(count) < modulation[y // step, x // step]
        rows.append(np.stack([y[keep], x[keep], np.full(keep.sum(), k)], axis=1))
    if not rows:
        return np.zeros((0, 3), np.int64)
    return np.concatenate(rows)


def _per_class_uniform(
    rng: np.random.Generator, klass: np.ndarray, ranges: list[tuple[float, float]]
) -> np.ndarray:
    """One uniform draw per nucleus from the range of its class."""
    bounds = np.asarray(ranges, np.float64)[klass - 1]
    return rng.uniform(bounds[:, 0], bounds[:, 1]).astype(np.float32)
