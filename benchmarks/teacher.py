"""Pseudo labels per second for 1024x1024 patches, and where the time goes.

Four parts (``--parts``, all by default):

* ``label_rates``: TensorFlow's probability-map path against StarDist's ``predict_instances``
  (same model, same patches);
* ``backends``: the PyTorch backend (eager, and ``torch.compile`` measured after its warm-up
  with the compile time apart) against the TensorFlow backend, same patches, same CPU threads
  (``torch.set_num_threads`` and TensorFlow's intra-op threads both ``--threads``); the variants
  take turns in every round (a rotating order) so a change in machine load hits all alike, and
  the figures are medians over rounds, the torch/TF ratio the median of each round's ratio;
* ``figure``: the picture described below;
* ``stream``: the whole stream (read + label) against reading alone.

Models: the 2D_versatile_he architecture (its published config from ../shared/testdata with
random weights: the network's cost is that of the real model; its weights need internet) and
the shipped demo teacher (trained, so its ``predict_instances`` does real NMS work: with random
weights almost no pixel passes the probability threshold and NMS has nothing to do).
Patches are 1024x1024 at 20x from synthetic demo slides, read through the slide layer.

    python benchmarks/teacher.py --out benchmarks/teacher.json
    python benchmarks/teacher.py --parts backends --rounds 5      # torch against TensorFlow only
    python benchmarks/teacher.py --num-patches 512 --batch-size 16   # on a GPU machine

(``benchmarks/gpu_check.py`` measures the torch teacher on a GPU without TensorFlow.)

Besides the JSON it draws an RCKD Fig. 3-like picture of the demo teacher's pseudo labels, a
picture rather than a measurement, into the unversioned ``runs/benchmarks/teacher_pseudo_labels.png``
(``--figure PATH`` elsewhere, ``--figure ''`` for none).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from harness import REPO, argument_parser, load_average, machine, take_turns, write_json

VERSATILE_HE = REPO.parent / "shared" / "testdata" / "stardist" / "2D_versatile_he"
PARTS = ("label_rates", "backends", "figure", "stream")


def demo_patches(work: Path, n: int, size: int = 1024) -> tuple[np.ndarray, Path]:
    """``n`` tissue patches of ``size`` px at 20x from demo slides, and the manifest of them."""
    from histokd.demos.synthetic import make_demo_slides
    from histokd.manifest import ManifestConfig, build_manifest
    from histokd.teachers.stream import read_patch_batch

    slides_needed = max(2, -(-n // 3))
    slides = make_demo_slides(
        work / "slides", n=slides_needed, seed=11, width=2 * size, height=2 * size
    )
    result = build_manifest(
        [str(s.slide_path) for s in slides], work / "manifest",
        ManifestConfig(magnification=20, patch_size=size, num_patches=n), use_ray=False,
    )  # fmt: skip
    import pyarrow.parquet as pq

    table = pq.read_table(result.manifest_path)
    batch = {c: np.asarray(table.column(c).to_pylist()) for c in table.column_names}
    images = read_patch_batch(batch)["image"]
    return images, result.manifest_path


def time_labels(teacher, images: np.ndarray, batch_size: int, repeats: int = 1) -> dict:
    """Patches per second of ``teacher.pseudo_label`` after one warm-up call (graph tracing)."""
    teacher.pseudo_label(images[:batch_size])
    start = time.perf_counter()
    fraction = 0.0
    for _ in range(repeats):
        for i in range(0, len(images), batch_size):
            fraction += float(teacher.pseudo_label(images[i : i + batch_size]).sum())
    seconds = time.perf_counter() - start
    count = repeats * len(images)
    return {
        "patches": count,
        "seconds": round(seconds, 3),
        "patches_per_second": round(count / seconds, 3),
        "nuclei_fraction": round(fraction / (count * images.shape[1] * images.shape[2]), 4),
    }


def benchmark_models(work: Path) -> dict[str, tuple[str, dict]]:
    """Label -> (teacher spec, keyword arguments) of the two models measured.

    The 2D_versatile_he folder gets one set of random weights (written by TensorFlow, read by
    both backends), so the two backends' masks can be compared on it too.
    """
    from histokd.teachers.stardist_teacher import StarDistTeacher

    folder = work / "2D_versatile_he"
    shutil.copytree(VERSATILE_HE, folder)
    keras_model = StarDistTeacher.from_folder(folder, require_weights=False).model.keras_model
    keras_model.save_weights(str(folder / "weights_best.h5"))  # the h5 layout both backends read
    return {
        "2D_versatile_he architecture (random weights)": (str(folder), {}),
        "demo teacher (trained)": ("demo", {}),
    }


def label_rates(models: dict, images: np.ndarray, batch_size: int, instances_patches: int) -> dict:
    """Both label paths of TensorFlow StarDist, both models, on the same patches."""
    from histokd.teachers import build_teacher

    out = {}
    for label, (spec, kwargs) in models.items():
        fast = build_teacher(spec, backend="tensorflow", batch_size=batch_size, **kwargs)
        slow = build_teacher(spec, backend="tensorflow", mask_mode="instances", **kwargs)
        row = {
            "probability_map": time_labels(fast, images, batch_size),
            "predict_instances": time_labels(slow, images[:instances_patches], 1),
            "parameters": int(fast.model.keras_model.count_params()),
        }
        row["speedup"] = round(
            row["probability_map"]["patches_per_second"]
            / row["predict_instances"]["patches_per_second"],
            2,
        )
        out[label] = row
        print(
            f"{label}: probability map {row['probability_map']['patches_per_second']:.2f}/s, "
            f"predict_instances {row['predict_instances']['patches_per_second']:.2f}/s",
            flush=True,
        )
    return out


def backend_rates(
    models: dict, images: np.ndarray, batch_size: int, threads: int, rounds: int
) -> dict:
    """The torch backend (eager, compiled) against TensorFlow: labels/s, same patches and threads.

    Each variant labels every patch once to warm up (the compiled one compiles then: its
    ``first_pass_s`` less its median pass is the compile time), then the variants take turns,
    in a rotating order, for ``rounds`` timed passes each.
    """
    import torch

    from histokd.teachers import build_teacher

    out = {}
    common = {"batch_size": batch_size, "intra_op_threads": threads}
    variants = {
        "tensorflow": {"backend": "tensorflow"},
        "torch_eager": {"backend": "torch", "device": "cpu"},
        "torch_compiled": {"backend": "torch", "device": "cpu", "compile": True},
    }
    masks: dict[str, np.ndarray] = {}  # each variant's masks from its last pass
    for label, (spec, kwargs) in models.items():
        teachers = {
            name: build_teacher(spec, **variant, **common, **kwargs)
            for name, variant in variants.items()
        }
        passes = {name: lambda n=name, t=teacher: masks.__setitem__(n, t.pseudo_label(images))
                  for name, teacher in teachers.items()}  # fmt: skip
        rows = {
            name: {
                "passes_s": [round(s, 3) for s in t.wall_s],
                "cpu_passes_s": [round(s, 3) for s in t.cpu_s],
                "first_pass_s": round(t.first_s, 2),
            }
            for name, t in take_turns(passes, rounds, rotate=True).items()
        }
        for name, row in rows.items():
            median = statistics.median(row["passes_s"])
            row["labels_per_s"] = round(len(images) / median, 3)
            row["labels_per_cpu_s"] = round(len(images) / statistics.median(row["cpu_passes_s"]), 3)
            row["mask_agreement_with_tensorflow_percent"] = round(
                100 * float((masks[name] == masks["tensorflow"]).mean()), 3
            )
            row["nuclei_fraction"] = round(float(masks[name].mean()), 4)
        rows["torch_compiled"]["compile_s"] = round(
            rows["torch_compiled"]["first_pass_s"]
            - statistics.median(rows["torch_compiled"]["passes_s"]),
            2,
        )
        tf_passes = rows["tensorflow"]["passes_s"]
        ratios = {
            f"{name}_over_tensorflow": round(statistics.median(t / p for t, p in zip(tf_passes, rows[name]["passes_s"], strict=True)), 3)
            for name in ("torch_eager", "torch_compiled")
        }  # fmt: skip
        out[label] = {**rows, **ratios}
        print(f"{label}: " + ", ".join(f"{n} {r['labels_per_s']:.2f}/s" for n, r in rows.items())
              + f"; torch/TF eager {ratios['torch_eager_over_tensorflow']}x, compiled {ratios['torch_compiled_over_tensorflow']}x",
              flush=True)  # fmt: skip
        del teachers
    return {
        "patches": len(images),
        "batch_size": batch_size,
        "rounds": rounds,
        "threads": {"torch": torch.get_num_threads(), "tensorflow_intra_op": threads},
        "models": out,
    }


def stream_rates(manifest: Path, batch_size: int, input_size: int) -> dict:
    """Reading alone against reading + labelling with the demo teacher, through Ray Data."""
    import ray

    from histokd.streams import plan_resources
    from histokd.teachers.stream import (
        load_manifest_table,
        pseudo_label_dataset,
        read_patch_batch,
    )

    table = load_manifest_table(manifest)
    plan = plan_resources(ray.cluster_resources())
    start = time.perf_counter()
    reads = ray.data.from_arrow(table).map_batches(
        read_patch_batch, batch_size=batch_size, num_cpus=plan.read_cpus, batch_format="numpy"
    )
    n_read = sum(len(b["x"]) for b in reads.iter_batches(batch_size=None, batch_format="numpy"))
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    ds = pseudo_label_dataset(manifest, "demo", input_size=input_size, batch_size=batch_size)
    n_labelled = sum(len(b["x"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))
    stream_s = time.perf_counter() - start
    return {
        "patches": table.num_rows,
        "read_only": {
            "patches": n_read,
            "seconds": round(read_s, 2),
            "patches_per_second": round(n_read / read_s, 3),
        },
        "read_and_label_demo": {
            "patches": n_labelled,
            "seconds": round(stream_s, 2),
            "patches_per_second": round(n_labelled / stream_s, 3),
        },  # fmt: skip
        "actors": plan.num_actors,
        "actor_cpus": plan.actor_cpus,
        "note": "wall time of a fresh dataset each, including Ray Data start-up and (stream) the teacher actor start (torch backend, the default)",
    }


def figure(images: np.ndarray, path: Path) -> None:
    """RCKD Fig. 3-like picture: real H&E tiles and demo patches, demo teacher's pseudo labels."""
    from PIL import Image

    from histokd.teachers import build_teacher
    from histokd.teachers.overlay import save_pseudo_label_grid

    tiles = REPO.parent / "shared" / "testdata" / "tiles"
    names = ["low-nuclei-score-level0.png", "medium-nuclei-score-level0.png", "high-nuclei-score-level0.png",
             "medium-nuclei-score-level1-2.png", "high-nuclei-score-red-pen-level1.png"]  # fmt: skip
    patches, captions = [], []
    for name in names:
        if (tiles / name).is_file():
            tile = Image.open(tiles / name).convert("RGB")
            side = min(tile.size)
            patches.append(np.asarray(tile.crop((0, 0, side, side)).resize((512, 512))))
            captions.append(name.replace("-nuclei-score", "").replace(".png", ""))
    for image in images[:3]:
        patches.append(np.asarray(Image.fromarray(image).resize((512, 512))))
        captions.append("synthetic demo slide")
    batch = np.stack(patches)
    teacher = build_teacher("demo")
    save_pseudo_label_grid(path, batch, teacher.pseudo_label(batch), captions,
                           columns=4, tile=200)  # fmt: skip


def main() -> None:
    """Run the benchmark and write its JSON."""
    parser = argument_parser(__doc__, Path(__file__).with_suffix(".json"))
    parser.add_argument(
        "--num-patches", type=int, default=8, help="1024x1024 patches labelled per model"
    )
    parser.add_argument(
        "--instances-patches", type=int, default=4, help="patches through predict_instances"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--input-size", type=int, default=512, help="training size of the stream's records"
    )
    parser.add_argument("--num-cpus", type=int, default=None, help="Ray CPUs (default: all)")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="CPU threads of torch and of TensorFlow (intra-op)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of the backends part")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        help="what to measure (default: all)",
    )
    parser.add_argument(
        "--figure",
        default=str(REPO / "runs" / "benchmarks" / "teacher_pseudo_labels.png"),
        help="RCKD Fig. 3-like PNG of the demo teacher's pseudo labels, a picture, not a "
        "measurement: under runs/ (not versioned) by default; '' for none",
    )
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import ray
    import torch

    from histokd.teachers.stardist_teacher import configure_tensorflow

    # Before either library runs an op: both then use the same number of CPU threads.
    tf = configure_tensorflow(args.threads)
    torch.set_num_threads(args.threads)
    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    work = Path(tempfile.mkdtemp(prefix="teacher-bench-"))
    images, manifest = demo_patches(work, args.num_patches)
    print(
        f"{len(images)} patches of {images.shape[1]}x{images.shape[2]}; GPUs: {gpus or 'none'}",
        flush=True,
    )
    models = benchmark_models(work)
    results = {
        "machine": {**machine(), "tensorflow_gpus": gpus, "load_average_at_start": load_average()},
        "patch_size": int(images.shape[1]),
    }
    if "label_rates" in args.parts:
        results["label_rates"] = label_rates(
            models, images, args.batch_size, min(args.instances_patches, len(images))
        )
    if "backends" in args.parts:
        results["backends"] = backend_rates(
            models, images, args.batch_size, args.threads, args.rounds
        )
    if "figure" in args.parts and args.figure:
        Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
        figure(images, Path(args.figure))
    if "stream" in args.parts:
        ray.init(
            num_cpus=args.num_cpus,
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
        )
        results["stream"] = stream_rates(manifest, args.batch_size, args.input_size)
        ray.shutdown()
    results["machine"]["load_average_at_end"] = load_average()
    print(json.dumps(results, indent=2))
    write_json(args.out, results)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
