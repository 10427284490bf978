"""`ray start --head`, `ray job submit ... jobs/rckd_pretrain.py`, `ray stop`: how users run it.

`ray stop` ends every Ray process of the user, so this test is ordered last (conftest.py) and
shuts down the session's in-process Ray first.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))

pytestmark = [pytest.mark.slow, pytest.mark.ray_cli]


def _run(args: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_ray_job_submit_then_ray_stop(tmp_path, demo_slides_dir):
    import ray

    ray.shutdown()  # the session's in-process cluster; `ray stop` would end it anyway
    env = dict(os.environ)
    # Ray 2.60 clusters require a token; the CLI sends it when RAY_AUTH_MODE=token.
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
    )
    start = _run(
        [RAY, "start", "--head", "--port=6391", "--dashboard-port=8276", "--num-cpus=2",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--disable-usage-stats"],
        env, 180,
    )  # fmt: skip
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        submit = _run(
            [RAY, "job", "submit", "--address", "http://127.0.0.1:8276", "--working-dir", ".", "--",
             sys.executable, "jobs/rckd_pretrain.py", "--slides", str(demo_slides_dir), "--teacher", "deconvolution",
             "--storage-path", str(tmp_path / "runs"), "--run-name", "submitted", "--epochs", "1", "--warmup-epochs", "0",
             "--num-patches", "16", "--patch-size", "256", "--input-size", "64", "--batch-size", "8",
             "--holdout-fraction", "0.2"],
            env, 900,
        )  # fmt: skip
        output = submit.stdout + submit.stderr
        assert submit.returncode == 0, output[-4000:]
        assert "succeeded" in output
        assert (tmp_path / "runs" / "submitted" / "backbone.pth").is_file()
        assert "backbone:" in output and "MLflow:" in output
    finally:
        stop = _run([RAY, "stop", "--force"], env, 120)
    assert stop.returncode == 0, stop.stderr[-2000:]
    status = _run([RAY, "status", "--address", "127.0.0.1:6391"], env, 60)
    assert status.returncode != 0  # nothing left listening
