"""Tiles per second through the whole inference stream against the model alone, side by side.

The stream is `histokd.inference.run_prediction` end to end: tissue tiling from thumbnails
(Ray tasks), tile reads through OpenSlide (Ray tasks), the model in a Ray Data actor pool, and
the driver stitching and writing each slide's outputs. The model alone runs the same network,
in this process, on tiles already decoded into memory (uint8, normalised per batch like the
actor does), with as many threads as the actor gets. If the stream kept the model fully fed,
its steady rate would equal the model's.

Slides are synthetic demo slides (2048 px square at 20x, SVS with JPEG tiles); models have
random weights (the cost of a network does not depend on its weights). Rounds alternate the
two measurements so that a shared machine's load affects both alike.

    python benchmarks/predict.py --out benchmarks/predict.json
    python benchmarks/predict.py --slides 32 --batch-size 64 --out benchmarks/predict_gpu.json  # GPU machine
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from harness import argument_parser, load_average, machine, write_json

OUTPUT_MAGNIFICATION = 2.5
CASES = {
    # name: (task, classes, patch_size at 20x, overlap)
    "classification": ("classification", ("stroma", "tumor", "lymphocyte"), 224, 0.0),
    "segmentation": ("segmentation", ("background", "stroma", "tumor", "lymphocyte"), 224, 0.25),
}


def save_model(
    path: Path, task: str, backbone: str, class_names: tuple[str, ...], input_size: int
) -> Path:
    """A random-weight model file in the fine-tuning job's format."""
    import torch

    from histokd.cli import config_to_dict
    from histokd.finetune import FinetuneConfig
    from histokd.finetune.loop import build_task_model

    config = config_to_dict(FinetuneConfig(task=task, backbone=backbone, input_size=input_size))
    config.update(num_classes=len(class_names), class_names=list(class_names))
    torch.manual_seed(0)
    model = build_task_model(task, backbone, len(class_names))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "best_epoch": 1, "config": config}, path)
    return path


def model_alone(
    model_path: Path,
    tiles: np.ndarray,
    batch_size: int,
    threads: int,
    seconds: float,
    tile_side: int,
) -> dict:
    """Tiles per second of the actor's own predict() on decoded tiles, after one warm-up batch."""
    from histokd.inference.model_file import load_checkpoint
    from histokd.inference.stream import TilePredictor

    predictor = TilePredictor(
        load_checkpoint(model_path), str(model_path), tile_side=tile_side, threads=threads
    )
    predictor.predict(tiles[:batch_size])
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for i in range(0, len(tiles), batch_size):
            predictor.predict(tiles[i : i + batch_size])
            count += len(tiles[i : i + batch_size])
    elapsed = time.perf_counter() - start
    return {
        "tiles": count,
        "seconds": round(elapsed, 3),
        "tiles_per_second": round(count / elapsed, 2),
        "device": str(predictor.device),
    }


def _config(model_path: Path, slides: list[str], out: Path, case: tuple, batch_size: int):
    from histokd.inference import PredictConfig

    _, _, patch_size, overlap = case
    return PredictConfig(
        model=str(model_path), slides=slides, storage_path=str(out), run_name="bench", magnification=20,
        patch_size=patch_size, overlap=overlap, output_magnification=OUTPUT_MAGNIFICATION, batch_size=batch_size,
        overwrite=True,
    )  # fmt: skip


def stream(model_path: Path, slides: list[str], out: Path, case: tuple, batch_size: int) -> dict:
    """The Ray Data stream alone (plan, read, actor pool), consumed as the driver does.

    The steady rate counts the tiles after the first batch arrives over the time after it, so
    it leaves out the start-up (actor start, model build), which a long run amortises.
    """
    import numpy as np

    from histokd.inference.job import resolve_model
    from histokd.inference.stream import TILE, TileStreamSettings, prediction_dataset

    config = _config(model_path, slides, out, case, batch_size)
    checkpoint, info = resolve_model(config)
    settings = TileStreamSettings(
        magnification=info.magnification, patch_size=info.patch_size, input_size=info.input_size,
        overlap=config.overlap, tissue=config.tissue_filter(),
    )  # fmt: skip
    tile_side = round(info.patch_size * OUTPUT_MAGNIFICATION / info.magnification)
    start = time.perf_counter()
    dataset = prediction_dataset(
        slides, checkpoint, info.path, settings, tile_side, batch_size=batch_size
    )
    first, tiles, first_tiles = None, 0, 0
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
        n = int((np.asarray(batch["status"], dtype=object) == TILE).sum())
        tiles += n
        if first is None:
            first, first_tiles = time.perf_counter(), n
    end = time.perf_counter()
    return {
        "tiles": tiles,
        "seconds_to_first_batch": round(first - start, 3),
        "wall_seconds": round(end - start, 3),
        "steady_tiles_per_second": round((tiles - first_tiles) / (end - first), 2)
        if end > first
        else None,
    }


def end_to_end(
    model_path: Path, slides: list[str], out: Path, case: tuple, batch_size: int
) -> dict:
    """`run_prediction` end to end: the stream plus stitching and writing every output, start-up included."""
    from histokd.inference import run_prediction

    start = time.perf_counter()
    result = run_prediction(_config(model_path, slides, out, case, batch_size), tracking=False)
    wall = time.perf_counter() - start
    return {
        "tiles": result.num_tiles,
        "slides": result.num_predicted,
        "wall_seconds": round(wall, 3),
        "tiles_per_second": round(result.num_tiles / wall, 2),
        "max_slides_in_flight": result.max_slides_in_flight,
    }


def decoded_tiles(slides: list[str], case: tuple, input_size: int, count: int) -> np.ndarray:
    """``count`` tissue tiles of the slides at the stream's read magnification, in memory."""
    from histokd.inference.tiling import plan_tiles
    from histokd.slides import SlideReader
    from histokd.tissue import TissueFilter

    _, _, patch_size, overlap = case
    tiles = []
    for path in slides:
        plan = plan_tiles(path, 20, patch_size, overlap, TissueFilter(min_tissue_fraction=0.1))
        with SlideReader(path) as reader:
            for x, y in zip(plan.xs, plan.ys, strict=True):
                tiles.append(
                    reader.read_region(int(x), int(y), input_size, 20 * input_size / patch_size)
                )
                if len(tiles) == count:
                    return np.stack(tiles)
    return np.stack(tiles)


def main() -> None:
    parser = argument_parser(__doc__, Path(__file__).with_suffix(".json"))
    parser.add_argument("--backbone", default="csat")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument(
        "--slides", type=int, default=4, help="demo slides (2048 px at 20x) per stream run"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--model-seconds", type=float, default=8.0, help="duration of each model-alone measurement"
    )
    parser.add_argument("--work-dir", default=None, help="default: a temporary folder")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray

    from histokd.cluster import init_ray
    from histokd.demos.synthetic import make_demo_slides
    from histokd.streams import plan_resources

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="histokd_predict_bench_"))
    slides = [
        str(s.slide_path)
        for s in make_demo_slides(work / "slides", n=args.slides, seed=11, width=2048, height=2048)
    ]
    init_ray(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    plan = plan_resources(ray.cluster_resources(), None, 1.0)
    load_before = load_average()
    results: dict = {}
    for name in args.cases:
        case = CASES[name]
        model_path = save_model(
            work / name / "best_model.pt", case[0], args.backbone, case[1], args.input_size
        )
        tiles = decoded_tiles(slides, case, args.input_size, 4 * args.batch_size)
        rounds = []
        for r in range(args.rounds):
            tile_side = round(
                case[2] * OUTPUT_MAGNIFICATION / 20
            )  # as run_prediction resizes segmentation maps
            alone = model_alone(
                model_path,
                tiles,
                args.batch_size,
                plan.intra_op_threads,
                args.model_seconds,
                tile_side,
            )
            streamed = stream(model_path, slides, work / name / "runs", case, args.batch_size)
            whole = end_to_end(model_path, slides, work / name / "runs", case, args.batch_size)
            rounds.append(
                {
                    "round": r,
                    "model_alone": alone,
                    "stream": streamed,
                    "end_to_end": whole,
                    "load_average_1min": load_average()[0],
                }
            )
            print(name, json.dumps(rounds[-1]), flush=True)
        alone_rate = statistics.median(x["model_alone"]["tiles_per_second"] for x in rounds)
        steady = statistics.median(x["stream"]["steady_tiles_per_second"] or 0 for x in rounds)
        overall = statistics.median(x["end_to_end"]["tiles_per_second"] for x in rounds)
        results[name] = {
            "task": case[0], "patch_size_at_20x": case[2], "overlap": case[3], "input_size": args.input_size,
            "tiles_per_stream": rounds[0]["stream"]["tiles"], "model_alone_tiles_per_second": alone_rate,
            "stream_steady_tiles_per_second": steady, "end_to_end_tiles_per_second": overall,
            "steady_over_model": round(steady / alone_rate, 3) if alone_rate else None, "rounds": rounds,
        }  # fmt: skip
    report = {
        "benchmark": "whole-slide inference: stream vs model alone",
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "slides": args.slides,
        "slide_size": "2048 x 2048 px at 20x (demo SVS)",
        "machine": {**machine(), "load_average_before": load_before},
        "actor_plan": {
            "actors": plan.num_actors,
            "actor_cpus": plan.actor_cpus,
            "actor_gpus": plan.actor_gpus,
            "read_cpus": plan.read_cpus,
            "threads": plan.intra_op_threads,
        },  # fmt: skip
        "results": results,
    }
    print(
        json.dumps(
            {
                k: {
                    m: v[m]
                    for m in (
                        "model_alone_tiles_per_second",
                        "stream_steady_tiles_per_second",
                        "end_to_end_tiles_per_second",
                        "steady_over_model",
                    )
                }
                for k, v in results.items()
            },
            indent=1,
        )
    )
    write_json(args.out, report)


if __name__ == "__main__":
    main()
