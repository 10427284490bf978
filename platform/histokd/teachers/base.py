"""What a teacher is: probabilities of nuclei, thresholded into RCKD's pseudo label.

RCKD Sec. 2.2.1: the teacher predicts a nuclei probability map ``y = f_teacher(x)`` (Eq. 1)
and the student learns the binary map ``N(x) = [y >= alpha]`` (Eq. 2, alpha = 0.5).

StarDist's "probability" is an *object probability*: the normalised distance to the nearest
boundary of the nucleus a pixel lies in (1 at a centre, 0 at the edge). Eq. 2 taken literally,
alpha = 0.5, therefore marks the inner half of each nucleus (its core); alpha around 0.1-0.2
recovers whole nuclei (``/work/shared/TEACHER.md`` measures it). alpha and the mask mode are
ordinary settings of every teacher so that either can be chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "MASK_MODES",
    "MaskMode",
    "PAPER_ALPHA",
    "Teacher",
    "TeacherError",
    "ThresholdTeacher",
    "TeacherSettings",
    "check_images",
]

MaskMode = Literal["probability", "instances"]
MASK_MODES: tuple[str, ...] = ("probability", "instances")
PAPER_ALPHA = 0.5  # RCKD Eq. 2: alpha = 0.5


class TeacherError(ValueError):
    """A teacher that cannot be built or used: names the spec, file or field and what is allowed."""


@runtime_checkable
class Teacher(Protocol):
    """The interface every pseudo-label teacher offers.

    Attributes:
        name: Short identity of the teacher and its settings (logged, and part of cache keys).
    """

    name: str

    def probability(self, images: np.ndarray) -> np.ndarray:
        """Nuclei probability y of RCKD Eq. 1, float32 (N, H, W) in [0, 1], for uint8 (N, H, W, 3)."""
        ...

    def pseudo_label(self, images: np.ndarray) -> np.ndarray:
        """RCKD's binary map N(x) (Eq. 2), uint8 (N, H, W) in {0, 1}, for uint8 (N, H, W, 3)."""
        ...


@dataclass(frozen=True)
class TeacherSettings:
    """How probabilities become a pseudo label.

    Attributes:
        alpha: Threshold of RCKD Eq. 2 on the probability map (paper: 0.5).
        mask_mode: ``"probability"``: ``probability >= alpha`` (Eq. 2, fast, no NMS);
            ``"instances"``: pixels inside the teacher's detected instances (StarDist's
            ``predict_instances`` labels > 0; alpha is not used).
    """

    alpha: float = PAPER_ALPHA
    mask_mode: MaskMode = "probability"

    def __post_init__(self) -> None:
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float))
            or not 0.0 < self.alpha <= 1.0
        ):
            raise TeacherError(
                f"alpha={self.alpha!r}: must be a number in (0, 1] (RCKD Eq. 2 uses 0.5)"
            )
        if self.mask_mode not in MASK_MODES:
            raise TeacherError(f"mask_mode={self.mask_mode!r}: allowed: {', '.join(MASK_MODES)}")


def check_images(images: np.ndarray, who: str = "teacher") -> np.ndarray:
    """The batch as a C-contiguous uint8 (N, H, W, 3) array, or one clear error.

    Args:
        images: RGB patches; a single (H, W, 3) image is accepted as a batch of one.
        who: Name used in the error message.

    Raises:
        TeacherError: Wrong dtype, rank, channel count or an empty batch.
    """
    images = np.asarray(images)
    shape = images.shape
    if images.ndim == 3 and shape[-1] == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise TeacherError(
            f"{who}: images of shape {shape}: expected (N, H, W, 3) RGB (or one (H, W, 3))"
        )
    if images.dtype != np.uint8:
        raise TeacherError(f"{who}: images of dtype {images.dtype}: expected uint8 RGB in [0, 255]")
    if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise TeacherError(f"{who}: empty batch of shape {images.shape}")
    return np.ascontiguousarray(images)


class ThresholdTeacher:
    """Base for teachers whose pseudo label is their probability thresholded (RCKD Eq. 2).

    Subclasses implement :meth:`probability` and, if they support the ``instances`` mask
    mode, :meth:`instance_labels`.

    Args:
        alpha: Threshold of RCKD Eq. 2; None takes the paper's 0.5.
        mask_mode: ``"probability"`` or ``"instances"`` (see :class:`TeacherSettings`); None
            takes ``"probability"``.
    """

    kind: str = "teacher"

    def __init__(
        self, alpha: float | None = PAPER_ALPHA, mask_mode: MaskMode | None = "probability"
    ):
        self.settings = TeacherSettings(
            alpha=PAPER_ALPHA if alpha is None else alpha, mask_mode=mask_mode or "probability"
        )

    @property
    def alpha(self) -> float:
        """Threshold of RCKD Eq. 2."""
        return self.settings.alpha

    @property
    def mask_mode(self) -> str:
        """``"probability"`` or ``"instances"``."""
        return self.settings.mask_mode

    @property
    def name(self) -> str:
        """The teacher and its mask setting, e.g. ``deconvolution[alpha=0.5]``."""
        if self.mask_mode == "instances":
            return f"{self.kind}[instances]"
        return f"{self.kind}[alpha={self.alpha:g}]"

    def probability(self, images: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """Nuclei probability (RCKD Eq. 1), float32 (N, H, W) in [0, 1]."""
        raise NotImplementedError

    def instance_labels(self, images: np.ndarray) -> np.ndarray:
        """Instance label images (N, H, W) int32, 0 = background."""
        raise TeacherError(
            f"{self.kind}: mask_mode='instances' is not supported by this teacher; allowed: 'probability'"
        )

    def pseudo_label(self, images: np.ndarray) -> np.ndarray:
        """RCKD Eq. 2 (or instance masks), uint8 (N, H, W) in {0, 1}."""
        images = check_images(images, self.kind)
        if self.mask_mode == "instances":
            return (self.instance_labels(images) > 0).astype(np.uint8)
        return (self.probability(images) >= self.alpha).astype(np.uint8)  # RCKD Eq. 2

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"
