"""Peak memory of the whole pretraining job with S_n and 10 x S_n patches.

The job streams patches (manifest -> read tasks -> teacher actors -> trainer), so its memory
should not grow with the number of patches. Each run starts a fresh process (and so a fresh
local Ray); the peak is the largest sum of proportional set sizes (PSS: shared pages split
between the processes that share them) over the job's whole process tree, sampled every 0.5 s.

    python benchmarks/memory.py --out benchmarks/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def tree_pss(root: psutil.Process) -> int:
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def run_job(args: list[str], log: Path) -> dict:
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "rckd_pretrain.py"), *args], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        root = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            try:
                peak = max(peak, tree_pss(root))
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.5)
    if proc.returncode != 0:
        raise RuntimeError(f"job failed ({proc.returncode}); see {log}")
    return {"peak_pss_mib": round(peak / 2**20, 1), "seconds": round(time.monotonic() - start, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/memory.json")
    p.add_argument("--num-patches", type=int, default=64, help="S_n; the second run uses 10 x S_n")
    p.add_argument("--teacher", default="deconvolution")
    args = p.parse_args()

    from histokd.synthetic import make_demo_slides

    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    slides = make_demo_slides(work / "slides", n=4, seed=0)
    results = []
    for n in (args.num_patches, 10 * args.num_patches):
        job = [
            "--slides", str(work / "slides"), "--teacher", args.teacher, "--storage-path", str(work / f"runs{n}"),
            "--num-patches", str(n), "--patch-size", "128", "--input-size", "64", "--batch-size", "16",
            "--epochs", "1", "--warmup-epochs", "0", "--holdout-fraction", "0.05",
        ]  # fmt: skip
        row = {"num_patches": n, **run_job(job, work / f"job{n}.log")}
        results.append(row)
        print(json.dumps(row), flush=True)
    ratio = results[1]["peak_pss_mib"] / results[0]["peak_pss_mib"]
    report = {
        "benchmark": "peak memory (PSS over the process tree) of jobs/rckd_pretrain.py, S_n vs 10 x S_n",
        "slides": len(slides),
        "teacher": args.teacher,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {round(psutil.virtual_memory().total / 2**30)} GiB",
        "date": time.strftime("%Y-%m-%d"),
        "results": results,
        "ratio_10x": round(ratio, 3),
        "goal": "at most 1.2",
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"ratio {ratio:.3f}; wrote {args.out}")


if __name__ == "__main__":
    main()
