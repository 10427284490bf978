"""Teachers by one name or path."""

from __future__ import annotations

import sys

import pytest

from histokd.teachers import (
    DEMO_TEACHER_DIR,
    TeacherError,
    available_teachers,
    build_teacher,
    register_teacher,
)
from histokd.teachers.deconvolution import DeconvolutionTeacher


def test_names():
    assert {"deconvolution", "demo", "stardist"} <= set(available_teachers())


def test_deconvolution_needs_no_tensorflow():
    teacher = build_teacher("deconvolution", alpha=0.3)
    assert isinstance(teacher, DeconvolutionTeacher) and teacher.alpha == 0.3
    assert teacher.name == "deconvolution[alpha=0.3]"


def test_resolving_names_does_not_import_tensorflow():
    """The torch training process checks teacher specs; it must never load TensorFlow."""
    import subprocess

    code = (
        "import sys; from histokd.teachers import build_teacher, available_teachers;"
        "from histokd.teachers.stream import _check_spec; _check_spec('2D_versatile_he'); _check_spec('demo');"
        "build_teacher('deconvolution');"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("spec", ["nope", "./no/such/folder", ""])
def test_unknown_spec_lists_what_is_allowed(spec):
    with pytest.raises(TeacherError, match="allowed: deconvolution, demo, stardist|non-empty"):
        build_teacher(spec)


def test_no_such_folder_says_so():
    with pytest.raises(TeacherError, match=r"\(no such folder\)"):
        build_teacher("./no/such/folder")


def test_register_refuses_duplicates_and_reserved_characters():
    with pytest.raises(TeacherError, match="already registered"):
        register_teacher("demo")(lambda **kw: None)
    with pytest.raises(TeacherError, match="reserved"):
        register_teacher("my:teacher")(lambda **kw: None)


def test_demo_teacher_ships_small():
    files = {p.name: p.stat().st_size for p in DEMO_TEACHER_DIR.iterdir()}
    assert {"config.json", "thresholds.json", "weights_best.h5", "histokd_teacher.json"} <= set(
        files
    )
    assert sum(files.values()) < 4 * 2**20  # "a few MB at most"
