"""What every benchmark shares: its command line, its clocks, the machine's facts, its JSON report.

Only the standard library is imported here: :func:`sync` imports torch for a CUDA device only,
and :func:`machine` reads torch only where the benchmark imported it. So
``benchmarks/gpu_check.py`` still runs on a bare GPU machine, and a benchmark whose driver
stays free of torch stays so.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "timm", "numpy", "ray", "tensorflow")  # versions given where installed
GPU_QUERY = ("name", "memory_total_mib", "driver")
NVIDIA_SMI = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
              "--format=csv,noheader,nounits"]  # fmt: skip


def argument_parser(doc: str, out: Path, *flags: str) -> argparse.ArgumentParser:
    """A parser showing the benchmark's docstring, with ``flags`` (``--out``) for the JSON report."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(*(flags or ("--out",)), type=Path, default=out, help="the JSON report")
    return p


# -- clocks ---------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Seconds of one callable: its first call alone, then each timed round on two clocks.

    The CPU clock counts this process's CPU time: on a shared machine it leaves out the other
    jobs that the wall clock measures too.
    """

    first_s: float
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)


def sync(device: object = None) -> None:
    """Wait for the CUDA device's queued work (nothing to wait for on a CPU)."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], calls: int = 1, device: object = None) -> tuple[float, float]:
    """Wall and CPU seconds of ``calls`` calls of ``fn``, the device synchronized around them."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def take_turns(fns: Mapping[str, Callable[[], object]], rounds: int, calls: int = 1, warmup: int = 0,
               device: object = None, rotate: bool = False) -> dict[str, Timing]:  # fmt: skip
    """Time callables that take turns, so that a change in machine load hits all of them alike.

    Each one's first call is timed alone (it compiles, when compiling) and ``warmup`` untimed
    calls follow. Then in each round every callable runs ``calls`` timed calls, always in the
    same order or, with ``rotate``, starting one further on each round.
    """
    timings = {}
    for name, fn in fns.items():
        timings[name] = Timing(first_s=timed(fn, 1, device)[0])
        for _ in range(warmup):
            fn()
    names = list(fns)
    for r in range(rounds):
        shift = r % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            wall, cpu = timed(fns[name], calls, device)
            timings[name].wall_s.append(wall)
            timings[name].cpu_s.append(cpu)
    return timings


def per_second(items: float, seconds: list[float], key: str, ndigits: int = 3) -> dict:
    """``items`` per second of each round (``{key}_rounds``), their median and the best round."""
    rounds = [round(items / s, ndigits) for s in seconds]
    median = round(statistics.median(rounds), ndigits)
    # the best round: on a shared machine, the closest to a dedicated one
    return {key: median, f"{key}_best": max(rounds), f"{key}_rounds": rounds}


# -- the machine ----------------------------------------------------------------------------------
def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(v, 2) for v in os.getloadavg()]


def machine(device: object = None) -> dict:
    """Where the figures come from: CPU, memory, package versions, GPUs, load and commit.

    GPUs come from ``nvidia-smi``, which opens no CUDA context in this process; for a CUDA
    ``device`` (torch imported), torch adds the one in use (``gpu``).
    """
    facts = {
        "host": platform.node(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        **{name: version for name in PACKAGES if (version := _version(name))},
        "gpus": [
            dict(zip(GPU_QUERY, (f.strip() for f in line.split(",")), strict=False))
            for line in _output(NVIDIA_SMI).splitlines()
        ],  # fmt: skip
        "load_average": load_average(),
        "commit": _output(["git", "-C", str(REPO), "describe", "--always", "--dirty"]) or None,
    }
    torch = sys.modules.get("torch")  # its view only where the benchmark imported it
    if torch is not None:
        facts.update(torch_threads=torch.get_num_threads(), cuda=torch.version.cuda,
                     cpu_capability=torch.backends.cpu.get_cpu_capability())  # fmt: skip
    if torch is not None and str(device).startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        facts["gpu"] = {"name": props.name, "memory_mib": props.total_memory // 2**20,
                        "capability": f"{props.major}.{props.minor}"}  # fmt: skip
    return facts


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _output(command: list[str]) -> str:
    """What ``command`` prints, or "" where it cannot run (no ``nvidia-smi``, no git)."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


# -- the report -----------------------------------------------------------------------------------
def write_json(path: Path, payload: dict, device: object = None, quiet: bool = False) -> Path:
    """Write ``payload`` to ``path`` atomically, with the date, the command and the machine.

    What the payload gives itself (its own ``machine``, say) is kept as it is.
    """
    report = dict(payload)
    report.setdefault(
        "date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    )
    report.setdefault("command", shlex.join(["python", *sys.argv]))
    if "machine" not in report:
        report["machine"] = machine(device)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)
    if not quiet:
        print(f"written {path}", flush=True)
    return path
