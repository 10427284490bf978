"""benchmarks/gpu_check.py runs on a bare machine: torch, timm, numpy and h5py, nothing heavier.

The smoke run (tiny sizes on the CPU) runs in a Python whose imports of TensorFlow, Ray,
OpenSlide, MLflow, pyarrow and pandas fail, as on a machine without them.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
BLOCKED = ("tensorflow", "ray", "openslide", "mlflow", "pyarrow", "pandas")


@pytest.fixture(scope="module")
def bare_env(blocked_imports_env) -> dict[str, str]:
    """Environment of a Python that cannot import the blocked packages."""
    return {**blocked_imports_env(BLOCKED), "HF_HUB_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}


def _load_gpu_check():
    sys.path.insert(0, str(SCRIPT.parent))  # it imports pretrain_gpu beside it
    try:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module  # its dataclass looks itself up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def test_blocker_blocks(bare_env: dict[str, str]) -> None:
    code = (
        "import importlib.util, sys\n"
        f"print([importlib.util.find_spec(n) is None for n in {BLOCKED!r}])\n"
        "import tensorflow\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=bare_env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    assert out.stdout.strip() == str([True] * len(BLOCKED))
    assert "ModuleNotFoundError: import of tensorflow halted" in out.stderr


def test_smoke_runs_without_heavy_packages(bare_env: dict[str, str], tmp_path: Path) -> None:
    report = tmp_path / "gpu_check.json"
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(report)],
        env=bare_env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    data = json.loads(report.read_text())
    assert data["errors"] == {}
    assert data["smoke"] is True

    teacher = data["teacher"]
    for key in ("fp32", "bf16"):
        assert teacher[key]["labels_per_s"] > 0
        assert teacher[key]["batch_size"] == 2
    agreement = teacher["bf16_agreement"]
    assert agreement["agreement_percent"] == 100.0  # on a CPU both precisions run fp32
    assert (
        0.01 < agreement["nuclei_fraction_fp32"] < 0.2
    )  # the demo teacher finds the synthetic nuclei
    assert "skipped" in teacher["bf16_compile"]

    student = data["student"]
    assert set(student["eager"]) == {"csat", "resnet18", "efficientnet_b0", "convnextv2_atto"}
    assert all(row["images_per_s"] > 0 for row in student["eager"].values())
    ratio = student["eager"]["csat"]["images_per_s"] / student["eager"]["resnet18"]["images_per_s"]
    assert student["csat_over_resnet18"]["eager"] == pytest.approx(ratio, rel=1e-2)
    assert all("skipped" in row for row in student["compiled"].values())

    step = data["rckd_step"]["eager"]
    assert step["images_per_s"] > 0
    assert step["profiled_steps"] == 1  # the step's range was found in the profiler's trace
    assert step["window_ms"] > 0
    assert step["gpu_busy_percent"] is None  # no CUDA

    memory = data["memory"]
    assert {"teacher fp32", "teacher bf16", "student eager csat", "rckd_step eager"} <= set(memory)
    assert all(
        row["process_peak_rss_mib"] > 0 and row["peak_gpu_mib"] is None for row in memory.values()
    )


def test_without_cuda_it_exits_2(bare_env: dict[str, str], tmp_path: Path) -> None:
    env = {**bare_env, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert "needs a CUDA GPU" in out.stderr
    assert not (tmp_path / "x.json").exists()


def test_busy_share_is_the_union_of_device_intervals_over_the_steps() -> None:
    gpu_check = _load_gpu_check()
    events = [
        {"cat": "user_annotation", "name": "rckd_step", "ts": 0, "dur": 100},
        {"cat": "user_annotation", "name": "rckd_step", "ts": 120, "dur": 80},  # window 0-200
        {"cat": "gpu_user_annotation", "name": "rckd_step", "ts": 0, "dur": 200},  # not GPU work
        {"cat": "cpu_op", "name": "aten::conv2d", "ts": 5, "dur": 150},
        {"cat": "kernel", "name": "a", "ts": 10, "dur": 20},
        {"cat": "kernel", "name": "b", "ts": 20, "dur": 30},  # overlaps a: 10-50 counts 40
        {"cat": "gpu_memcpy", "name": "HtoD", "ts": 60, "dur": 10},  # 10
        {"cat": "gpu_memset", "name": "set", "ts": 65, "dur": 15},  # 70-80 beyond the copy: 10
        {"cat": "kernel", "name": "c", "ts": 190, "dur": 60},  # clipped to 190-200: 10
        {"cat": "ac2g", "name": "flow", "ts": 30},
    ]
    share = gpu_check.busy_share(events)
    assert share["profiled_steps"] == 2
    assert share["window_ms"] == 0.2
    assert share["gpu_busy_ms"] == 0.07
    assert share["gpu_busy_percent"] == 35.0  # 70 us of 200

    with pytest.raises(RuntimeError, match="no 'rckd_step' range"):
        gpu_check.busy_share([{"cat": "kernel", "name": "a", "ts": 0, "dur": 5}])
