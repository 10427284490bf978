"""The StarDist teacher of RCKD Sec. 2.2.1 run by StarDist itself: the TensorFlow backend.

RCKD uses StarDist (Schmidt et al. 2018) trained on MoNuSeg 2018 and TNBC, which is StarDist's
published ``2D_versatile_he`` model. The pseudo label needs only the network's object
probability (RCKD Eq. 1-2): a batch of patches goes through the Keras network and its
probability output is thresholded, with no star-convex polygons and no non-maximum suppression.
``mask_mode="instances"`` keeps StarDist's full ``predict_instances`` (NMS on the CPU).

The PyTorch backend (:mod:`histokd.teachers.stardist_torch`) is the default; this one stays for
training teachers, for instance masks and as the reference the PyTorch network is tested
against. TensorFlow is imported here only, lazily, when a model is loaded, so the PyTorch
training process never imports it; GPU memory growth is turned on first so a teacher shares
its GPU.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings

import numpy as np
import torch

from histokd.teachers.base import TeacherError, check_images
from histokd.teachers.stardist_base import StarDistTeacherBase, resample_images
from histokd.teachers.stardist_models import (
    DEFAULTS_FILE,
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
            tf.config.threading.set_inter_op_parallelism_threads(
                max(1, min(2, int(intra_op_threads)))
            )
        except RuntimeError:  # threads are fixed once TensorFlow has run an op
            pass
    return tf


class StarDistTeacher(StarDistTeacherBase):
    """Pseudo labels from StarDist itself: its Keras network in TensorFlow (RCKD Sec. 2.2.1).

    The pipeline around the network (normalisation, padding, grid upsampling, scale, Eq. 2) is
    the PyTorch backend's (:class:`~histokd.teachers.stardist_base.StarDistTeacherBase`, on the
    CPU), so both backends differ only in the network. Build one with :meth:`from_pretrained`
    or :meth:`from_folder`, or through ``build_teacher(..., backend="tensorflow")``; it is the
    backend ``mask_mode="instances"`` (StarDist's ``predict_instances``, with NMS) needs.

    Args:
        model: A loaded ``stardist.models.StarDist2D`` with three input channels.
        source: Where the model came from (a registered name or a folder), for names and logs.
        **settings: ``alpha``, ``mask_mode``, ``batch_size``, ``normalization``, ``teacher_mpp``,
            ``patch_mpp``, ... (see :class:`~histokd.teachers.stardist_base.StarDistTeacherBase`).
    """

    def __init__(self, model, source: str, **settings):
        config = model.config
        if config.n_channel_in != 3:
            raise TeacherError(
                f"StarDist model {source}: n_channel_in={config.n_channel_in}; an H&E teacher needs 3 (RGB)"
            )
        # Height and width must be multiples of this (U-Net pooling times the output grid).
        div_by = model._axes_div_by(config.axes)
        axes = config.axes.replace("C", "")
        div_by = tuple(int(div_by[config.axes.index(a)]) for a in axes)
        super().__init__(
            source, tuple(int(g) for g in config.grid), div_by, device="cpu", **settings
        )
        self.model = model
        import keras

        keras_model = model.keras_model
        # Only the probability head: the 32-ray distance head is not needed for Eq. 2.
        self._prob_model = keras.Model(inputs=keras_model.inputs, outputs=keras_model.outputs[0])

    def _network_probability(self, x: torch.Tensor) -> torch.Tensor:
        prob = self._prob_model.predict_on_batch(x.permute(0, 2, 3, 1).contiguous().numpy())
        return torch.from_numpy(np.asarray(prob)).permute(0, 3, 1, 2)

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
        kwargs = folder_defaults(folder, kwargs, source)
        configure_tensorflow(intra_op_threads)
        from stardist.models import StarDist2D

        printed = io.StringIO()  # StarDist prints what it loads; keep it for the log
        with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
            warnings.simplefilter("ignore")  # "Couldn't find any network weights" when allowed
            try:
                model = StarDist2D(None, name=folder.name, basedir=str(folder.parent))
            except (ValueError, FileNotFoundError, KeyError, TypeError) as exc:
                raise TeacherError(
                    f"{folder}: StarDist cannot load this model folder: {exc}"
                ) from exc
        log.debug("StarDist %s: %s", folder, printed.getvalue().strip())
        model.basedir = None  # read-only: never write into the folder (it may be a package asset)
        return cls(model, source=source or str(folder), **kwargs)

    # -- inference -----------------------------------------------------------------------
    def instance_labels(self, images: np.ndarray) -> np.ndarray:
        """StarDist's instance segmentation (``predict_instances``, with NMS), int32 (N, H, W).

        Run at the teacher's scale and brought back to the patch's pixels (nearest).
        """
        images = check_images(images, self.name)
        out = np.empty(images.shape[:3], np.int32)
        height, width = images.shape[1:3]
        size = self.teacher_size(height, width)
        for i, image in enumerate(images):
            x = torch.from_numpy(np.require(image[None], requirements="W"))
            if size != (height, width):
                x = resample_images(x, size)
            labels, _ = self.model.predict_instances(
                self.normalize(x)[0].numpy(),
                axes="YXC",
                normalizer=None,
                show_tile_progress=False,
                verbose=False,
            )
            if size != (height, width):
                index_y = np.minimum(
                    (np.arange(height) + 0.5) * size[0] / height, size[0] - 1
                ).astype(np.int64)
                index_x = np.minimum(
                    (np.arange(width) + 0.5) * size[1] / width, size[1] - 1
                ).astype(np.int64)
                labels = labels[index_y][:, index_x]
            out[i] = labels
        return out
