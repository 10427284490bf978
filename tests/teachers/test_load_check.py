"""A teacher is loaded once on the driver before any Ray work: a broken model folder fails in
seconds with one line, not inside the Ray Data actor pool with retries."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from histokd.teachers import DEMO_TEACHER_DIR, TeacherError
from histokd.teachers.registry import check_teacher_loads

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def broken_teacher(tmp_path) -> Path:
    """The demo StarDist teacher with a config.json cut short (its weights intact)."""
    folder = tmp_path / "broken_teacher"
    shutil.copytree(DEMO_TEACHER_DIR, folder)
    config = folder / "config.json"
    config.write_text(config.read_text()[:40])
    return folder


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_a_broken_config_json_is_one_line(broken_teacher, backend):
    with pytest.raises(TeacherError) as error:
        check_teacher_loads(
            str(broken_teacher), backend=backend, alpha=0.5, mask_mode="probability"
        )
    message = str(error.value)
    assert message.startswith(f"teacher={str(broken_teacher)!r} cannot be loaded: ")
    assert f"{broken_teacher / 'config.json'}: not valid JSON" in message and "\n" not in message


def _damage_weights(folder: Path) -> None:
    (folder / "weights_best.h5").write_bytes(b"not hdf5")


def _damage_field(folder: Path) -> None:  # valid JSON, a value the network cannot take
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_rays": "many"}))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [(_damage_weights, r"weights_best\.h5: not a readable HDF5 weights file"),
     (_damage_field, r"ValueError: invalid literal for int\(\) with base 10: 'many'")],
)  # fmt: skip
def test_whatever_fails_to_load_is_one_line(tmp_path, damage, reason):
    folder = tmp_path / "teacher"
    shutil.copytree(DEMO_TEACHER_DIR, folder)
    damage(folder)
    with pytest.raises(
        TeacherError, match=rf"^teacher={str(folder)!r} cannot be loaded: .*{reason}"
    ):
        check_teacher_loads(str(folder))


def test_a_good_teacher_loads():
    check_teacher_loads("demo", alpha=0.5, mask_mode="probability", patch_mpp=0.5)
    check_teacher_loads("deconvolution", alpha=0.3)
    with pytest.raises(TeacherError, match="teacher='deconvolution' cannot be loaded: .*alpha"):
        check_teacher_loads("deconvolution", alpha=7)


def test_pretraining_with_a_broken_teacher_stops_before_ray(broken_teacher, tmp_path):
    code = (
        "import sys, time\n"
        "started = time.monotonic()\n"
        "from histokd.cli import run_job\n"
        "from histokd.pretrain.config import PretrainConfig\n"
        "from histokd.pretrain.job import run_pretraining\n"
        "status = run_job(PretrainConfig, run_pretraining, sys.argv[1:])\n"
        "elapsed = time.monotonic() - started\n"
        "import ray\n"
        "print(f'exit {status}, ray started: {ray.is_initialized()}, tensorflow: {\"tensorflow\" in sys.modules}')\n"
        "print(f'{elapsed:.1f}')\n"
    )
    args = [
        "--teacher",
        str(broken_teacher),
        "--storage-path",
        str(tmp_path / "runs"),
        "--run-name",
        "broken",
    ]
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    *_, verdict, elapsed = out.stdout.strip().splitlines()
    assert verdict == "exit 2, ray started: False, tensorflow: False", out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: teacher={str(broken_teacher)!r} cannot be loaded: {broken_teacher / 'config.json'}: not valid JSON ("
    ), out.stderr[-3000:]
    # the job's own time, imports and config checks included (Ray's retries took minutes)
    assert float(elapsed) < 30
