"""CPU-ms per record: the record cache's labelling pass against a later epoch's pass over it.

RCKD's sizes (Sec. 2.1.1, 2.2.1): 1024 px patches at 20x, resized to 512 px for the student, on
the synthetic demo slides with the shipped demo teacher, on a local Ray of ``--cpus`` CPUs. In
one run, for each record format (JPEG 95 and lossless PNG), into an empty cache:

- ``labelling``: ``pseudo_label_dataset`` with a record cache, whose first phase reads every
  patch from its slide, labels it with the teacher actor, resizes, encodes and writes the shard
  (what epoch 1 adds);
- ``epochs``: the dataset it returns, iterated ``--epochs`` times: each pass decodes the
  records (JPEG or PNG, packed bits) and nothing else (what every epoch costs, epoch 1 too);
- once, for reference, ``slide_pass``: the stream of a teacher in the training workers
  (``patch_dataset``), which decodes the slides and resizes: what each later epoch cost with
  the label-only cache of earlier versions, before its label read.

CPU time is that of the Ray worker processes (user + system, psutil), read every 0.1 s during
each pass (:class:`WorkerCpu`; an exited worker keeps its last reading). It counts Ray's own work
in those processes and each actor's start (its teacher load); the driver pulling the records
(and reading the workers' clocks) is given apart (``driver_cpu_ms_per_record``). The goal (issue 18): at least 3x fewer CPU-ms per
record in later epochs than in the labelling pass. Disk: the shards and their checksums, per
record and for RCKD's 400,000 records.

    python benchmarks/record_cache.py --out benchmarks/record_cache.json
    python benchmarks/record_cache.py --smoke   # seconds: a check that it runs, no figures
"""

from __future__ import annotations

import functools
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil

from harness import argument_parser, write_json

PAPER_RECORDS = 400_000  # RCKD Sec. 2.1.1: S_n


def _workers() -> dict[int, float]:
    """CPU seconds so far of each live Ray worker process (``ray::IDLE``, ``ray::MapBatches``,
    ``ray::MapWorker``...; not Ray's agents) of this process's local cluster."""
    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = proc.cmdline()
            if cmd and cmd[0].startswith("ray::") and not cmd[0].endswith("Agent"):
                times = proc.cpu_times()
                found[proc.pid] = times.user + times.system
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return found


class WorkerCpu:
    """CPU seconds the Ray workers spend while it runs, exited workers included.

    The raylet does not collect its exited workers' times, so a thread reads every live
    worker's every ``interval`` seconds and keeps the last reading of each: a worker that exits
    (an actor pool ends with its dataset) loses at most its last ``interval``.
    """

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self._stop = threading.Event()

    def __enter__(self) -> WorkerCpu:
        self._base = _workers()
        self._last = dict(self._base)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._last.update(_workers())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._last.update(_workers())
        self.seconds = sum(cpu - self._base.get(pid, 0.0) for pid, cpu in self._last.items())


def measured(fn) -> tuple[object, dict]:
    """``fn()``'s result, with the workers' and the driver's CPU seconds and the wall seconds."""
    time.sleep(1.0)  # the last pass's workers go idle
    with WorkerCpu() as workers:
        driver, wall = time.process_time(), time.perf_counter()
        result = fn()
        wall, driver = time.perf_counter() - wall, time.process_time() - driver
        time.sleep(0.5)  # tasks whose results the driver already holds finish their accounting
    return result, {"worker_cpu_s": workers.seconds, "driver_cpu_s": driver, "wall_s": wall}


def per_record(cost: dict, records: int) -> dict:
    return {
        "cpu_ms_per_record": round(1e3 * cost["worker_cpu_s"] / records, 2),
        "driver_cpu_ms_per_record": round(1e3 * cost["driver_cpu_s"] / records, 2),
        "wall_ms_per_record": round(1e3 * cost["wall_s"] / records, 2),
    }


def count_records(ds) -> int:
    return sum(len(b["patch_id"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))


def main() -> None:
    p = argument_parser(__doc__, Path(__file__).with_suffix(".json"))
    p.add_argument("--patch-size", type=int, default=1024, help="RCKD Sec. 2.1.1: 1024 at 20x")
    p.add_argument("--input-size", type=int, default=512, help="RCKD Sec. 2.2.1: 512")
    p.add_argument("--num-patches", type=int, default=192, help="records in the cache")
    p.add_argument("--slides", type=int, default=12, help="demo slides (4096 px, 16 cells each)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the records")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--batch-size", type=int, default=8, help="patches per teacher call")
    p.add_argument("--formats", nargs="+", default=["jpeg", "png"], choices=["jpeg", "png"])
    p.add_argument("--work", type=Path, default=None, help="folder for slides and caches (kept)")
    p.add_argument("--smoke", action="store_true", help="2 slides, 8 patches, 1 epoch: it runs")
    args = p.parse_args()
    if args.smoke:
        args.slides, args.num_patches, args.epochs = 2, 8, 1

    import ray

    from histokd.demos.synthetic import make_demo_slides
    from histokd.manifest import ManifestConfig, build_manifest
    from histokd.teachers.cache import RecordCache
    from histokd.teachers.stream import patch_dataset, pseudo_label_dataset

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-record-cache-"))
    slides = [str(s.path) for s in make_demo_slides(work / "slides", n=args.slides, seed=0)]
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    manifest = build_manifest(
        slides, work / "manifest", ManifestConfig(magnification=20.0, patch_size=args.patch_size,
                                                  num_patches=args.num_patches, seed=0),
        overwrite=True,
    ).manifest_path  # fmt: skip
    import pyarrow.parquet as pq

    records = pq.read_metadata(manifest).num_rows
    print(f"{records} patches of {args.patch_size} px from {len(slides)} demo slides", flush=True)

    report: dict = {"records": records, "patch_size": args.patch_size, "input_size": args.input_size,
                    "cpus": args.cpus, "epochs": args.epochs, "teacher": "demo",
                    "cpu_clock": "Ray worker processes, user + system (psutil, read every 0.1 s)", "formats": {}}  # fmt: skip
    count, cost = measured(lambda: count_records(patch_dataset(manifest, args.input_size)))
    assert count == records, (count, records)
    report["slide_pass"] = per_record(cost, records)
    print(f"slide pass (decode + resize): {report['slide_pass']}", flush=True)

    for fmt in args.formats:
        cache_dir = work / f"cache-{fmt}"
        ds, cost = measured(functools.partial(
            pseudo_label_dataset, manifest, "demo", input_size=args.input_size,
            cache_dir=cache_dir, batch_size=args.batch_size, record_format=fmt,
        ))  # fmt: skip
        labelling = per_record(cost, records)
        epochs = []
        for _ in range(args.epochs):
            count, cost = measured(functools.partial(count_records, ds))
            assert count == records, (count, records)
            epochs.append(per_record(cost, records))
        later = statistics.median(e["cpu_ms_per_record"] for e in epochs)
        n, nbytes = RecordCache.for_teacher(cache_dir, "demo", None, args.input_size, fmt).size()
        assert n == records, (n, records)
        report["formats"][fmt] = {
            "labelling": labelling,
            "epochs": epochs,
            "later_epoch_cpu_ms_per_record": later,
            "fewer_cpu_ms_in_later_epochs": round(labelling["cpu_ms_per_record"] / later, 2),
            "goal_3x_met": labelling["cpu_ms_per_record"] >= 3 * later,
            "fewer_cpu_ms_than_slide_pass": round(
                report["slide_pass"]["cpu_ms_per_record"] / later, 2
            ),
            "bytes_per_record": round(nbytes / records),
            "disk_gb_for_400k_records": round(nbytes / records * PAPER_RECORDS / 1e9, 1),
        }
        print(f"{fmt}: {report['formats'][fmt]}", flush=True)
    ray.shutdown()
    if args.smoke:
        print("smoke run: figures of 8 patches mean little (the actors' start dominates)")
    write_json(args.out, report)


if __name__ == "__main__":
    main()
