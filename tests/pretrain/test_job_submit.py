"""The README's `ray job submit` lines, run as written on this machine.

The one change: the head's dashboard and job agent get free ports (`_own_ports`), since the
other pytest process's Rays may hold the defaults.

The lines from `source .venv/bin/activate` to `ls ...backbone.pth` run in one bash with
``set -e`` and ``HOME`` set to a temporary folder (so the token and ``~/histokd`` stay in it).
The README's last line, `ray stop`, ends every Ray process of the user; the test instead stops
the head it started by its own PIDs. It is ordered last (conftest.py) and shuts down the
session's in-process Ray first, which holds no fixed port but shares the machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"

pytestmark = [pytest.mark.slow, pytest.mark.ray_cli]


def readme_submit_block() -> list[str]:
    """The bash block of the README's "On a Ray cluster: `ray job submit`" section."""
    text = README.read_text()
    section = text[text.index("### On a Ray cluster: `ray job submit`") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README: no bash block under 'On a Ray cluster'"
    return [line for line in block.group(1).splitlines() if line.strip()]


def _strip_comment(line: str) -> str:
    return re.sub(r"\s+#\s.*$", "", line).strip()


def _session(gcs_port: int) -> str | None:
    """The name of the Ray session whose GCS listens on ``gcs_port``."""
    import psutil

    session = None
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "gcs_server" not in cmdline:
            continue
        try:
            ports = {c.laddr.port for c in proc.net_connections("tcp") if c.status == "LISTEN"}
        except psutil.Error:
            continue
        if gcs_port in ports:
            session = re.search(r"session_[0-9_-]+", cmdline).group(0)
    return session


def _session_processes(session: str | None):
    """Every process of that Ray session."""
    import psutil

    if session is None:
        return []
    found = {}
    for proc in psutil.process_iter(["cmdline"]):
        if session in " ".join(proc.info["cmdline"] or []):
            for p in [proc, *proc.children(recursive=True)]:
                found[p.pid] = p
    return list(found.values())


def _stop(processes) -> None:
    import psutil

    for proc in processes:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=20)
    for proc in alive:
        proc.kill()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _own_ports(lines: list[str]) -> list[str]:
    """The README's lines with the head's dashboard and job agent on ports no other Ray holds.

    Every local Ray started by a test in the other pytest process (xdist) binds the default
    dashboard port 8265 and job agent port 52365 too, for as long as that test runs. The
    README's head would then run without a job agent ("No available agent to submit job"), or
    its dashboard would move to another port and `ray job submit --address
    http://127.0.0.1:8265` would reach the other Ray. On a user's machine there is one Ray; here
    the head and the submit line get two free ports, and every other word stays as written.
    """
    dashboard, agent = _free_port(), _free_port()
    out = []
    for line in lines:
        if line.startswith("ray start --head"):
            line = line.replace(
                "ray start --head",
                f"ray start --head --dashboard-port={dashboard} --dashboard-agent-listen-port={agent}",
                1,
            )
        elif line.startswith("ray job submit"):
            assert "--address http://127.0.0.1:8265 " in line
            line = line.replace("127.0.0.1:8265", f"127.0.0.1:{dashboard}", 1)
        out.append(line)
    return out


def test_readme_block_is_the_mission_command():
    lines = [_strip_comment(line) for line in readme_submit_block()]
    assert lines[0] == "source .venv/bin/activate"
    submit = next(line for line in lines if line.startswith("ray job submit"))
    assert "--working-dir . -- python jobs/rckd_pretrain.py" in submit
    assert "--storage-path" not in submit  # the default, relative `runs`, must be safe
    assert lines[-1] == "ray stop"


def test_readme_ray_job_submit_lines(tmp_path):
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip(f"the README activates {REPO / '.venv'}; this suite runs {sys.prefix}")
    import ray

    ray.shutdown()  # the session's in-process cluster
    lines = _own_ports(readme_submit_block())
    assert _strip_comment(lines[-1]) == "ray stop"
    # Right after `ray start` on a busy machine the job agent may still be starting; Ray then
    # answers "No available agent to submit job, please try again later", as the README says,
    # and the submit line is tried again as it stands (for up to 2 minutes on a loaded machine).
    i = next(i for i, line in enumerate(lines) if line.startswith("ray job submit"))
    retry = (
        f"for attempt in $(seq 12); do out=$({lines[i]} 2>&1) && break; "
        'grep -q \'No available agent\' <<<"$out" || { echo "$out"; exit 1; }; sleep 10; done; '
        'echo "$out"'
    )
    script = "\n".join(["set -euo pipefail", *lines[:i], retry, *lines[i + 1 : -1]])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VIRTUAL_ENV"))}
    env["HOME"] = str(tmp_path)
    try:
        done = subprocess.run(
            ["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
        )
    finally:
        session = _session(6379)
        _stop(_session_processes(session))
        # `ray stop` also removes the address file that makes a later `ray.init()` join it
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(":6379"):
            current.unlink()
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert session is not None
    backbone = tmp_path / "histokd" / "runs" / "first-job" / "backbone.pth"
    assert backbone.is_file() and backbone.stat().st_size > 1_000_000
    assert "succeeded" in output
    assert "is relative and this is a Ray job" in output  # the storage line, said once
    assert output.count("storage_path='runs' is relative") == 1
    epoch_lines = [line for line in output.splitlines() if re.search(r"\bepoch 1/1\b", line)]
    assert len(epoch_lines) == 1, epoch_lines
    # Nothing of the run is left in Ray's temporary working directory.
    assert not list(Path("/tmp/ray", session).glob("runtime_resources/working_dir_files/*/runs"))
    assert _session_processes(session) == []
