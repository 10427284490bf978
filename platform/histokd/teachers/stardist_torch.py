"""The StarDist teacher in PyTorch: RCKD's pseudo labels (Sec. 2.2.1, Eq. 1-2) on any device.

The network (:mod:`histokd.teachers.stardist_net`) is StarDist2D's, with its Keras weights. The
whole label runs where the network runs: uint8 patches go in, the percentile normalisation,
the reflect padding to the network's multiples, the probability head, StarDist's grid
upsampling and RCKD Eq. 2 run as tensor operations, and uint8 masks come out. They match the
TensorFlow fast path (:mod:`histokd.teachers.stardist_teacher`) step for step; the NumPy
references there (:func:`~histokd.teachers.stardist_teacher.percentile_normalize`,
:func:`~histokd.teachers.stardist_teacher.upsample_grid`) are what both are tested against.

On CUDA, ``precision="bf16"`` runs the network under bfloat16 autocast (normalisation and
thresholding stay float32); channels_last is used on every device; ``compile=True`` wraps the
network in ``torch.compile``. Nothing here imports TensorFlow, Ray, OpenSlide or MLflow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

from histokd.teachers.base import (
    PAPER_ALPHA,
    MaskMode,
    TeacherError,
    ThresholdTeacher,
    check_images,
)
from histokd.teachers.stardist_models import (
    NORMALIZE_PERCENTILES,
    check_model_folder,
    folder_defaults,
    pretrained_folder,
)
from histokd.teachers.stardist_net import StarDistNet, StarDistNetConfig, load_keras_weights

__all__ = [
    "PRECISIONS",
    "TorchStarDistTeacher",
    "grid_upsample",
    "normalize_percentiles",
    "reflect_pad",
]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
CONVERTED_WEIGHTS = "weights_best.torch.pt"  # beside a cached pretrained model's weights_best.h5


def normalize_percentiles(
    images: torch.Tensor, low: float = NORMALIZE_PERCENTILES[0], high: float = NORMALIZE_PERCENTILES[1]
) -> torch.Tensor:
    """Per-image percentile normalisation of uint8 (N, H, W, C), jointly over the channels.

    Exact percentiles (numpy's "linear" method) from a 256-bin histogram per image, as
    :func:`histokd.teachers.stardist_teacher.percentile_normalize` computes them.

    Returns:
        float32 (N, H, W, C), not clipped.
    """
    n = images.shape[0]
    flat = images.reshape(n, -1).to(torch.int64)
    count = flat.shape[1]
    offsets = torch.arange(n, device=images.device, dtype=torch.int64)[:, None] * 256
    hist = torch.bincount((flat + offsets).reshape(-1), minlength=256 * n).reshape(n, 256)
    cumulative = torch.cumsum(hist, dim=1)  # cumulative[i, v]: values <= v

    def value_at(rank: int) -> torch.Tensor:
        # Smallest v with more than `rank` values <= v: the rank-th smallest value (0-based).
        return torch.argmax((cumulative > rank).to(torch.int32), dim=1).to(torch.float64)

    bounds = []
    for q in (low, high):
        position = q / 100.0 * (count - 1)
        below = math.floor(position)
        v0, v1 = value_at(below), value_at(min(below + 1, count - 1))
        bounds.append((v0 + (position - below) * (v1 - v0)).to(torch.float32).reshape(n, 1, 1, 1))
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
    """Pad (N, C, H, W) at the bottom and right up to multiples of ``div_by``, as ``np.pad(mode="reflect")``."""
    height, width = x.shape[-2:]
    padded_h = height + (-height) % div_by[0]
    padded_w = width + (-width) % div_by[1]
    if padded_h != height:
        x = x.index_select(2, _reflect_index(height, padded_h, x.device))
    if padded_w != width:
        x = x.index_select(3, _reflect_index(width, padded_w, x.device))
    return x


def grid_upsample(prob: torch.Tensor, grid: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """StarDist's grid output (N, h, w) bilinearly to pixels (N, H, W): pixel ``y`` reads cell ``y / g``.

    The same sampling as :func:`histokd.teachers.stardist_teacher.upsample_grid`.
    """
    gy, gx = grid
    if (gy, gx) == (1, 1) and tuple(prob.shape[1:]) == tuple(shape):
        return prob

    def axis_weights(size: int, step: int, cells: int):
        pos = torch.clamp(torch.arange(size, device=prob.device, dtype=torch.float32) / step, max=cells - 1)
        i0 = torch.floor(pos).to(torch.int64)
        return i0, torch.clamp(i0 + 1, max=cells - 1), pos - i0.to(torch.float32)

    y0, y1, wy = axis_weights(shape[0], gy, prob.shape[1])
    x0, x1, wx = axis_weights(shape[1], gx, prob.shape[2])
    rows = prob[:, y0] * (1 - wy)[None, :, None] + prob[:, y1] * wy[None, :, None]
    return rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise TeacherError(f"device={device!r}: not a torch device; allowed: auto, cpu, cuda, cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TeacherError(f"device={str(device)!r}: CUDA is not available here; allowed: auto, cpu")
    return device


class TorchStarDistTeacher(ThresholdTeacher):
    """Pseudo labels from a StarDist2D model, in PyTorch (RCKD Sec. 2.2.1).

    Build one with :meth:`from_folder` or :meth:`from_pretrained`, or through
    :func:`histokd.teachers.build_teacher` (the default backend).

    Args:
        net: The network, weights loaded.
        source: Where the model came from, for names and logs.
        alpha: Threshold of RCKD Eq. 2 on StarDist's object probability (paper: 0.5, which
            marks nucleus cores; 0.1-0.2 gives whole nuclei).
        mask_mode: Only ``"probability"``: StarDist's NMS (``"instances"``) runs in TensorFlow
            (``backend="tensorflow"``).
        batch_size: Patches per network call for NumPy input.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        precision: ``"fp32"``, or ``"bf16"`` (autocast of the network on CUDA; fp32 elsewhere).
        compile: Wrap the network in ``torch.compile``.
        intra_op_threads: CPU threads for torch in this process (a Ray actor's CPU share).
    """

    kind = "stardist"

    def __init__(
        self,
        net: StarDistNet,
        source: str,
        alpha: float = PAPER_ALPHA,
        mask_mode: MaskMode = "probability",
        batch_size: int = 8,
        device: str | torch.device | None = "auto",
        precision: str = "fp32",
        compile: bool = False,  # noqa: A002 - torch's own word for it
        intra_op_threads: int | None = None,
    ):
        super().__init__(alpha=alpha, mask_mode=mask_mode)
        self.source = str(source)
        if self.mask_mode == "instances":
            raise TeacherError(
                "mask_mode='instances' runs StarDist's NMS, which needs TensorFlow: build the teacher with "
                "build_teacher(), which runs it with backend='tensorflow' (histokd's 'tf-cpu' or 'tf-gpu' extra)"
            )
        if not (isinstance(batch_size, int) and batch_size > 0):
            raise TeacherError(f"batch_size={batch_size!r}: must be a positive integer")
        if precision not in PRECISIONS:
            raise TeacherError(f"precision={precision!r}: allowed: {', '.join(PRECISIONS)}")
        if net.config.n_channel_in != 3:
            raise TeacherError(
                f"StarDist model {source}: n_channel_in={net.config.n_channel_in}; an H&E teacher needs 3 (RGB)"
            )
        if intra_op_threads is not None:
            torch.set_num_threads(max(1, int(intra_op_threads)))
        self.batch_size = batch_size
        self.device = _resolve_device(device)
        self.precision = precision
        self.grid = net.config.grid
        self.div_by = net.config.div_by
        self.net = net.eval().requires_grad_(False).to(self.device, memory_format=torch.channels_last)
        # Freezing lets Inductor fold the weights and fuse each convolution with its activation.
        self._forward = torch.compile(self.net, options={"freezing": True}) if compile else self.net

    @property
    def kind_label(self) -> str:
        """``stardist:<model folder or registered name>``."""
        return f"stardist:{Path(self.source).name}"

    @property
    def name(self) -> str:
        """The model and its mask setting, e.g. ``stardist:demo[alpha=0.1]``."""
        return f"{self.kind_label}[alpha={self.alpha:g}]"

    # -- loading -------------------------------------------------------------------------
    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike,
        require_weights: bool = True,
        source: str | None = None,
        cache_converted: bool = False,
        **kwargs,
    ) -> TorchStarDistTeacher:
        """A StarDist model folder (``config.json``, ``thresholds.json``, ``weights_best.h5``).

        ``alpha`` and ``mask_mode`` default to the folder's ``histokd_teacher.json`` (the
        training job writes it), else the paper's (alpha 0.5); keyword arguments other than
        None override them.

        Args:
            folder: The model folder.
            require_weights: Refuse a folder without weights; False keeps random weights
                (tests run the published architecture offline this way).
            source: Name to report; the folder path when None.
            cache_converted: Keep the converted weights beside the h5 file
                (``weights_best.torch.pt``) and reuse them while the h5 file is unchanged.
            **kwargs: The teacher's other arguments (``alpha``, ``device``, ...).
        """
        folder = check_model_folder(folder, require_weights=require_weights)
        kwargs = folder_defaults(folder, kwargs)
        net = StarDistNet(StarDistNetConfig(json.loads((folder / "config.json").read_text()), source=str(folder / "config.json")))
        weights = folder / "weights_best.h5"
        if not weights.is_file():
            candidates = sorted(folder.glob("*.h5")) + sorted(folder.glob("*.hdf5"))
            weights = candidates[0] if candidates else None
        if weights is not None:
            _load_weights(net, weights, cache_converted)
        return cls(net, source=source or str(folder), **kwargs)

    @classmethod
    def from_pretrained(cls, name: str = "2D_versatile_he", **kwargs) -> TorchStarDistTeacher:
        """A registered StarDist model from StarDist's cache (downloaded once, converted on load).

        The cache is Keras': ``$KERAS_HOME/models/StarDist2D/<name>/`` (``~/.keras`` when
        ``KERAS_HOME`` is unset); the converted weights are kept beside the h5 file.
        """
        return cls.from_folder(pretrained_folder(name), source=name, cache_converted=True, **kwargs)

    # -- inference on tensors ------------------------------------------------------------------
    def grid_probability_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Object probability at the model's grid, float32 (N, ceil(H/gy), ceil(W/gx)), for uint8 (N, H, W, 3)."""
        height, width = images.shape[1:3]
        x = normalize_percentiles(images, *NORMALIZE_PERCENTILES).permute(0, 3, 1, 2)  # channels_last
        x = reflect_pad(x, self.div_by).contiguous(memory_format=torch.channels_last)
        bf16 = self.precision == "bf16" and self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            prob = self._forward(x)
        gy, gx = self.grid
        return prob[:, 0, : -(-height // gy), : -(-width // gx)].to(torch.float32)

    def probability_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Object probability upsampled to the patch, float32 (N, H, W), for uint8 (N, H, W, 3)."""
        return grid_upsample(self.grid_probability_tensor(images), self.grid, tuple(images.shape[1:3]))

    def label_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """RCKD Eq. 2 on the device: uint8 (N, H, W) in {0, 1} for uint8 (N, H, W, 3)."""
        with torch.inference_mode():
            return (self.probability_tensor(images) >= self.alpha).to(torch.uint8)  # RCKD Eq. 2

    # -- inference on NumPy (the Teacher interface) ---------------------------------------------
    def _batched(self, images: np.ndarray, fn) -> np.ndarray:
        images = check_images(images, self.name)
        parts = []
        for start in range(0, len(images), self.batch_size):
            chunk = np.require(images[start : start + self.batch_size], requirements="W")  # torch needs writable
            x = torch.from_numpy(chunk).to(self.device, non_blocking=True)
            parts.append(fn(x).cpu().numpy())
        return np.concatenate(parts)

    def probability(self, images: np.ndarray) -> np.ndarray:
        """StarDist's object probability upsampled to the patch size, float32 (N, H, W)."""
        return self._batched(images, self.probability_tensor)

    def grid_probability(self, images: np.ndarray) -> np.ndarray:
        """The probability at the model's grid, float32 (N, ceil(H/gy), ceil(W/gx))."""
        return self._batched(images, self.grid_probability_tensor)

    def pseudo_label(self, images: np.ndarray) -> np.ndarray:
        """RCKD Eq. 2, uint8 (N, H, W) in {0, 1}."""
        return self._batched(images, self.label_tensor)


def _load_weights(net: StarDistNet, h5: Path, cache_converted: bool) -> None:
    """Load ``h5`` into ``net``; with ``cache_converted``, through a converted copy beside it."""
    if not cache_converted:
        load_keras_weights(net, h5)
        return
    digest = hashlib.sha256(h5.read_bytes()).hexdigest()
    converted = h5.with_name(CONVERTED_WEIGHTS)
    if converted.is_file():
        try:
            saved = torch.load(converted, map_location="cpu", weights_only=True)
            if saved.get("h5_sha256") == digest:
                net.load_state_dict(saved["state_dict"])
                return
        except (RuntimeError, OSError, KeyError, EOFError) as exc:
            log.warning("%s: converted weights unreadable (%s); converting %s again", converted, exc, h5.name)
    load_keras_weights(net, h5)
    try:
        tmp = converted.with_suffix(f".tmp{os.getpid()}")
        torch.save({"h5_sha256": digest, "state_dict": net.state_dict()}, tmp)
        os.replace(tmp, converted)
    except OSError as exc:  # a read-only cache still works, it converts on every load
        log.info("%s: converted weights not cached (%s)", converted, exc)
