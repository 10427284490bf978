"""README command 1: `python jobs/rckd_pretrain.py` with no arguments runs the demo, offline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_demo_runs_offline_without_tensorflow_and_the_student_learns(
    tmp_path, record_property, blocked_imports_env
):
    """README command 1 installs no TensorFlow: the demo runs with the TensorFlow stack unimportable
    (in the driver and in every Ray worker it starts)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_TRAIN_ENABLE_PRINT_PATCH")
    }
    env = blocked_imports_env(("tensorflow", "keras", "stardist", "csbdeep"), base=env)
    env.update(HF_HUB_OFFLINE="1", KERAS_HOME=str(tmp_path / "keras"))  # nothing may be downloaded
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "rckd_pretrain.py")], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=900,
    )  # fmt: skip
    wall = time.monotonic() - started
    assert out.returncode == 0, out.stderr[-3000:]
    epochs = re.findall(r"epoch (\d+)/8 .* IoU (\d\.\d+) ", out.stdout + out.stderr)
    assert [int(e) for e, _ in epochs] == list(range(1, 9)), epochs  # a line per epoch, each once
    ious = [float(iou) for _, iou in epochs]
    record_property("demo", {"wall_seconds": round(wall), "ious": ious})
    assert max(ious[-2:]) > ious[0] + 0.3, ious
    backbone = re.search(r"^backbone:\s+(\S+)$", out.stdout, re.M)
    assert (
        backbone
        and Path(backbone.group(1)).is_file()
        and Path(backbone.group(1)).is_relative_to(tmp_path)
    )
    assert (tmp_path / "demo_data").is_dir() and (tmp_path / "runs" / "mlflow.db").is_file()
    # a quiet console (histokd.console): the job's own lines; the rest in the run's log file
    console = out.stdout + out.stderr
    assert len(console.splitlines()) <= 40, console
    assert "Warning" not in console and "Traceback" not in console, console
    assert "Running Dataset" not in console and "Execution plan" not in console, console
    log_file = tmp_path / "runs" / "rckd" / "logs" / "driver.log"
    assert f"full log: {log_file}" in out.stdout.splitlines()
    assert "epoch 8/8" in log_file.read_text()
    assert wall < 600, f"the demo took {wall:.0f} s; README promises minutes"
