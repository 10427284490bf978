"""`histokd.cluster.init_ray`: a new local cluster unless told otherwise, and its workers' settings."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from histokd.cluster import check_ray_address

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, os, psutil, ray
from histokd.cluster import init_ray
init_ray(num_cpus=1, include_dashboard=False)
print("local" if ray.get_runtime_context().gcs_address else "none")
@ray.remote(num_cpus=0)
def worker_env():
    return os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH")
print("worker", ray.get(worker_env.remote()))
init_ray()  # a second call is a no-op
listening = {}  # every process of the cluster (all started by this driver): name -> addresses
for process in psutil.Process().children(recursive=True):
    try:
        found = [c.laddr.ip for c in process.net_connections("inet") if c.status == "LISTEN"]
        if found:
            listening.setdefault(process.name(), []).extend(found)
    except psutil.Error:
        pass
print("listening", json.dumps(listening))
print("session", ray._private.worker._global_node.get_session_dir_path())
"""


@pytest.fixture(scope="module")
def local_cluster_report(tmp_path_factory) -> dict[str, str]:
    """What SCRIPT printed: a new local cluster started through init_ray, in its own process."""
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
        cwd=tmp_path_factory.mktemp("cluster"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[0] == "local", out.stdout
    return dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)


def test_local_cluster_workers_print_once(local_cluster_report):
    """Workers of a new local cluster run without Ray Train's print patch (it doubled every line)."""
    assert local_cluster_report["worker"] == "0"


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.0.0.1


def test_local_cluster_listens_on_loopback_only_and_leaves_no_session_folder(
    local_cluster_report,
):
    """A job's own Ray: the GCS, raylet and workers take no connections from other machines,
    and /tmp/ray/session_* goes with the process."""
    printed = local_cluster_report
    listening = json.loads(printed["listening"])
    assert {"gcs_server", "raylet"} <= set(listening), listening
    for name, ips in listening.items():
        assert all(_loopback(ip) for ip in ips), f"{name} listens on {ips}"
    session = Path(printed["session"])
    assert session.name.startswith("session_") and session.parent.is_dir()
    assert not session.exists(), f"{session} left behind"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_ray_address_fails_in_seconds_naming_it(tmp_path):
    """A job's --ray-address where no cluster runs: one line and exit 2 within 30 s (Ray alone
    warns and waits without end)."""
    address = f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "build_manifest.py"), "--slides", str(tmp_path),
         "--storage-path", str(tmp_path), "--ray-address", address],
        env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    seconds = time.monotonic() - started
    assert out.returncode == 2, out.stderr[-2000:]
    assert seconds < 30, f"{seconds:.0f} s"
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"ray_address='{address}': no Ray cluster answers at" in errors[0]
    assert "Traceback" not in out.stderr


def test_check_ray_address_forms(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    dead = _free_port()
    with pytest.raises(
        ValueError,
        match=rf"^ray_address='ray://127\.0\.0\.1:{dead}': no Ray cluster answers at 127\.0\.0\.1:{dead}: .*; allowed: ",
    ):
        check_ray_address(f"ray://127.0.0.1:{dead}")
    with pytest.raises(ValueError, match=r"^\$RAY_ADDRESS='headnode': not host:port; allowed: "):
        check_ray_address("headnode", name="$RAY_ADDRESS")
    # auto: the cluster Ray recorded in its temporary folder, here a head that is gone. Ray's
    # "auto" also joins any GCS process it finds running (this session's own Ray, in a full
    # run), so that scan is made to find none: a machine with only the dead head's record.
    import ray._private.services as services

    monkeypatch.setattr(services, "find_gcs_addresses", lambda: [])
    (tmp_path / "ray_current_cluster").write_text(f"127.0.0.1:{dead}\n")
    with pytest.raises(
        ValueError,
        match=rf"^ray_address='auto': no Ray cluster answers at \S+:{dead} \(the cluster it names",
    ):
        check_ray_address("auto", temp_dir=str(tmp_path))
    with socket.socket() as server:  # something listening: the address passes
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert check_ray_address(f"127.0.0.1:{port}") == f"127.0.0.1:{port}"
        assert check_ray_address(f"ray://localhost:{port}") == f"localhost:{port}"
