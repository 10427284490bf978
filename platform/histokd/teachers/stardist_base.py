"""What every StarDist teacher does around its network, the same for both backends.

A StarDist model labels well only when it runs as it was trained (``/work/shared/TEACHER.md``):
at its own pixel size and with its own normalisation. So both are settings of a teacher, stored
in its folder's ``histokd_teacher.json`` beside alpha:

- ``normalization``: percentiles of each image mapped to [0, 1], ``"joint"`` over the three
  channels (StarDist's H&E example: ``normalize(img, 1, 99.8, axis=(0, 1, 2))``) or
  ``"per_channel"`` (``axis=(0, 1)``); ``percentiles`` (default 1, 99.8).
- ``teacher_mpp``: the pixel size (um/px) the model was trained at. With the patches' own
  ``patch_mpp`` known, a patch is resampled to the teacher's scale, labelled there, and its
  probability resampled back before RCKD Eq. 2 thresholds it.

Then, per batch: normalise, reflect-pad to the network's multiples, the probability head, crop,
StarDist's grid upsampling, Eq. 2. All of it runs as tensor operations on the teacher's device;
a backend supplies only :meth:`StarDistTeacherBase._network_probability`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from histokd.teachers.base import (
    PAPER_ALPHA,
    MaskMode,
    TeacherError,
    ThresholdTeacher,
    check_images,
)
from histokd.teachers.stardist_models import NORMALIZATIONS, NORMALIZE_PERCENTILES

__all__ = [
    "StarDistTeacherBase",
    "grid_upsample",
    "normalize_percentiles",
    "reflect_pad",
    "resample_images",
    "resample_probability",
]

_SCALE_TOLERANCE = 0.02  # pixel sizes within 2 % are the same scale: no resampling


# -- the steps, on tensors ------------------------------------------------------------------------
def normalize_percentiles(
    images: torch.Tensor,
    low: float = NORMALIZE_PERCENTILES[0],
    high: float = NORMALIZE_PERCENTILES[1],
    per_channel: bool = False,
) -> torch.Tensor:
    """Per-image percentile normalisation of a uint8 (N, H, W, C) tensor, on its device.

    Equal to ``csbdeep.utils.normalize(img, low, high, axis=(0, 1, 2))`` for each image (or
    ``axis=(0, 1)`` with ``per_channel``), as StarDist's examples normalise, with exact
    percentiles (numpy's "linear" method) from a 256-bin histogram per image: uint8 has 256
    values, so one ``bincount`` replaces a sort of every image.

    Returns:
        float32 (N, H, W, C), not clipped.
    """
    n, channels = images.shape[0], images.shape[-1]
    groups = (
        images.permute(0, 3, 1, 2).reshape(n * channels, -1)
        if per_channel
        else images.reshape(n, -1)
    )
    g, count = groups.shape
    offsets = torch.arange(g, device=images.device, dtype=torch.int64)[:, None] * 256
    hist = torch.bincount(
        (groups.to(torch.int64) + offsets).reshape(-1), minlength=256 * g
    ).reshape(g, 256)
    cumulative = torch.cumsum(hist, dim=1)

    def value_at(rank: int) -> torch.Tensor:
        # Smallest v with more than `rank` values <= v: the rank-th smallest value (0-based).
        return torch.argmax((cumulative > rank).to(torch.int32), dim=1).to(torch.float64)

    bounds = []
    for q in (low, high):
        position = q / 100.0 * (count - 1)
        below = math.floor(position)
        v0, v1 = value_at(below), value_at(min(below + 1, count - 1))
        shape = (n, 1, 1, channels) if per_channel else (n, 1, 1, 1)
        bounds.append((v0 + (position - below) * (v1 - v0)).to(torch.float32).reshape(shape))
    mi, ma = bounds
    return (images.to(torch.float32) - mi) / (ma - mi + 1e-20)


def _reflect_index(size: int, padded: int, device: torch.device) -> torch.Tensor:
    # numpy's mode="reflect" (edge for a single pixel), for padding at the end only.
    index = torch.arange(padded, device=device)
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = index % period
    return torch.where(index >= size, period - index, index)


def reflect_pad(x: torch.Tensor, div_by: tuple[int, int]) -> torch.Tensor:
    """Pad (N, C, H, W) at the bottom and right up to multiples of ``div_by``, as ``np.pad(mode="reflect")``.

    Padding after the normalisation equals StarDist's padding before it, since the percentiles
    come from the unpadded image.
    """
    height, width = x.shape[-2:]
    padded_h = height + (-height) % div_by[0]
    padded_w = width + (-width) % div_by[1]
    if padded_h != height:
        x = x.index_select(2, _reflect_index(height, padded_h, x.device))
    if padded_w != width:
        x = x.index_select(3, _reflect_index(width, padded_w, x.device))
    return x


def grid_upsample(
    prob: torch.Tensor, grid: tuple[int, int], shape: tuple[int, int]
) -> torch.Tensor:
    """Bilinear upsampling of a grid-subsampled StarDist output (N, h, w) to pixels (N, H, W).

    StarDist trains its output at grid ``g`` on ``prob_full[::g, ::g]``: cell ``i`` is pixel
    ``i * g``. Pixel ``y`` therefore reads the grid at ``y / g``, clamped at the last cell.
    """
    gy, gx = grid
    if (gy, gx) == (1, 1) and tuple(prob.shape[1:]) == tuple(shape):
        return prob

    def axis_weights(size: int, step: int, cells: int):
        pos = torch.arange(size, device=prob.device, dtype=torch.float32) / step
        pos = torch.clamp(pos, max=cells - 1)
        i0 = torch.floor(pos).to(torch.int64)
        return i0, torch.clamp(i0 + 1, max=cells - 1), pos - i0.to(torch.float32)

    y0, y1, wy = axis_weights(shape[0], gy, prob.shape[1])
    x0, x1, wx = axis_weights(shape[1], gx, prob.shape[2])
    rows = prob[:, y0] * (1 - wy)[None, :, None] + prob[:, y1] * wy[None, :, None]
    return rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx


def resample_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (N, H, W, C) to ``size`` (bilinear; antialiased when shrinking), uint8 again."""
    shrink = size[0] < images.shape[1] or size[1] < images.shape[2]
    x = images.permute(0, 3, 1, 2).to(torch.float32)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def resample_probability(prob: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """float (N, h, w) to ``size`` (bilinear; antialiased when shrinking), before Eq. 2."""
    shrink = size[0] < prob.shape[1] or size[1] < prob.shape[2]
    out = F.interpolate(
        prob[:, None], size=size, mode="bilinear", align_corners=False, antialias=shrink
    )
    return out[:, 0]


class StarDistTeacherBase(ThresholdTeacher):
    """A StarDist teacher's pipeline around its network (RCKD Sec. 2.2.1, Eq. 1-2).

    Args:
        source: Where the model came from (a registered name or a folder), for names and logs.
        grid: The model's output grid (gy, gx).
        div_by: Height and width multiples the network needs (grid times U-Net pooling).
        alpha: Threshold of RCKD Eq. 2 on StarDist's object probability (paper: 0.5, which
            marks nucleus cores: it is the normalised distance to the nucleus boundary; 0.1-0.2
            gives whole nuclei).
        mask_mode: ``"probability"`` (Eq. 2) or ``"instances"`` (backends that have NMS).
        batch_size: Patches per network call for NumPy input.
        normalization: ``"joint"`` (over the three channels) or ``"per_channel"``.
        percentiles: (low, high) percentiles mapped to 0 and 1.
        teacher_mpp: Pixel size (um/px) the model was trained at; None: the patches' own.
        patch_mpp: Pixel size of the patches it is given; None: the teacher's own.
        device: The torch device the pipeline runs on.
    """

    kind = "stardist"

    def __init__(
        self,
        source: str,
        grid: tuple[int, int],
        div_by: tuple[int, int],
        alpha: float = PAPER_ALPHA,
        mask_mode: MaskMode = "probability",
        batch_size: int = 8,
        normalization: str = "joint",
        percentiles: tuple[float, float] | list[float] = NORMALIZE_PERCENTILES,
        teacher_mpp: float | None = None,
        patch_mpp: float | None = None,
        device: torch.device | str = "cpu",
    ):
        super().__init__(alpha=alpha, mask_mode=mask_mode)
        self.source = str(source)
        if not (isinstance(batch_size, int) and batch_size > 0):
            raise TeacherError(f"batch_size={batch_size!r}: must be a positive integer")
        if normalization not in NORMALIZATIONS:
            raise TeacherError(
                f"normalization={normalization!r}: allowed: {', '.join(NORMALIZATIONS)}"
            )
        low, high = _check_percentiles(percentiles)
        for name, mpp in (("teacher_mpp", teacher_mpp), ("patch_mpp", patch_mpp)):
            if mpp is not None and (
                isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or not 0.01 <= mpp <= 100
            ):
                raise TeacherError(
                    f"{name}={mpp!r}: must be a pixel size in um/px in [0.01, 100] (20x is 0.5), or None"
                )
        self.grid = tuple(int(g) for g in grid)
        self.div_by = tuple(int(d) for d in div_by)
        self.batch_size = batch_size
        self.normalization = normalization
        self.percentiles = (low, high)
        self.teacher_mpp = None if teacher_mpp is None else float(teacher_mpp)
        self.patch_mpp = None if patch_mpp is None else float(patch_mpp)
        self.device = torch.device(device)

    @property
    def kind_label(self) -> str:
        """``stardist:<model folder or registered name>``."""
        return f"stardist:{self.source.rstrip('/').rsplit('/', 1)[-1]}"

    @property
    def name(self) -> str:
        """The model and its settings, e.g. ``stardist:demo[alpha=0.1]``."""
        mode = "instances" if self.mask_mode == "instances" else f"alpha={self.alpha:g}"
        extra = "" if self.normalization == "joint" else f",{self.normalization}"
        if self.scale != 1.0:
            extra += f",x{self.scale:.3g}"
        return f"{self.kind_label}[{mode}{extra}]"

    @property
    def scale(self) -> float:
        """Patch pixels to teacher pixels: 2.0 when 20x patches meet a 40x teacher; 1.0 when either is unknown."""
        if self.teacher_mpp is None or self.patch_mpp is None:
            return 1.0
        scale = self.patch_mpp / self.teacher_mpp
        return 1.0 if abs(scale - 1.0) <= _SCALE_TOLERANCE else scale

    def settings_dict(self) -> dict:
        """The settings that decide its labels, as ``histokd_teacher.json`` stores them."""
        return {
            "alpha": self.alpha,
            "mask_mode": self.mask_mode,
            "normalization": self.normalization,
            "percentiles": list(self.percentiles),
            "teacher_mpp": self.teacher_mpp,
        }

    # -- the backend's part --------------------------------------------------------------------
    def _network_probability(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """The probability head, float32 (N, 1, H/gy, W/gx), for normalised padded (N, 3, H, W)."""
        raise NotImplementedError

    # -- on tensors (the teacher's device) ---------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) to the network's input: float32 (N, H, W, 3), normalised as trained."""
        return normalize_percentiles(
            images, *self.percentiles, per_channel=self.normalization == "per_channel"
        )

    def grid_probability_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Object probability at the model's grid, float32 (N, ceil(H/gy), ceil(W/gx)), no resampling."""
        height, width = images.shape[1:3]
        x = reflect_pad(self.normalize(images).permute(0, 3, 1, 2), self.div_by)
        prob = self._network_probability(x)
        gy, gx = self.grid
        return prob[:, 0, : -(-height // gy), : -(-width // gx)].to(torch.float32)

    def teacher_size(self, height: int, width: int) -> tuple[int, int]:
        """A patch's size at the teacher's scale."""
        scale = self.scale
        return max(1, round(height * scale)), max(1, round(width * scale))

    def probability_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Object probability at the patch's pixels, float32 (N, H, W), for uint8 (N, H, W, 3)."""
        height, width = images.shape[1:3]
        size = self.teacher_size(height, width)
        if size != (height, width):
            images = resample_images(images, size)
        prob = grid_upsample(self.grid_probability_tensor(images), self.grid, size)
        if size != (height, width):
            prob = resample_probability(prob, (height, width))
        return prob

    def label_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """RCKD Eq. 2 on the device: uint8 (N, H, W) in {0, 1} for uint8 (N, H, W, 3)."""
        with torch.inference_mode():
            return (self.probability_tensor(images) >= self.alpha).to(torch.uint8)  # RCKD Eq. 2

    # -- on NumPy (the Teacher interface) ---------------------------------------------------------
    def _batched(self, images: np.ndarray, fn) -> np.ndarray:
        images = check_images(images, self.name)
        parts = []
        for start in range(0, len(images), self.batch_size):
            chunk = np.require(
                images[start : start + self.batch_size], requirements="W"
            )  # torch needs writable
            with torch.inference_mode():
                parts.append(
                    fn(torch.from_numpy(chunk).to(self.device, non_blocking=True)).cpu().numpy()
                )
        return np.concatenate(parts)

    def probability(self, images: np.ndarray) -> np.ndarray:
        """StarDist's object probability at the patch's pixels, float32 (N, H, W)."""
        return self._batched(images, self.probability_tensor)

    def grid_probability(self, images: np.ndarray) -> np.ndarray:
        """The probability at the model's grid, float32 (N, ceil(H/gy), ceil(W/gx)), no resampling."""
        return self._batched(images, self.grid_probability_tensor)

    def pseudo_label(self, images: np.ndarray) -> np.ndarray:
        """RCKD Eq. 2 (or instance masks), uint8 (N, H, W) in {0, 1}."""
        images = check_images(images, self.name)
        if self.mask_mode == "instances":
            return (self.instance_labels(images) > 0).astype(np.uint8)
        return self._batched(images, self.label_tensor)


def _check_percentiles(percentiles) -> tuple[float, float]:
    try:
        low, high = (float(p) for p in percentiles)
    except (TypeError, ValueError):
        raise TeacherError(
            f"percentiles={percentiles!r}: must be two numbers (low, high), e.g. [1, 99.8]"
        ) from None
    if not 0 <= low < high <= 100:
        raise TeacherError(
            f"percentiles={percentiles!r}: need 0 <= low < high <= 100 (StarDist's H&E example: 1, 99.8)"
        )
    return low, high
