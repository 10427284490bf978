"""Teachers: nuclei pseudo labels for RCKD pretraining (Sec. 2.2.1, Eqs. 1-2).

Pick one by name with :func:`build_teacher`; every teacher has ``name``,
``probability(images)`` and ``pseudo_label(images)`` (see :class:`Teacher`).
"""

from histokd.teachers.base import MASK_MODES, PAPER_ALPHA, Teacher, TeacherError, TeacherSettings
from histokd.teachers.registry import (
    DEMO_TEACHER_DIR,
    available_teachers,
    build_teacher,
    register_teacher,
)

__all__ = [
    "DEMO_TEACHER_DIR",
    "MASK_MODES",
    "PAPER_ALPHA",
    "Teacher",
    "TeacherError",
    "TeacherSettings",
    "available_teachers",
    "build_teacher",
    "register_teacher",
]
