"""What issue 17's safety checks cost, side by side with the work they guard.

- checkpoint: a CSAT + U-Net pretraining state (model and optimizer momentum, as the loop saves
  it) written with ``torch.save`` alone against ``torch.save`` + ``resume.seal_folder``
  (checksums), and loaded with ``torch.load`` alone against ``check_folder`` + ``torch.load``.
- images: ``image_check.find_bad_images`` over the demo classification task's PNGs against
  decoding every image fully (what a data loader does once per epoch).
- outputs: ``inference.outputs.file_record`` (size + SHA-256) in MB/s.
- lock: taking and releasing a run folder's lock.

    python benchmarks/hardening.py --out benchmarks/hardening.json
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from harness import argument_parser, take_turns, write_json


def checkpoint_state():
    """The state pretraining checkpoints: CSAT + U-Net weights and one momentum buffer each."""
    import torch

    from histokd.models.task_models import SegmentationModel

    model = SegmentationModel("csat", num_classes=2)
    weights = model.state_dict()
    return {"model": weights, "optimizer": {k: torch.zeros_like(v) for k, v in weights.items()
                                            if v.is_floating_point()}, "epoch": 3}  # fmt: skip


def main() -> None:
    parser = argument_parser(__doc__, Path(__file__).with_suffix(".json"))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import torch
    from PIL import Image

    from histokd.demos.tasks import make_demo_tasks
    from histokd.image_check import find_bad_images
    from histokd.inference.outputs import file_record
    from histokd.resume import check_folder, seal_folder
    from histokd.run import lock_run

    work = Path(tempfile.mkdtemp())
    report: dict = {}

    state = checkpoint_state()
    folder = work / "checkpoint"
    folder.mkdir()
    path = folder / "state.pt"
    timings = take_turns({
        "save": lambda: torch.save(state, path),
        "save+seal": lambda: (torch.save(state, path), seal_folder(folder)),
        "load": lambda: torch.load(path, weights_only=True),
        "check+load": lambda: (check_folder(folder), torch.load(path, weights_only=True)),
    }, rounds=args.rounds, rotate=True)  # fmt: skip
    med = {name: statistics.median(t.wall_s) for name, t in timings.items()}
    report["checkpoint"] = {
        "megabytes": round(path.stat().st_size / 1e6, 1),
        **{f"{name}_s": round(s, 4) for name, s in med.items()},
        "seal_overhead": round(med["save+seal"] / med["save"], 3),
        "check_overhead": round(med["check+load"] / med["load"], 3),
    }

    tasks = make_demo_tasks(work / "tasks")
    images = sorted(str(p) for p in Path(tasks.classification_dir).rglob("*.png"))

    def decode_all():
        for image in images:
            with Image.open(image) as im:
                im.load()

    timings = take_turns({"check": lambda: find_bad_images(images), "decode": decode_all},
                         rounds=args.rounds, rotate=True)  # fmt: skip
    med = {name: statistics.median(t.wall_s) for name, t in timings.items()}
    report["images"] = {
        "images": len(images),
        "check_s": round(med["check"], 3),
        "decode_s": round(med["decode"], 3),
        "check_per_second": round(len(images) / med["check"]),
        "check_vs_decode": round(med["check"] / med["decode"], 3),
    }

    blob = work / "predictions.parquet"
    blob.write_bytes(os.urandom(64 << 20))
    timings = take_turns({"record": lambda: file_record(blob)}, rounds=args.rounds)
    report["outputs"] = {
        "megabytes": 64 * 1.048576,
        "file_record_mb_per_s": round(64 * 1.048576 / statistics.median(timings["record"].wall_s)),
    }

    started = time.perf_counter()
    for i in range(20):
        with lock_run(work / "runs" / f"run{i}"):
            pass
    report["lock"] = {"take_and_release_ms": round((time.perf_counter() - started) / 20 * 1e3, 2)}

    for name, figures in report.items():
        print(f"{name}: {figures}")
    write_json(args.out, report)


if __name__ == "__main__":
    main()
