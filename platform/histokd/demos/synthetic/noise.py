"""Seeded random fields that give synthetic tissue its texture.

Everything here is a pure function of a :class:`numpy.random.Generator` and a shape, so a
slide drawn twice from the same seed is identical to the last bit. Fields are drawn on a
coarse lattice and resized with Pillow, which is much cheaper than filtering at full size.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["fibre_field", "fractal_noise", "resize_field", "smooth_noise"]


def resize_field(field: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D float field to ``shape`` (rows, columns) with bicubic interpolation."""
    if field.shape == tuple(shape):
        return field.astype(np.float32, copy=False)
    image = Image.fromarray(np.ascontiguousarray(field, dtype=np.float32), mode="F")
    return np.array(image.resize((shape[1], shape[0]), Image.Resampling.BICUBIC))


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-variance noise whose features are about ``scale`` pixels across.

    Args:
        rng: Source of randomness.
        shape: Output (rows, columns).
        scale: Correlation length in output pixels; values below 1 give white noise.

    Returns:
        A float32 array of ``shape``.
    """
    h, w = shape
    if scale <= 1:
        return rng.standard_normal(shape, dtype=np.float32)
    # A lattice with one node per `scale / 2` pixels, smoothed once so that bicubic
    # interpolation does not show the lattice as diamonds.
    gh = max(4, int(np.ceil(2 * h / scale)) + 2)
    gw = max(4, int(np.ceil(2 * w / scale)) + 2)
    lattice = ndimage.gaussian_filter(rng.standard_normal((gh, gw), dtype=np.float32), 1.0)
    field = resize_field(lattice, shape)
    return _standardise(field)


def fractal_noise(
    rng: np.random.Generator,
    shape: tuple[int, int],
    scale: float,
    octaves: int = 3,
    persistence: float = 0.5,
) -> np.ndarray:
    """Sum of :func:`smooth_noise` octaves, each half the scale and ``persistence`` the weight.

    Returns:
        A zero-mean, unit-variance float32 array of ``shape``.
    """
    total = np.zeros(shape, np.float32)
    weight = 1.0
    for octave in range(octaves):
        total += weight * smooth_noise(rng, shape, scale / 2**octave)
        weight *= persistence
    return _standardise(total)


def fibre_field(
    rng: np.random.Generator,
    shape: tuple[int, int],
    width: float,
    length: float,
    domain_scale: float,
    orientations: int = 6,
) -> tuple[np.ndarray, np.ndarray]:
    """Streaky noise like collagen bundles whose direction bends smoothly across the field.

    White noise is filtered in the Fourier domain with an anisotropic Gaussian (``length``
    along the fibre, ``width`` across it) for a few evenly spaced directions. A smooth
    direction field then blends, at each pixel, the filtered fields whose direction is
    close to the local one, so fibres bend over about ``domain_scale`` pixels instead of
    crossing each other.

    Args:
        rng: Source of randomness.
        shape: Output (rows, columns).
        width: Gaussian sigma across a fibre, in pixels.
        length: Gaussian sigma along a fibre, in pixels.
        domain_scale: Distance over which the direction turns by about a radian, in pixels.
        orientations: Number of directions blended.

    Returns:
        The zero-mean, unit-variance field and the local fibre direction in radians
        (measured from the x axis towards increasing rows), both float32 arrays of ``shape``.
    """
    h, w = shape
    spectrum = np.fft.rfft2(rng.standard_normal(shape, dtype=np.float32))
    ky = np.fft.fftfreq(h).astype(np.float32)[:, None]
    kx = np.fft.rfftfreq(w).astype(np.float32)[None, :]
    direction = rng.uniform(0, np.pi) + smooth_noise(rng, shape, domain_scale)
    angles = np.arange(orientations) * np.pi / orientations
    # von Mises weights on the doubled angle (a fibre has no head or tail).
    weights = np.stack([np.exp(3.0 * (np.cos(2 * (direction - a)) - 1)) for a in angles])
    weights /= weights.sum(axis=0, keepdims=True)
    field = np.zeros(shape, np.float32)
    for angle, weight in zip(angles, weights, strict=True):
        along = kx * np.cos(angle) + ky * np.sin(angle)
        across = -kx * np.sin(angle) + ky * np.cos(angle)
        gain = np.exp(-2 * np.pi**2 * (along**2 * length**2 + across**2 * width**2))
        oriented = np.fft.irfft2(spectrum * gain, s=shape).astype(np.float32)
        field += weight * _standardise(oriented)
    return _standardise(field), np.mod(direction, np.pi).astype(np.float32)


def _standardise(field: np.ndarray) -> np.ndarray:
    """Shift and scale a field in place to zero mean and unit variance."""
    # Statistics of a 1-in-16 subsample: as good for smooth fields, and 16 times cheaper.
    sample = field[::4, ::4]
    field -= sample.mean()
    std = sample.std()
    if std > 0:
        field /= std
    return field
