"""The StarDist teacher in PyTorch: RCKD's pseudo labels (Sec. 2.2.1, Eq. 1-2) on any device.

The network (:mod:`histokd.teachers.stardist_net`) is StarDist2D's, with its Keras weights. The
whole label runs where the network runs: uint8 patches go in, the normalisation, padding, the
probability head, StarDist's grid upsampling, any resampling to the teacher's scale and RCKD
Eq. 2 run as tensor operations (:mod:`histokd.teachers.stardist_base`, shared with the
TensorFlow backend), and uint8 masks come out.

On CUDA, ``precision="bf16"`` runs the network under bfloat16 autocast (normalisation and
thresholding stay float32); channels_last is used on every device; ``compile=True`` wraps the
network in ``torch.compile``. Nothing here imports TensorFlow, Ray, OpenSlide or MLflow.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from histokd.teachers.base import TeacherError
from histokd.teachers.stardist_base import StarDistTeacherBase
from histokd.teachers.stardist_models import check_model_folder, folder_defaults, pretrained_folder
from histokd.teachers.stardist_net import StarDistNet, StarDistNetConfig, load_keras_weights

__all__ = ["PRECISIONS", "TorchStarDistTeacher", "keep_freed_memory"]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
CONVERTED_WEIGHTS = "weights_best.torch.pt"  # beside a cached pretrained model's weights_best.h5


def keep_freed_memory() -> bool:
    """Let glibc keep large freed blocks in the heap instead of returning them to the kernel.

    A 1024 px batch makes activations of hundreds of MB; glibc serves each with a fresh mmap
    (anything over 32 MB), so every layer of every batch page-faults its output in again.
    TensorFlow's own allocator reuses its memory; torch on the CPU does not. Raising glibc's
    mmap and trim thresholds makes torch reuse the pages too: the teacher's 3->16 and 16->16
    convolutions at 1024 px took 111 and 187 ms, then 19 and 100 ms, as TensorFlow's did
    (2-core VM, batch 4). The cost: the process keeps its peak heap (a teacher's is steady).

    Returns:
        Whether it was applied (glibc only; elsewhere nothing changes).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # malloc.h
    return bool(
        libc.mallopt(m_mmap_threshold, ctypes.c_int(2**30))
        and libc.mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1))
        and libc.mallopt(m_top_pad, ctypes.c_int(2**28))
    )


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise TeacherError(
            f"device={device!r}: not a torch device; allowed: auto, cpu, cuda, cuda:N"
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TeacherError(
            f"device={str(device)!r}: CUDA is not available here; allowed: auto, cpu"
        )
    return device


class TorchStarDistTeacher(StarDistTeacherBase):
    """Pseudo labels from a StarDist2D model, in PyTorch (RCKD Sec. 2.2.1).

    Build one with :meth:`from_folder` or :meth:`from_pretrained`, or through
    :func:`histokd.teachers.build_teacher` (the default backend).

    Args:
        net: The network, weights loaded.
        source: Where the model came from, for names and logs.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        precision: ``"fp32"``, or ``"bf16"`` (autocast of the network on CUDA; fp32 elsewhere).
        compile: Wrap the network in ``torch.compile`` (Inductor, weights frozen).
        intra_op_threads: CPU threads for torch in this process (a Ray actor's CPU share).
        **settings: The pipeline's settings (``alpha``, ``normalization``, ``teacher_mpp``,
            ``patch_mpp``, ...: see :class:`~histokd.teachers.stardist_base.StarDistTeacherBase`).
            ``mask_mode="instances"`` (StarDist's NMS) needs the TensorFlow backend.
    """

    def __init__(
        self,
        net: StarDistNet,
        source: str,
        device: str | torch.device | None = "auto",
        precision: str = "fp32",
        compile: bool = False,  # noqa: A002 - torch's own word for it
        intra_op_threads: int | None = None,
        **settings,
    ):
        if settings.get("mask_mode") == "instances":
            raise TeacherError(
                "mask_mode='instances' runs StarDist's NMS, which needs TensorFlow: build the teacher with "
                "build_teacher(), which runs it with backend='tensorflow' (histokd's 'tf-cpu' or 'tf-gpu' extra)"
            )
        if precision not in PRECISIONS:
            raise TeacherError(f"precision={precision!r}: allowed: {', '.join(PRECISIONS)}")
        if net.config.n_channel_in != 3:
            raise TeacherError(
                f"StarDist model {source}: n_channel_in={net.config.n_channel_in}; an H&E teacher needs 3 (RGB)"
            )
        device = _resolve_device(device)
        if device.type == "cpu":
            keep_freed_memory()
        super().__init__(source, net.config.grid, net.config.div_by, device=device, **settings)
        if intra_op_threads is not None:
            torch.set_num_threads(max(1, int(intra_op_threads)))
        self.precision = precision
        self.net = (
            net.eval().requires_grad_(False).to(self.device, memory_format=torch.channels_last)
        )
        # Freezing lets Inductor fold the weights and fuse each convolution with its activation.
        self._forward = torch.compile(self.net, options={"freezing": True}) if compile else self.net

    def _network_probability(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        bf16 = self.precision == "bf16" and self.device.type == "cuda"
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16),
        ):
            return self._forward(x).to(torch.float32)

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

        Settings default to the folder's ``histokd_teacher.json`` (the training job and
        ``jobs/check_teacher.py`` write it), else the paper's (alpha 0.5, joint normalisation);
        keyword arguments other than None override them.

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
        kwargs = folder_defaults(folder, kwargs, source)
        config_path = folder / "config.json"
        net = StarDistNet(
            StarDistNetConfig(json.loads(config_path.read_text()), source=str(config_path))
        )
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
            log.warning(
                "%s: converted weights unreadable (%s); converting %s again",
                converted,
                exc,
                h5.name,
            )
    load_keras_weights(net, h5)
    try:
        tmp = converted.with_suffix(f".tmp{os.getpid()}")
        torch.save({"h5_sha256": digest, "state_dict": net.state_dict()}, tmp)
        os.replace(tmp, converted)
    except OSError as exc:  # a read-only cache still works, it converts on every load
        log.info("%s: converted weights not cached (%s)", converted, exc)
