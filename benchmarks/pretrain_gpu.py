"""RCKD pretraining on a GPU: patches per second and how busy the GPU is while it trains.

Runs the real pretraining job (`histokd.pretrain.job.run_pretraining`: manifest -> teacher
actors -> TorchTrainer) on synthetic demo slides with the paper's sizes (1024 px patches at 20x,
student input 512 px, bf16), and samples every GPU each 0.5 s in a background thread with
``nvidia-smi --query-gpu=utilization.gpu,memory.used``. The JSON gives patches/s per epoch
(from the job's history), the GPU busy % (mean and median of the samples inside each training
epoch, and over all of them) and the peak GPU memory. Epoch 1 includes the teacher labelling
every patch; later epochs read the cached pseudo labels, so they show the student alone.
The goal is a GPU busy >= 90 % of the time while training.

Teacher: by default the 2D_versatile_he architecture with random weights, offline (its
published config.json, from ../shared/testdata/stardist/2D_versatile_he when present, else the
copy below; random weights cost the same network time as the real ones, their labels mean
nothing). ``--teacher 2D_versatile_he`` uses the real weights (cached in $KERAS_HOME, or
internet); any other teacher spec of the job (``demo``, a model folder) is passed as is.

Epoch windows come from the MLflow timestamps of each epoch's metrics (logged right after the
epoch, with its checkpoint) minus the epoch's seconds. Demo slides (4096 px, 85 % tissue, about
12 patches of 1024 px each) are written in parallel into --slides-dir and reused.

    python benchmarks/pretrain_gpu.py                    # writes benchmarks/pretrain_gpu.json
    python benchmarks/pretrain_gpu.py --num-patches 2048 --epochs 4 --batch-size 64

Without nvidia-smi or a GPU it stops at once with exit code 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from harness import REPO, argument_parser, write_json

RANDOM_VERSATILE = "2D_versatile_he:random"
VERSATILE_HE = REPO.parent / "shared" / "testdata" / "stardist" / "2D_versatile_he"
# The published config.json and thresholds.json of StarDist's 2D_versatile_he (the same as
# ../shared/testdata/stardist/2D_versatile_he), for machines without the test data.
VERSATILE_HE_CONFIG = {
    "axes": "YXC", "backbone": "unet", "grid": [2, 2], "n_channel_in": 3, "n_channel_out": 33, "n_dim": 2,
    "n_rays": 32, "net_conv_after_unet": 128, "net_input_shape": [None, None, 3], "net_mask_shape": [None, None, 1],
    "train_background_reg": 0.0001, "train_batch_size": 8, "train_checkpoint": "weights_best.h5",
    "train_checkpoint_epoch": "weights_now.h5", "train_checkpoint_last": "weights_last.h5",
    "train_completion_crop": 32, "train_dist_loss": "mae", "train_epochs": 200, "train_foreground_only": 0.9,
    "train_learning_rate": 0.0003, "train_loss_weights": [1, 0.1], "train_n_val_patches": 3,
    "train_patch_size": [512, 512], "train_reduce_lr": {"factor": 0.5, "min_delta": 0, "patience": 50},
    "train_shape_completion": False, "train_steps_per_epoch": 200, "train_tensorboard": True,
    "unet_activation": "relu", "unet_batch_norm": False, "unet_dropout": 0.0, "unet_kernel_size": [3, 3],
    "unet_last_activation": "relu", "unet_n_conv_per_depth": 2, "unet_n_depth": 3, "unet_n_filter_base": 32,
    "unet_pool": [2, 2], "unet_prefix": "", "use_gpu": False,
}  # fmt: skip
VERSATILE_HE_THRESHOLDS = {"prob": 0.6924782541382084, "nms": 0.3}
QUERY = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
SLIDE_SIDE = 4096
TISSUE_FRACTION = 0.85


def job_parser(doc: str, script: str, patch_size: int, input_size: int, num_patches: int,
               batch_size: int) -> argparse.ArgumentParser:  # fmt: skip
    """The flags of a benchmark that runs the pretraining job on demo slides (also placement.py)."""
    name = Path(script).stem
    parser = argument_parser(doc, Path(script).with_suffix(".json"))
    add = parser.add_argument
    add("--patch-size", type=int, default=patch_size, help="patch side at 20x (RCKD: 1024)")
    add("--input-size", type=int, default=input_size, help="student input side (RCKD: 512)")
    add("--num-patches", type=int, default=num_patches, help="S_n, patches (train + hold-out)")
    add(
        "--epochs",
        type=int,
        default=3,
        help="epoch 1 labels all patches; later ones show the cache",
    )
    add("--batch-size", type=int, default=batch_size, help="global student batch (RCKD: 64)")
    add("--teacher-batch-size", type=int, default=8, help="patches per teacher call")
    add("--backbone", default="csat", help="student backbone")
    add("--slides-dir", default=str(REPO / "runs" / "benchmarks" / f"{name}_slides"),
        help="demo slides, written on first use and reused")  # fmt: skip
    add("--work-dir", default=str(REPO / "runs" / "benchmarks" / name),
        help="the job's storage path (its run folders are removed afterwards unless --keep)")  # fmt: skip
    add("--keep", action="store_true", help="keep the run folders (checkpoints, pseudo labels)")
    return parser


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = job_parser(__doc__, __file__, patch_size=1024, input_size=512, num_patches=512,
                        batch_size=64)  # fmt: skip
    parser.add_argument("--teacher", default=RANDOM_VERSATILE,
                        help=f"{RANDOM_VERSATILE!r} (default): the 2D_versatile_he architecture with random weights, "
                             "offline; else a teacher spec of the job (2D_versatile_he, demo, a model folder)")  # fmt: skip
    parser.add_argument("--precision", choices=("bf16", "fp32", "auto"), default="bf16")
    parser.add_argument(
        "--teacher-gpus", type=float, default=0.5, help="GPU share of each teacher actor"
    )
    parser.add_argument(
        "--interval", type=float, default=0.5, help="seconds between nvidia-smi samples"
    )
    parser.add_argument(
        "--ray-address", default=None, help="Ray cluster to join; default: a new local Ray"
    )
    return parser.parse_args(argv)


def query_gpus() -> list[tuple[float, float]]:
    """(busy %, memory used MiB) of each GPU now; raises OSError/CalledProcessError/ValueError."""
    text = subprocess.run(QUERY, capture_output=True, text=True, check=True, timeout=10).stdout
    rows = []
    for line in text.strip().splitlines():
        util, mem = (field.strip() for field in line.split(","))
        rows.append((float(util), float(mem)))
    if not rows:
        raise ValueError("nvidia-smi listed no GPU")
    return rows


def check_gpu() -> str | None:
    """None when nvidia-smi answers with at least one GPU, else why not."""
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not found"
    try:
        query_gpus()
    except subprocess.CalledProcessError as exc:
        return f"nvidia-smi failed (exit {exc.returncode}): {(exc.stderr or exc.stdout or '').strip()[:300]}"
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi gave no usable GPU reading ({type(exc).__name__}: {exc})"
    return None


class GpuSampler(threading.Thread):
    """Samples every GPU each ``interval`` seconds: (unix time, [(busy %, MiB), ...])."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, list[tuple[float, float]]]] = []
        self.errors = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            tick = time.monotonic()
            try:
                self.samples.append((time.time(), query_gpus()))
            except Exception:  # noqa: BLE001 - a missed sample is counted, not fatal
                self.errors += 1
            self._done.wait(max(0.0, self.interval - (time.monotonic() - tick)))

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=15)


def _one_slide(folder: str, seed: int) -> str:
    from histokd.demos.synthetic import make_demo_slides

    slide = make_demo_slides(
        folder, n=1, seed=seed, width=SLIDE_SIDE, height=SLIDE_SIDE, tissue_fraction=TISSUE_FRACTION
    )[0]
    return str(slide.slide_path)


def demo_slides(folder: Path, num_patches: int, patch_size: int) -> list[str]:
    """Enough demo slides for ``num_patches`` tissue patches (about 3/4 of the lattice is tissue)."""
    per_slide = max(1, int(0.7 * (SLIDE_SIDE // patch_size) ** 2))
    count = max(2, math.ceil(num_patches / per_slide))
    folder.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=min(count, os.cpu_count() or 1)) as pool:
        return list(pool.map(_one_slide, [str(folder)] * count, range(100, 100 + count)))


_WRITE_WEIGHTS = """
import sys
from histokd.teachers.stardist_teacher import StarDistTeacher
teacher = StarDistTeacher.from_folder(sys.argv[1], require_weights=False)
teacher.model.keras_model.save_weights(sys.argv[1] + "/weights_best.weights.h5")
"""


def random_versatile_teacher(folder: Path) -> tuple[str, str]:
    """A 2D_versatile_he model folder with random weights (written once), and where its config came from."""
    folder.mkdir(parents=True, exist_ok=True)
    if (VERSATILE_HE / "config.json").is_file():
        source = str(VERSATILE_HE)
        for name in ("config.json", "thresholds.json"):
            shutil.copy(VERSATILE_HE / name, folder / name)
    else:
        source = "copy in benchmarks/pretrain_gpu.py"
        (folder / "config.json").write_text(json.dumps(VERSATILE_HE_CONFIG, indent=2))
        (folder / "thresholds.json").write_text(json.dumps(VERSATILE_HE_THRESHOLDS))
    if not list(folder.glob("*.h5")):
        # in a CPU-only child process, so that this driver never holds GPU memory
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1", "TF_CPP_MIN_LOG_LEVEL": "2"}
        subprocess.run([sys.executable, "-c", _WRITE_WEIGHTS, str(folder)], check=True, env=env)
    return str(folder), source


def _epoch_windows(
    tracking_uri: str, run_id: str, history: list[dict]
) -> dict[int, tuple[float, float]]:
    """Epoch -> (start, end) unix seconds: the MLflow timestamp of its metrics minus its seconds."""
    import mlflow

    seconds = {h["epoch"]: float(h["seconds"]) for h in history}
    windows = {}
    for metric in mlflow.MlflowClient(tracking_uri).get_metric_history(run_id, "seconds"):
        if metric.step in seconds:
            end = metric.timestamp / 1000
            windows[metric.step] = (end - seconds[metric.step], end)
    return windows


def _stats(samples: list[tuple[float, list[tuple[float, float]]]]) -> dict:
    """Mean and median busy % (mean over GPUs per sample) and peak memory (summed over GPUs)."""
    if not samples:
        return {
            "samples": 0,
            "gpu_busy_mean": None,
            "gpu_busy_median": None,
            "peak_memory_mib": None,
        }
    busy = [statistics.fmean(u for u, _ in gpus) for _, gpus in samples]
    return {
        "samples": len(samples),
        "gpu_busy_mean": round(statistics.fmean(busy), 1),
        "gpu_busy_median": round(statistics.median(busy), 1),
        "peak_memory_mib": max(sum(m for _, m in gpus) for _, gpus in samples),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its JSON; 2 when there is no GPU to measure."""
    args = _parse_args(argv)
    why = check_gpu()
    if why is not None:
        print(
            f"pretrain_gpu: no GPU to measure ({why}); run this benchmark on a machine with an NVIDIA GPU",
            file=sys.stderr,
        )
        return 2
    if args.ray_address is None:
        os.environ.pop("RAY_ADDRESS", None)  # a fresh local Ray, not a cluster this shell points at
    started = time.time()
    work = Path(args.work_dir)
    slides = demo_slides(Path(args.slides_dir), args.num_patches, args.patch_size)
    slides_seconds = time.time() - started
    teacher, teacher_source = args.teacher, None
    if args.teacher == RANDOM_VERSATILE:
        teacher, teacher_source = random_versatile_teacher(work / "teacher" / "2D_versatile_he")

    from histokd.pretrain.config import PretrainConfig
    from histokd.pretrain.job import run_pretraining

    run_name = f"pretrain-gpu-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}"
    config = PretrainConfig(
        slides=slides, storage_path=str(work / "runs"), run_name=run_name, teacher=teacher,
        patch_size=args.patch_size, input_size=args.input_size, precision=args.precision,
        num_patches=args.num_patches, epochs=args.epochs, warmup_epochs=min(1, args.epochs),
        batch_size=args.batch_size, lr=0.3 * args.batch_size / 256, teacher_batch_size=args.teacher_batch_size,
        teacher_gpus=args.teacher_gpus, backbone=args.backbone, ray_address=args.ray_address,
        max_failures=0,
    )  # fmt: skip
    print(
        f"{len(slides)} demo slides ({slides_seconds:.0f} s); pretraining {run_name} with teacher {args.teacher}",
        flush=True,
    )
    sampler = GpuSampler(args.interval)
    sampler.start()
    job_started = time.time()
    try:
        result = run_pretraining(config)
    finally:
        sampler.stop()
    job_seconds = time.time() - job_started

    history = result.history
    windows = _epoch_windows(result.tracking_uri, result.mlflow_run_id, history)
    epochs = []
    for h in history:
        start, end = windows.get(h["epoch"], (math.nan, math.nan))
        inside = [s for s in sampler.samples if start <= s[0] <= end]
        epochs.append({
            "epoch": h["epoch"], "patches": h["patches"], "seconds": round(h["seconds"], 2),
            "patches_per_second": round(h["patches_per_second"], 2), **_stats(inside),
        })  # fmt: skip
    training = [s for s in sampler.samples if any(a <= s[0] <= b for a, b in windows.values())]
    later = [e["patches_per_second"] for e in epochs if e["epoch"] > 1]
    report = {
        "benchmark": "RCKD pretraining on GPU (benchmarks/pretrain_gpu.py)",
        "settings": {
            "teacher": args.teacher,
            "teacher_spec": teacher,
            "teacher_config_from": teacher_source,
            "magnification": config.magnification,
            "patch_size": config.patch_size,
            "input_size": config.input_size,
            "precision": config.precision,
            "num_patches": config.num_patches,
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "teacher_batch_size": config.teacher_batch_size,
            "teacher_gpus": config.teacher_gpus,
            "backbone": config.backbone,
            "alpha": config.alpha,
            "sample_interval_s": args.interval,
            "slides": len(slides),
            "slide_side": SLIDE_SIDE,
        },  # fmt: skip
        "patches": {"train": result.num_train_patches, "holdout": result.num_holdout_patches},
        "seconds": {"slides": round(slides_seconds, 1), "job": round(job_seconds, 1)},
        "epochs": epochs,
        "patches_per_second": {
            "epoch_1_with_teacher": epochs[0]["patches_per_second"] if epochs else None,
            "later_epochs_mean": round(statistics.fmean(later), 2) if later else None,
        },
        "training_epochs": _stats(training),
        "whole_job": {**_stats(sampler.samples), "missed_samples": sampler.errors},
        "goal": "GPU busy >= 90 % while training",
    }
    write_json(args.out, report)
    print(
        json.dumps(
            {k: report[k] for k in ("patches_per_second", "training_epochs", "whole_job")}, indent=2
        )
    )
    if not args.keep:
        shutil.rmtree(work / "runs" / run_name, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
