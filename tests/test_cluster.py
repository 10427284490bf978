"""`histokd.cluster.init_ray`: a new local cluster unless told otherwise, and its workers' settings."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import os, ray
from histokd.cluster import init_ray
init_ray(num_cpus=1, include_dashboard=False)
print("local" if ray.get_runtime_context().gcs_address else "none")
@ray.remote(num_cpus=0)
def worker_env():
    return os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH")
print("worker", ray.get(worker_env.remote()))
init_ray()  # a second call is a no-op
ray.shutdown()
"""


def test_local_cluster_workers_print_once(tmp_path):
    """Workers of a new local cluster run without Ray Train's print patch (it doubled every line)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_TRAIN_ENABLE_PRINT_PATCH")
    }
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["local", "worker 0"], out.stdout
