"""Teacher placement: the teacher actor pool against the teacher in the training workers.

Runs the real pretraining job (`histokd.pretrain.job.run_pretraining`) with
``teacher_placement="actors"`` and ``"trainer"`` on the same demo slides and settings,
interleaved (A T, then T A, ...), each in this process's one local Ray, on the demo slides of
``benchmarks/pretrain_gpu.py`` (4096 px, written once into --slides-dir). It writes per run the
job's wall time, each epoch's seconds and patches/s (from the job's history) and the hold-out
labels' nuclei share (``holdout_label_foreground``, which must be equal in both placements:
the same labels). Epoch 1 has the teacher label every patch in both placements; in later
epochs the actors read their cache while the trainer labels again, so the split shows what
each placement costs where.

It also gives the bytes a record carries through Ray's object store in each placement
(computed from the sizes): the actors' records hold the resized image and label; the trainer's
the resized image and the full-size patch, which is what the actors' read tasks already send to
the actors.

    python benchmarks/placement.py                     # CPU, demo teacher, small: benchmarks/placement.json
    python benchmarks/placement.py --patch-size 1024 --input-size 512 --num-patches 1024 \\
        --batch-size 64 --teacher-precision bf16 --teacher 2D_versatile_he --repeats 1   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from harness import load_average, machine, write_json
from pretrain_gpu import demo_slides, job_parser  # benchmarks/ is this script's import path

PLACEMENTS = ("actors", "trainer")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = job_parser(__doc__, __file__, patch_size=256, input_size=128, num_patches=64,
                        batch_size=16)  # fmt: skip
    parser.add_argument(
        "--teacher", default="demo", help="teacher spec of the job (a StarDist teacher)"
    )
    parser.add_argument("--teacher-precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs of each placement, interleaved"
    )
    return parser.parse_args(argv)


def record_bytes(patch_size: int, input_size: int) -> dict[str, int]:
    """Bytes of image data per record (metadata aside) in each placement, and per read patch."""
    image = input_size * input_size * 3
    return {
        "read_patch": patch_size * patch_size * 3,  # read task -> teacher actor (actors only)
        "actors_record": image + input_size * input_size,  # image + pseudo label
        "trainer_record": image + (patch_size * patch_size * 3 if patch_size != input_size else 0),
    }


def run_once(args: argparse.Namespace, slides: list[str], placement: str, repeat: int) -> dict:
    from histokd.pretrain.config import PretrainConfig
    from histokd.pretrain.job import run_pretraining

    config = PretrainConfig(
        slides=slides, storage_path=str(Path(args.work_dir) / "runs"), run_name=f"placement-{placement}-{repeat}",
        teacher=args.teacher, alpha=None, teacher_placement=placement, teacher_precision=args.teacher_precision,
        patch_size=args.patch_size, input_size=args.input_size, num_patches=args.num_patches, epochs=args.epochs,
        warmup_epochs=min(1, args.epochs), batch_size=args.batch_size, lr=1.0, holdout_fraction=0.1,
        teacher_batch_size=args.teacher_batch_size, backbone=args.backbone, max_failures=0, overlays=0,
    )  # fmt: skip
    started = time.monotonic()
    result = run_pretraining(config)
    seconds = time.monotonic() - started
    epochs = [
        {k: round(h[k], 4) if isinstance(h[k], float) else h[k]
         for k in ("epoch", "patches", "seconds", "patches_per_second", "loss", "holdout_foreground_iou", "holdout_label_foreground")}
        for h in result.history
    ]  # fmt: skip
    later = [e["seconds"] for e in epochs if e["epoch"] > 1]
    print(
        f"{placement} run {repeat}: {seconds:.1f} s; epochs {[e['seconds'] for e in epochs]} s",
        flush=True,
    )
    if not args.keep:
        shutil.rmtree(Path(args.work_dir) / "runs" / config.run_name, ignore_errors=True)
    return {
        "placement": placement, "repeat": repeat, "job_seconds": round(seconds, 1),
        "epoch_1_seconds": epochs[0]["seconds"], "later_epoch_seconds_mean": round(statistics.fmean(later), 2) if later else None,
        "train_patches": result.num_train_patches, "holdout_patches": result.num_holdout_patches, "epochs": epochs,
    }  # fmt: skip


def _summary(runs: list[dict]) -> dict:
    out = {}
    for placement in PLACEMENTS:
        mine = [r for r in runs if r["placement"] == placement]
        out[placement] = {
            key: round(statistics.median(r[key] for r in mine), 2)
            for key in ("job_seconds", "epoch_1_seconds", "later_epoch_seconds_mean")
            if all(r[key] is not None for r in mine)
        }
    for key in out["actors"]:
        if key in out["trainer"] and out["actors"][key]:
            out.setdefault("trainer_over_actors", {})[key] = round(
                out["trainer"][key] / out["actors"][key], 3
            )
    shares = {r["epochs"][-1]["holdout_label_foreground"] for r in runs}
    out["same_holdout_labels"] = len(shares) == 1
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    os.environ.pop("RAY_ADDRESS", None)  # a fresh local Ray, not a cluster this shell points at

    started = time.time()
    facts = {**machine(), "load_average_at_start": load_average()}
    slides = demo_slides(Path(args.slides_dir), args.num_patches, args.patch_size)
    runs = []
    for repeat in range(args.repeats):
        order = PLACEMENTS if repeat % 2 == 0 else PLACEMENTS[::-1]
        for placement in order:
            runs.append(run_once(args, slides, placement, repeat))
    report = {
        "benchmark": "teacher placement: actor pool vs training workers (benchmarks/placement.py)",
        "machine": facts,
        "settings": {
            k: v
            for k, v in vars(args).items()
            if k not in ("out", "slides_dir", "work_dir", "keep")
        },
        "record_bytes": record_bytes(args.patch_size, args.input_size),
        "summary": _summary(runs),
        "runs": runs,
        "seconds": round(time.time() - started, 1),
    }
    print(json.dumps(report["summary"], indent=2))
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
