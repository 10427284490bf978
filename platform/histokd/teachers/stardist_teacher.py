"""The StarDist teacher of RCKD Sec. 2.2.1, with a batched probability-map fast path.

RCKD uses StarDist (Schmidt et al. 2018) trained on MoNuSeg 2018 and TNBC, which is StarDist's
published ``2D_versatile_he`` model. The pseudo label needs only the network's object
probability (RCKD Eq. 1-2), so the fast path runs the Keras network on a whole batch of
patches and thresholds its probability output: no star-convex polygons, no non-maximum
suppression. ``mask_mode="instances"`` keeps StarDist's full ``predict_instances`` (NMS on the
CPU) for comparison.

TensorFlow is imported here only, lazily, when a model is loaded, so the PyTorch training
process never imports it; GPU memory growth is turned on first so a teacher shares its GPU.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import warnings
from pathlib import Path

import numpy as np

from histokd.teachers.base import (
    PAPER_ALPHA,
    MaskMode,
    TeacherError,
    ThresholdTeacher,
    check_images,
)
from histokd.teachers.stardist_models import (
    DEFAULTS_FILE,
    NORMALIZE_PERCENTILES,
    STARDIST_PRETRAINED,
    check_model_folder,
    folder_defaults,
    pretrained_folder,
)

__all__ = [
    "DEFAULTS_FILE",
    "STARDIST_PRETRAINED",
    "StarDistTeacher",
    "configure_tensorflow",
    "percentile_normalize",
    "upsample_grid",
]

log = logging.getLogger(__name__)

def configure_tensorflow(intra_op_threads: int | None = None):
    """Import TensorFlow for a teacher: quiet logs, GPU memory growth on, optional thread cap.

    Memory growth must be set before any GPU is initialised; a teacher sharing its GPU with
    the student (fractional ``num_gpus``) must not reserve all of it.

    Args:
        intra_op_threads: Threads per op on the CPU (a Ray actor's CPU share); None leaves
            TensorFlow's default (all cores).

    Returns:
        The ``tensorflow`` module.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import stardist  # noqa: F401 - the backend needs both
        import tensorflow as tf
    except ImportError as exc:
        raise TeacherError(
            f"the TensorFlow StarDist backend needs TensorFlow and StarDist ({exc.name} is not installed): "
            "pip install 'histokd[tf-cpu]' (or 'histokd[tf-gpu]' on NVIDIA GPUs), or use the PyTorch "
            "backend (--teacher-backend torch)"
        ) from exc

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised in this process: growth is fixed by now
            pass
    if intra_op_threads is not None:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(intra_op_threads))
            tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, int(intra_op_threads))))
        except RuntimeError:  # threads are fixed once TensorFlow has run an op
            pass
    return tf


def percentile_normalize(
    images: np.ndarray, low: float = NORMALIZE_PERCENTILES[0], high: float = NORMALIZE_PERCENTILES[1]
) -> np.ndarray:
    """Per-image percentile normalisation of uint8 RGB, as StarDist's H&E examples do.

    Equal to ``csbdeep.utils.normalize(img, low, high, axis=(0, 1, 2))`` for each image, but
    exact percentiles come from a 256-bin histogram per image (uint8 has 256 values), which is
    one ``bincount`` over the batch instead of a sort of every image.

    Args:
        images: uint8 (N, H, W, C).
        low: Lower percentile, mapped to 0.
        high: Upper percentile, mapped to 1.

    Returns:
        float32 (N, H, W, C), not clipped.
    """
    n = images.shape[0]
    flat = images.reshape(n, -1)
    count = flat.shape[1]
    offsets = (np.arange(n, dtype=np.int64) * 256)[:, None]
    hist = np.bincount((flat + offsets).ravel(), minlength=256 * n).reshape(n, 256)
    cumulative = np.cumsum(hist, axis=1)  # cumulative[i, v]: values <= v

    def value_at(rank: np.ndarray) -> np.ndarray:
        # Smallest v with more than `rank` values <= v: the rank-th smallest value (0-based).
        return np.argmax(cumulative > rank[:, None], axis=1).astype(np.float64)

    out = []
    for q in (low, high):
        position = q / 100.0 * (count - 1)  # numpy's "linear" method
        below = math.floor(position)
        frac = position - below
        v0 = value_at(np.full(n, below))
        v1 = value_at(np.full(n, min(below + 1, count - 1)))
        out.append(v0 + frac * (v1 - v0))
    mi = out[0].astype(np.float32).reshape(n, 1, 1, 1)
    ma = out[1].astype(np.float32).reshape(n, 1, 1, 1)
    return (images.astype(np.float32) - mi) / (ma - mi + np.float32(1e-20))


def upsample_grid(prob: np.ndarray, grid: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a grid-subsampled StarDist output to pixel resolution.

    StarDist trains its output at grid ``g`` on ``prob_full[::g, ::g]``: cell ``i`` is pixel
    ``i * g``. Pixel ``y`` therefore reads the grid at ``y / g``, clamped at the last cell.

    Args:
        prob: (N, h, w) at the model's grid.
        grid: The model's (gy, gx).
        shape: Output (H, W).

    Returns:
        float32 (N, H, W).
    """
    gy, gx = grid
    height, width = shape
    if (gy, gx) == (1, 1) and prob.shape[1:] == (height, width):
        return prob.astype(np.float32, copy=False)

    def axis_weights(size: int, step: int, cells: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.minimum(np.arange(size, dtype=np.float32) / step, cells - 1)
        i0 = np.floor(pos).astype(np.int64)
        i1 = np.minimum(i0 + 1, cells - 1)
        return i0, i1, (pos - i0).astype(np.float32)

    y0, y1, wy = axis_weights(height, gy, prob.shape[1])
    x0, x1, wx = axis_weights(width, gx, prob.shape[2])
    rows = prob[:, y0] * (1 - wy)[None, :, None] + prob[:, y1] * wy[None, :, None]
    return (rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx).astype(np.float32)


def _device_fast_path(prob_model, grid: tuple[int, int], low: float, high: float):
    """The fast path as TensorFlow functions, so it runs where the network runs (the GPU).

    uint8 patches go in (a quarter of the bytes of float32) and uint8 masks come out; the
    percentile normalisation (:func:`percentile_normalize`), the network's probability head,
    the grid upsampling (:func:`upsample_grid`) and RCKD Eq. 2 all run on the device, so the
    actor's CPU share only feeds batches. The NumPy functions stay the reference the tests
    compare against.

    Returns:
        ``probability(x, height, width)`` and ``label(x, height, width, alpha)``: ``x`` is the
        batch padded to the network's multiples, ``height`` and ``width`` its unpadded size.
    """
    import tensorflow as tf

    gy, gx = grid

    def normalize(x, height, width):
        n = tf.shape(x)[0]
        valid = tf.reshape(tf.cast(x[:, :height, :width], tf.int32), [n, -1])
        count = tf.shape(valid)[1]
        offsets = tf.range(n, dtype=tf.int32)[:, None] * 256
        hist = tf.math.bincount(tf.reshape(valid + offsets, [-1]), minlength=256 * n, maxlength=256 * n)
        cumulative = tf.cumsum(tf.reshape(hist, [n, 256]), axis=1)

        def value_at(rank):
            return tf.cast(tf.argmax(tf.cast(cumulative > rank, tf.int32), axis=1), tf.float64)

        bounds = []
        for q in (low, high):
            position = q / 100.0 * tf.cast(count - 1, tf.float64)  # numpy's "linear" method
            below = tf.floor(position)
            frac = position - below
            below_i = tf.cast(below, tf.int32)
            v0 = value_at(below_i)
            v1 = value_at(tf.minimum(below_i + 1, count - 1))
            bounds.append(tf.cast(v0 + frac * (v1 - v0), tf.float32)[:, None, None, None])
        mi, ma = bounds
        return (tf.cast(x, tf.float32) - mi) / (ma - mi + 1e-20)

    def axis_weights(size, step, cells):
        pos = tf.minimum(tf.range(size, dtype=tf.float32) / step, tf.cast(cells - 1, tf.float32))
        i0 = tf.cast(tf.floor(pos), tf.int32)
        return i0, tf.minimum(i0 + 1, cells - 1), pos - tf.cast(i0, tf.float32)

    def probability(x, height, width):
        prob = prob_model(normalize(x, height, width), training=False)[..., 0]
        prob = prob[:, : (height + gy - 1) // gy, : (width + gx - 1) // gx]
        y0, y1, wy = axis_weights(height, gy, tf.shape(prob)[1])
        x0, x1, wx = axis_weights(width, gx, tf.shape(prob)[2])
        rows = tf.gather(prob, y0, axis=1) * (1 - wy)[None, :, None] + tf.gather(prob, y1, axis=1) * wy[None, :, None]
        return tf.gather(rows, x0, axis=2) * (1 - wx) + tf.gather(rows, x1, axis=2) * wx

    def label(x, height, width, alpha):
        return tf.cast(probability(x, height, width) >= alpha, tf.uint8)  # RCKD Eq. 2

    images = tf.TensorSpec([None, None, None, 3], tf.uint8)
    size = tf.TensorSpec([], tf.int32)
    return (
        tf.function(probability, input_signature=[images, size, size]),
        tf.function(label, input_signature=[images, size, size, tf.TensorSpec([], tf.float32)]),
    )


class StarDistTeacher(ThresholdTeacher):
    """Pseudo labels from a StarDist2D model (RCKD Sec. 2.2.1).

    Build one with :meth:`from_pretrained` (StarDist's registered models, through StarDist's
    own download cache under ``$KERAS_HOME``) or :meth:`from_folder` (any StarDist model
    folder), or through :func:`histokd.teachers.build_teacher`.

    Args:
        model: A loaded ``stardist.models.StarDist2D`` with three input channels.
        source: Where the model came from (a registered name or a folder), for names and logs.
        alpha: Threshold of RCKD Eq. 2 on StarDist's object probability (paper: 0.5, which
            marks nucleus cores: StarDist's probability is the normalised distance to the
            nucleus boundary; 0.1-0.2 gives whole nuclei).
        mask_mode: ``"probability"`` (fast path, Eq. 2) or ``"instances"``
            (``predict_instances`` labels > 0, at the model's own thresholds; alpha unused).
        batch_size: Patches per network call on the fast path.
    """

    kind = "stardist"

    def __init__(
        self,
        model,
        source: str,
        alpha: float = PAPER_ALPHA,
        mask_mode: MaskMode = "probability",
        batch_size: int = 8,
    ):
        super().__init__(alpha=alpha, mask_mode=mask_mode)
        if not (isinstance(batch_size, int) and batch_size > 0):
            raise TeacherError(f"batch_size={batch_size!r}: must be a positive integer")
        config = model.config
        if config.n_channel_in != 3:
            raise TeacherError(
                f"StarDist model {source}: n_channel_in={config.n_channel_in}; an H&E teacher needs 3 (RGB)"
            )
        self.model = model
        self.source = str(source)
        self.batch_size = batch_size
        self.grid = tuple(int(g) for g in config.grid)
        # Height and width must be multiples of this (U-Net pooling times the output grid).
        div_by = model._axes_div_by(config.axes)
        axes = config.axes.replace("C", "")
        self.div_by = tuple(int(div_by[config.axes.index(a)]) for a in axes)
        import keras

        keras_model = model.keras_model
        # Only the probability head: the 32-ray distance head is not needed for Eq. 2.
        self._prob_model = keras.Model(inputs=keras_model.inputs, outputs=keras_model.outputs[0])
        self._device_probability, self._device_label = _device_fast_path(
            self._prob_model, self.grid, *NORMALIZE_PERCENTILES
        )

    @property
    def kind_label(self) -> str:
        """``stardist:<model folder or registered name>``."""
        return f"stardist:{Path(self.source).name}"

    @property
    def name(self) -> str:
        """The model and its mask setting, e.g. ``stardist:demo[alpha=0.1]``."""
        mode = "instances" if self.mask_mode == "instances" else f"alpha={self.alpha:g}"
        return f"{self.kind_label}[{mode}]"

    # -- loading -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, name: str = "2D_versatile_he", intra_op_threads: int | None = None, **kwargs
    ) -> StarDistTeacher:
        """A registered StarDist model, downloaded once into StarDist's cache.

        The cache is Keras's: ``$KERAS_HOME/models/StarDist2D/<name>/`` (``~/.keras`` when
        ``KERAS_HOME`` is unset); set ``KERAS_HOME`` before the first teacher loads.

        Raises:
            TeacherError: Unknown name, or not cached and the download fails (offline).
        """
        configure_tensorflow(intra_op_threads)
        folder = pretrained_folder(name)  # StarDist's own download and cache
        return cls.from_folder(folder, intra_op_threads=intra_op_threads, source=name, **kwargs)

    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike,
        require_weights: bool = True,
        intra_op_threads: int | None = None,
        source: str | None = None,
        **kwargs,
    ) -> StarDistTeacher:
        """A StarDist model folder: ``config.json``, ``thresholds.json`` and ``weights_best.h5``.

        Defaults for ``alpha`` and ``mask_mode`` are read from ``histokd_teacher.json`` in the
        folder when present (the training job writes it); keyword arguments other than None
        override them. Without that file the defaults are the paper's (alpha 0.5).

        Args:
            folder: The model folder.
            require_weights: Refuse a folder without weights. False builds the network with
                random weights (tests use this to run the published architecture offline).
            intra_op_threads: TensorFlow CPU threads (see :func:`configure_tensorflow`).
            source: Name to report; the folder path when None.
            **kwargs: ``alpha``, ``mask_mode``, ``batch_size``.

        Raises:
            TeacherError: The folder or a needed file is missing or the config is invalid.
        """
        folder = check_model_folder(folder, require_weights=require_weights)
        kwargs = folder_defaults(folder, kwargs)
        configure_tensorflow(intra_op_threads)
        from stardist.models import StarDist2D

        printed = io.StringIO()  # StarDist prints what it loads; keep it for the log
        with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
            warnings.simplefilter("ignore")  # "Couldn't find any network weights" when allowed
            try:
                model = StarDist2D(None, name=folder.name, basedir=str(folder.parent))
            except (ValueError, FileNotFoundError, KeyError, TypeError) as exc:
                raise TeacherError(f"{folder}: StarDist cannot load this model folder: {exc}") from exc
        log.debug("StarDist %s: %s", folder, printed.getvalue().strip())
        model.basedir = None  # read-only: never write into the folder (it may be a package asset)
        return cls(model, source=source or str(folder), **kwargs)

    # -- inference -----------------------------------------------------------------------
    def _pad(self, x: np.ndarray) -> np.ndarray:
        """Reflect-pad height and width up to the multiples the network needs.

        Padding commutes with the per-image normalisation as long as the percentiles come
        from the unpadded image, which both paths ensure.
        """
        pads = [(0, 0)]
        for size, div in zip(x.shape[1:3], self.div_by, strict=True):
            pads.append((0, (-size) % div))
        pads.append((0, 0))
        if all(p == (0, 0) for p in pads):
            return x
        return np.pad(x, pads, mode="reflect" if min(x.shape[1:3]) > 1 else "edge")

    def grid_probability(self, images: np.ndarray) -> np.ndarray:
        """StarDist's object probability at the model's grid, float32 (N, ceil(H/gy), ceil(W/gx))."""
        images = check_images(images, self.name)
        n, height, width = images.shape[:3]
        gy, gx = self.grid
        out = np.empty((n, -(-height // gy), -(-width // gx)), np.float32)
        for start in range(0, n, self.batch_size):
            chunk = images[start : start + self.batch_size]
            x = self._pad(percentile_normalize(chunk))
            prob = np.asarray(self._prob_model.predict_on_batch(x))[..., 0]
            out[start : start + len(chunk)] = prob[:, : out.shape[1], : out.shape[2]]
        return out

    def _on_device(self, images: np.ndarray, fn, *args) -> np.ndarray:
        height, width = images.shape[1:3]
        parts = []
        for start in range(0, len(images), self.batch_size):
            x = self._pad(images[start : start + self.batch_size])
            parts.append(np.asarray(fn(x, np.int32(height), np.int32(width), *args)))
        return np.concatenate(parts)

    def probability(self, images: np.ndarray) -> np.ndarray:
        """StarDist's object probability upsampled to the patch size, float32 (N, H, W)."""
        return self._on_device(check_images(images, self.name), self._device_probability)

    def pseudo_label(self, images: np.ndarray) -> np.ndarray:
        """RCKD Eq. 2 on the device (fast path), or ``predict_instances`` masks; uint8 (N, H, W)."""
        images = check_images(images, self.name)
        if self.mask_mode == "instances":
            return (self.instance_labels(images) > 0).astype(np.uint8)
        return self._on_device(images, self._device_label, np.float32(self.alpha))

    def instance_labels(self, images: np.ndarray) -> np.ndarray:
        """StarDist's instance segmentation (``predict_instances``, with NMS), int32 (N, H, W)."""
        images = check_images(images, self.name)
        out = np.empty(images.shape[:3], np.int32)
        for i, image in enumerate(images):
            x = percentile_normalize(image[None])[0]
            labels, _ = self.model.predict_instances(
                x, axes="YXC", normalizer=None, show_tile_progress=False, verbose=False
            )
            out[i] = labels
        return out
