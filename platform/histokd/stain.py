"""Stain colour of H&E images in torch, on a batch on any device: HED colour deconvolution and
HED jitter (Tellez et al. 2019), and Macenko stain normalisation (Macenko et al. 2009).

HED space is ``skimage.color.rgb2hed``'s (Ruifrok & Johnston's stain vectors, optical density
divided by ``-log(1e-6)``), without its clipping of negative concentrations, so that
``hed_to_rgb(rgb_to_hed(x))`` is ``x`` again. HED jitter is Tellez et al. 2019, Sec. 2.2.2:
each stain's concentration ``s`` becomes ``s * a + b`` with ``a ~ U(1 - sigma, 1 + sigma)`` and
``b ~ U(-sigma, sigma)`` (``sigma`` 0.05: their "HED-light").

Macenko normalisation follows the reference implementation (Macenko et al. 2009; M. Veta's
MATLAB code, ported to numpy by schaugf/HEnorm_python and to torch by torchstain): optical
densities of tissue pixels, the plane of their two main directions, the stain vectors at the
1st and 99th percentile of the angle in that plane, each pixel's two concentrations scaled so
that their 99th percentiles match the reference's, and the image rebuilt with the reference's
stain vectors. torchstain 1.4.1 was checked and not used: it fails or gives NaN on tiles with
few tissue pixels (``kthvalue`` on an empty selection) and works on one image at a time. Here
a tile with fewer than ``min_tissue_pixels`` tissue pixels (background, fat) is left as it is.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from skimage.color import hed_from_rgb, rgb_from_hed

__all__ = [
    "DEFAULT_REFERENCE",
    "STAIN_NORMS",
    "StainReference",
    "fit_macenko",
    "hed_jitter",
    "hed_to_rgb",
    "macenko_normalize",
    "rgb_to_hed",
    "stain_normalization",
    "stain_normalizer",
]

STAIN_NORMS = ("none", "macenko")
_LOG_ADJUST = math.log(1e-6)  # skimage's scale of optical density in HED space
_HED_FROM_RGB = torch.tensor(hed_from_rgb, dtype=torch.float32)
_RGB_FROM_HED = torch.tensor(rgb_from_hed, dtype=torch.float32)


def _float01(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(255.0) if images.dtype == torch.uint8 else images.float()


def _like(out: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """``out`` in [0, 1] back in the dtype of ``images`` (uint8 rounded)."""
    if images.dtype == torch.uint8:
        return out.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return out.to(images.dtype)


def rgb_to_hed(images: torch.Tensor) -> torch.Tensor:
    """``N x 3 x H x W`` RGB (uint8, or floats in [0, 1]) -> haematoxylin, eosin, DAB
    concentrations as ``skimage.color.rgb2hed`` gives them (negative ones kept)."""
    od = torch.log(_float01(images).clamp_min(1e-6)) / _LOG_ADJUST
    return torch.einsum("nchw,cd->ndhw", od, _HED_FROM_RGB.to(od.device))


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """The inverse of `rgb_to_hed`: floats in [0, 1], ``N x 3 x H x W``."""
    od = torch.einsum("ndhw,dc->nchw", hed, _RGB_FROM_HED.to(hed.device))
    return torch.exp(od * _LOG_ADJUST).clamp_(0.0, 1.0)


def hed_jitter(images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Tellez et al. 2019's HED jitter: each stain concentration ``s -> s * scale + shift``.

    Args:
        images: ``N x 3 x H x W`` uint8, or floats in [0, 1].
        scale: ``N x 3`` factors ``a`` per image and stain (H, E, D).
        shift: ``N x 3`` offsets ``b`` per image and stain.

    Returns:
        The jittered images in the dtype of ``images``, in range.
    """
    hed = rgb_to_hed(images)
    scale = scale.to(hed.device, hed.dtype)[:, :, None, None]
    shift = shift.to(hed.device, hed.dtype)[:, :, None, None]
    return _like(hed_to_rgb(hed * scale + shift), images)


@dataclass(frozen=True)
class StainReference:
    """The target of Macenko normalisation: H and E optical-density unit vectors (the columns
    of ``stain_matrix``, ``3 x 2``, RGB rows) and the 99th percentiles of their concentrations."""

    stain_matrix: tuple[tuple[float, float], ...]
    max_concentrations: tuple[float, float]

    def as_dict(self) -> dict[str, Any]:
        """The record a model file keeps (plain values)."""
        return {"method": "macenko", "stain_matrix": [list(row) for row in self.stain_matrix],
                "max_concentrations": list(self.max_concentrations)}  # fmt: skip

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> StainReference:
        """The reference of an `as_dict` record."""
        matrix = tuple(tuple(float(v) for v in row) for row in record["stain_matrix"])
        if len(matrix) != 3 or any(len(row) != 2 for row in matrix):
            raise ValueError(f"stain_matrix={record['stain_matrix']!r}: must be 3 rows of 2 (H, E)")
        high = tuple(float(v) for v in record["max_concentrations"])
        if len(high) != 2 or not all(v > 0 for v in high):
            raise ValueError(
                f"max_concentrations={record['max_concentrations']!r}: must be 2 positive numbers"
            )
        return cls(matrix, high)  # type: ignore[arg-type]


# The reference implementation's target (Macenko's MATLAB code, HEnorm_python, torchstain).
DEFAULT_REFERENCE = StainReference(
    ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581)), (1.9705, 1.0308)
)


def _optical_density(image: torch.Tensor, io: float) -> torch.Tensor:
    """``P x 3`` optical densities of a ``3 x H x W`` image in [0, 255]."""
    return -torch.log((image.reshape(3, -1).T + 1.0) / io)


def _fit(
    od: torch.Tensor, alpha: float, beta: float, min_tissue_pixels: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Stain vectors (``3 x 2``) and 99th-percentile concentrations of ``P x 3`` densities;
    None where too few pixels are tissue or the fit is degenerate."""
    tissue = (od >= beta).all(dim=1)  # the reference drops pixels with any density < beta
    if int(tissue.sum()) < min_tissue_pixels:
        return None
    od_hat = od[tissue].double()
    _, vectors = torch.linalg.eigh(torch.cov(od_hat.T))
    plane = vectors[:, 1:3]  # the two largest eigenvalues
    plane = plane * torch.where(plane.sum(0) < 0, -1.0, 1.0)  # point into positive densities
    projected = od_hat @ plane
    phi = torch.atan2(projected[:, 1], projected[:, 0])
    low, high = torch.quantile(phi, alpha / 100), torch.quantile(phi, 1 - alpha / 100)
    v_low = plane @ torch.stack([torch.cos(low), torch.sin(low)])
    v_high = plane @ torch.stack([torch.cos(high), torch.sin(high)])
    # haematoxylin first: the vector with the larger red density (the reference's heuristic)
    stains = torch.stack([v_low, v_high] if v_low[0] > v_high[0] else [v_high, v_low], dim=1)
    concentrations = torch.linalg.pinv(stains) @ od_hat.T
    high_c = torch.quantile(concentrations, 0.99, dim=1)
    if not (
        torch.isfinite(stains).all() and torch.isfinite(high_c).all() and (high_c > 1e-6).all()
    ):
        return None
    return stains, high_c


def fit_macenko(
    image: torch.Tensor | np.ndarray,
    io: float = 240.0,
    alpha: float = 1.0,
    beta: float = 0.15,
    min_tissue_pixels: int = 100,
) -> StainReference | None:
    """A tile's Macenko stain vectors and concentration percentiles.

    Args:
        image: ``3 x H x W`` tensor, or ``H x W x 3`` array, uint8 or floats in [0, 1].
        io: Transmitted light intensity (the reference implementation's 240).
        alpha: Percentile of the angle that gives the stain vectors (1: 1st and 99th).
        beta: Optical density below which a pixel is background.
        min_tissue_pixels: Fewer tissue pixels than this: no fit (None).
    """
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)
    fitted = _fit(_optical_density(_float01(image) * 255.0, io), alpha, beta, min_tissue_pixels)
    if fitted is None:
        return None
    stains, high_c = (t.cpu().tolist() for t in fitted)
    return StainReference(tuple(tuple(row) for row in stains), tuple(high_c))  # type: ignore[arg-type]


def macenko_normalize(
    images: torch.Tensor,
    reference: StainReference = DEFAULT_REFERENCE,
    io: float = 240.0,
    alpha: float = 1.0,
    beta: float = 0.15,
    min_tissue_pixels: int = 100,
) -> torch.Tensor:
    """Macenko stain normalisation of each image of a batch to ``reference``.

    Args:
        images: ``N x 3 x H x W`` uint8, or floats in [0, 1], on any device.
        reference: The target stain vectors and concentrations.
        io, alpha, beta, min_tissue_pixels: See `fit_macenko`.

    Returns:
        The normalised images in the dtype of ``images``; an image whose fit fails (too little
        tissue) is returned unchanged.
    """
    target = torch.tensor(reference.stain_matrix, dtype=torch.float64, device=images.device)
    target_high = torch.tensor(
        reference.max_concentrations, dtype=torch.float64, device=images.device
    )
    pixels = _float01(images) * 255.0
    out = pixels.clone()
    for i in range(images.shape[0]):
        od = _optical_density(pixels[i], io)
        fitted = _fit(od, alpha, beta, min_tissue_pixels)
        if fitted is None:
            continue
        stains, high_c = fitted
        concentrations = torch.linalg.pinv(stains) @ od.double().T
        concentrations *= (target_high / high_c)[:, None]
        rebuilt = (io * torch.exp(-(target @ concentrations))).clamp_(0, 255)
        if torch.isfinite(rebuilt).all():
            out[i] = rebuilt.T.reshape(pixels[i].shape[1], pixels[i].shape[2], 3).permute(2, 0, 1)
    return _like(out / 255.0, images)


def stain_normalization(method: str, reference: str | None = None) -> dict[str, Any] | None:
    """The stain normalisation a job records and applies: None, or a Macenko target (the
    stain vectors fitted on the ``reference`` tile, else `DEFAULT_REFERENCE`).

    Raises:
        ValueError: An unknown method, or a reference tile that cannot be read or fitted,
            naming it.
    """
    if method not in STAIN_NORMS:
        raise ValueError(f"stain_norm={method!r}: allowed: {', '.join(STAIN_NORMS)}")
    if method == "none":
        return None
    if reference is None:
        return DEFAULT_REFERENCE.as_dict()
    from PIL import Image

    try:
        with Image.open(os.path.expanduser(reference)) as img:
            tile = np.asarray(img.convert("RGB"))
    except OSError as exc:
        raise ValueError(
            f"stain_reference={reference!r}: cannot be read as an image ({exc})"
        ) from exc
    fitted = fit_macenko(tile)
    if fitted is None:
        raise ValueError(
            f"stain_reference={reference!r}: too little stained tissue to fit H and E stain vectors; "
            "give a tile mostly covered by H&E-stained tissue"
        )
    return {**fitted.as_dict(), "reference": os.path.abspath(os.path.expanduser(reference))}


def stain_normalizer(record: Mapping[str, Any] | None):
    """A function ``N x 3 x H x W images -> images`` applying a recorded stain normalisation
    (`stain_normalization`'s record, as a model file keeps it); None for no normalisation."""
    if not record:
        return None
    if record.get("method") != "macenko":
        raise ValueError(f"stain normalisation {record.get('method')!r}: allowed: macenko")
    reference = StainReference.from_dict(record)
    return lambda images: macenko_normalize(images, reference)
