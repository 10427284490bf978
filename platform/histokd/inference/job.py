"""The whole-slide inference driver: model + slides -> per-slide outputs, reports and MLflow.

``run_prediction`` resolves the model and its input geometry, skips slides whose outputs from
the same model and settings exist whole (each file's size and SHA-256 as ``summary.json``
records them; a damaged slide is predicted again, with a line saying why), streams the rest
through `prediction_dataset`, and writes each slide as soon as its last tile arrives
(`SlideAssembly`). The driver holds only the slides in flight, so its memory does not grow with
the number of slides. A slide that cannot be used is listed in ``bad_slides.csv`` and
skipped; the run fails only when no slide could be used.

Run folder ``STORAGE/RUN_NAME``::

    config.yaml  model.json  run.json  summary.csv  bad_slides.csv
    slides/<slide_id>/{summary.json, predictions.parquet, heatmap.ome.tif, labels.ome.tif,
                       overlay.png, heatmap.png, predictions.geojson}
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histokd.cli import config_to_dict, save_config
from histokd.inference.assembly import (
    OUTPUT_FILES,
    PARTIAL_PREFIX,
    OutputSettings,
    SlideAssembly,
    read_summary,
)
from histokd.inference.config import PredictConfig
from histokd.inference.model_file import (
    TaskModelInfo,
    describe_checkpoint,
    find_best_model,
    load_checkpoint,
)
from histokd.inference.outputs import damaged_output
from histokd.inference.stream import BAD, EMPTY, TileStreamSettings, prediction_dataset
from histokd.manifest import BAD_SLIDES_FILE, discover_slides, slide_id_for, write_skipped_slides
from histokd.resume import file_sha256, write_atomic, write_text_atomic
from histokd.run import holds_run_lock
from histokd.tracking import fetch_model_file, is_model_uri

__all__ = ["PredictError", "PredictResult", "resolve_model", "run_prediction"]

log = logging.getLogger(__name__)

SLIDES_DIR = "slides"
RUN_FILE = "run.json"
SUMMARY_TABLE = "summary.csv"
MLFLOW_MODEL_DIR = "mlflow_model"  # where an MLflow model given as --model is downloaded


class PredictError(RuntimeError):
    """The run could not produce anything: no slides, or every slide bad (the report lists why)."""


@dataclass
class PredictResult:
    """What an inference run did.

    Attributes:
        run_dir: The run folder.
        slides: Summary of every slide with outputs (this run's and those skipped), input order.
        bad_slides: Slide path -> (stage, reason) of this run's bad slides.
        num_slides: Slides given.
        num_predicted: Slides predicted in this run.
        num_skipped: Slides whose outputs existed from before.
        num_tiles: Tiles predicted in this run.
        seconds: Wall time of the stream.
        max_slides_in_flight: Most slides the driver held at once.
        mlflow_run_id: The MLflow run, when tracked.
        files: Name -> path of the run-level files.
    """

    run_dir: str
    slides: list[dict[str, Any]]
    bad_slides: dict[str, tuple[str, str]]
    num_slides: int
    num_predicted: int
    num_skipped: int
    num_tiles: int
    seconds: float
    max_slides_in_flight: int
    mlflow_run_id: str | None = None
    files: dict[str, str] = field(default_factory=dict)

    @property
    def num_bad(self) -> int:
        """Bad slides of this run."""
        return len(self.bad_slides)

    @property
    def tiles_per_second(self) -> float:
        """Tiles predicted per second of the stream's wall time."""
        return self.num_tiles / self.seconds if self.seconds > 0 else 0.0


def resolve_model(config: PredictConfig) -> tuple[dict[str, Any], TaskModelInfo]:
    """The model file's contents and its info, completed from the config. An MLflow model URI
    (``runs:/``, ``models:/``) gives the histokd model file inside that model, downloaded into
    ``WORK_DIR/mlflow_model``.

    Raises:
        ValueError: No model given, an unusable file or URI, or an impossible output magnification.
    """
    if not config.model:
        raise ValueError(
            "model is empty: give a best_model.pt of the fine-tuning job (or its run folder) as --model"
        )
    if is_model_uri(config.model):  # the model file inside the MLflow model, downloaded
        path = fetch_model_file(
            config.model, config.tracking_uri, config.work_dir / MLFLOW_MODEL_DIR
        )
        print(f"model: {config.model} ({path})", flush=True)
    elif Path(config.model).is_dir():
        path = find_best_model(config.model)
    else:
        path = Path(config.model)
    checkpoint = load_checkpoint(path)
    if config.stain_norm != "model":  # replaces the file's, for the actors too
        from histokd.stain import stain_normalization

        record = stain_normalization(config.stain_norm, config.stain_reference)
        checkpoint["config"] = {**checkpoint["config"], "stain_normalization": record}
    info = describe_checkpoint(str(path), checkpoint).resolve(
        config.magnification, config.patch_size, config.class_names or None
    )
    if config.output_magnification > info.magnification + 1e-9:
        raise ValueError(
            f"output_magnification={config.output_magnification:g}: above the model's {info.magnification:g}x; "
            f"allowed: at most {info.magnification:g}"
        )
    return checkpoint, info


def _fingerprint(info: TaskModelInfo, config: PredictConfig, overlap: float) -> str:
    """Identity of the outputs: the model file's bytes and every setting that changes them."""
    settings = {
        "model_sha256": file_sha256(info.path),
        "class_names": list(info.class_names), "magnification": info.magnification, "patch_size": info.patch_size,
        "overlap": overlap, "blend": config.blend, "output_magnification": config.output_magnification,
        "min_tissue_fraction": config.min_tissue_fraction, "tissue_hue_range": config.tissue_hue_range,
        "base_magnification": config.base_magnification, "stain_normalization": info.stain_normalization,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _clean_partials(slides_dir: Path) -> None:
    """Remove half-written slide folders of an interrupted run."""
    for leftover in slides_dir.glob(f"{PARTIAL_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _write_summary_table(
    path: Path, summaries: list[dict[str, Any]], class_names: list[str]
) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(
                ["slide_id", "slide_path", "num_tiles", "num_unreadable_tiles"]
                + [f"fraction_{n}" for n in class_names]
                + [f"mean_prob_{n}" for n in class_names]
            )
            for s in summaries:
                writer.writerow(
                    [s["slide_id"], s["slide_path"], s["num_tiles"], s["num_unreadable_tiles"]]
                    + [f"{s['class_fractions'][n]:.6f}" for n in class_names]
                    + [f"{s['mean_probabilities'][n]:.6f}" for n in class_names]
                )

    write_atomic(path, write)


@holds_run_lock
def run_prediction(
    config: PredictConfig,
    *,
    on_slide_done: Callable[[dict[str, Any]], None] | None = None,
    tracking: bool = True,
) -> PredictResult:
    """Predict every slide of ``config`` (or finish an interrupted run of the same name).

    Args:
        config: The job's settings.
        on_slide_done: Called in the driver with each slide's summary right after its outputs
            are in place (an exception here stops the run like a crash would).
        tracking: Log to MLflow.

    Returns:
        What was done, with every finished slide's summary.

    Raises:
        ValueError: A bad model file or setting (before any slide is read).
        PredictError: No slides, or no slide could be used.
    """
    checkpoint, info = resolve_model(config)
    overlap = (
        config.overlap
        if config.overlap is not None
        else (0.25 if info.task == "segmentation" else 0.0)
    )
    tile_side = max(1, round(info.patch_size * config.output_magnification / info.magnification))
    paths = discover_slides(config.slides) if config.slides else []
    if not paths:
        raise PredictError(
            f"no slides found in {config.slides!r}: give slide files, folders or .txt lists as --slides"
        )
    run_dir = Path(config.run_dir)
    slides_dir = run_dir / SLIDES_DIR
    slides_dir.mkdir(parents=True, exist_ok=True)
    _clean_partials(slides_dir)
    save_config(config, run_dir / "config.yaml")
    (run_dir / "model.json").write_text(json.dumps(info.as_dict(), indent=2) + "\n")
    fingerprint = _fingerprint(info, config, overlap)
    settings = OutputSettings(
        info=info, output_magnification=config.output_magnification, tile_side=tile_side, overlap=overlap,
        blend=config.blend, overlay_max_side=config.overlay_max_side, base_magnification=config.base_magnification,
        fingerprint=fingerprint,
    )  # fmt: skip
    ids = {p: slide_id_for(p) for p in paths}
    finished: dict[str, dict[str, Any]] = {}
    for p in paths:
        previous = None if config.overwrite else read_summary(slides_dir / ids[p])
        if previous is not None and previous.get("fingerprint") == fingerprint:
            damage = damaged_output(
                slides_dir / ids[p], previous.get("outputs"), list(OUTPUT_FILES.values())
            )
            if damage is not None:  # deleted, truncated or changed since: predict it again
                print(f"slide {ids[p]}: predicting again, {damage}", flush=True)
                continue
            previous["dir"] = str(slides_dir / ids[p])
            finished[p] = previous
    pending = [p for p in paths if p not in finished]
    print(
        f"predicting {len(pending)} of {len(paths)} slide(s) with {info.task} model {info.backbone} "
        f"({len(info.class_names)} classes, {info.patch_size} px at {info.magnification:g}x -> {info.input_size} px); "
        f"{len(finished)} finished before",
        flush=True,
    )

    run = None
    if tracking:
        from histokd.run import open_mlflow_run

        params = {
            **config_to_dict(config), "resolved_overlap": overlap, "task": info.task, "backbone": info.backbone,
            "resolved_magnification": info.magnification, "resolved_patch_size": info.patch_size,
            "input_size": info.input_size, "class_names_resolved": ",".join(info.class_names), "num_slides": len(paths),
        }  # fmt: skip
        run = open_mlflow_run(config, "predict", params=params)

    bad: dict[str, tuple[str, str]] = {}
    done_now: list[dict[str, Any]] = []
    num_tiles, max_in_flight = 0, 0
    started = time.monotonic()
    try:
        if pending:
            from histokd.cluster import init_ray

            init_ray(config.ray_address)
            stream = TileStreamSettings(
                magnification=info.magnification, patch_size=info.patch_size, input_size=info.input_size,
                overlap=overlap, tissue=config.tissue_filter(), base_magnification=config.base_magnification,
            )  # fmt: skip
            dataset = prediction_dataset(
                pending, checkpoint, info.path, stream, tile_side, batch_size=config.batch_size,
                num_actors=config.num_workers, num_gpus=config.gpus_per_worker, precision=config.precision,
            )  # fmt: skip
            in_flight: dict[int, SlideAssembly] = {}
            # no prefetching: a finished block reaches the driver at once (Ray Data runs ahead anyway)
            for batch in dataset.iter_batches(
                batch_size=None, batch_format="numpy", prefetch_batches=0
            ):
                index = np.asarray(batch["slide_index"])
                for slide_index in np.unique(index):
                    rows = np.flatnonzero(index == slide_index)
                    path = pending[int(slide_index)]
                    first = {
                        k: batch[k][rows[0]]
                        for k in batch
                        if k not in ("probabilities", "probability_map")
                    }
                    if first["status"] == BAD:
                        bad[path] = ("plan", str(first["message"]))
                        log.warning("bad slide, skipped: %s", first["message"])
                        continue
                    assembly = in_flight.get(int(slide_index))
                    if assembly is None:
                        assembly = in_flight[int(slide_index)] = SlideAssembly(
                            ids[path], path, first, settings
                        )
                    assembly.add(batch, rows)
                    max_in_flight = max(max_in_flight, len(in_flight))
                    if first["status"] == EMPTY or assembly.complete:
                        del in_flight[int(slide_index)]
                        _finish(assembly, path, slides_dir, bad, done_now, finished, on_slide_done)
                        num_tiles += assembly.num_predicted
            for slide_index, assembly in in_flight.items():  # cannot happen unless rows were lost
                bad[pending[slide_index]] = (
                    "stream",
                    f"only {assembly.received} of {assembly.tile_count} tiles arrived",
                )
    except Exception:  # Ctrl-C and SIGTERM: cli.run_job ends the run as KILLED
        if run is not None:
            run.finish("FAILED")
        raise
    seconds = time.monotonic() - started

    files = {
        "bad_slides": str(run_dir / BAD_SLIDES_FILE),
        "run": str(run_dir / RUN_FILE),
        "summary_table": str(run_dir / SUMMARY_TABLE),
    }
    write_skipped_slides(Path(files["bad_slides"]), bad)
    summaries = [finished[p] for p in paths if p in finished]
    _write_summary_table(Path(files["summary_table"]), summaries, list(info.class_names))
    result = PredictResult(
        run_dir=str(run_dir), slides=summaries, bad_slides=bad, num_slides=len(paths), num_predicted=len(done_now),
        num_skipped=len(paths) - len(pending), num_tiles=num_tiles, seconds=seconds, max_slides_in_flight=max_in_flight,
        mlflow_run_id=run.run_id if run else None, files=files,
    )  # fmt: skip
    counts = {
        "num_slides": result.num_slides, "num_predicted": result.num_predicted, "num_skipped": result.num_skipped,
        "num_bad": result.num_bad, "num_tiles": result.num_tiles, "seconds": round(seconds, 3),
        "tiles_per_second": round(result.tiles_per_second, 3), "max_slides_in_flight": max_in_flight,
    }  # fmt: skip
    record = {
        **counts,
        "fingerprint": fingerprint,
        "bad_slides": {p: list(v) for p, v in bad.items()},
    }
    write_text_atomic(run_dir / RUN_FILE, json.dumps(record, indent=2) + "\n")
    if run is not None:
        run.log_metrics({k: float(v) for k, v in counts.items() if math.isfinite(float(v))})
        for name in ("bad_slides", "run", "summary_table"):
            run.log_artifact(files[name])
        for summary in done_now[: config.mlflow_overlays]:
            run.log_artifact(
                Path(summary["dir"]) / summary["files"]["overlay"],
                f"overlays/{summary['slide_id']}",
            )
    print(
        f"{result.num_predicted} slide(s) predicted ({num_tiles} tiles, {result.tiles_per_second:.1f} tiles/s), "
        f"{result.num_skipped} finished before, {result.num_bad} bad (listed in {files['bad_slides']})",
        flush=True,
    )
    if not summaries:
        if run is not None:
            run.finish("FAILED")
        reasons = "\n".join(
            f"  {why}" for _, (_, why) in sorted(bad.items())
        )  # each reason names its slide
        raise PredictError(
            f"no usable slides among {len(paths)}; {len(bad)} bad:\n{reasons}\nreport: {files['bad_slides']}"
        )
    if run is not None:
        run.finish("FINISHED")
    return result


def _finish(
    assembly: SlideAssembly,
    path: str,
    slides_dir: Path,
    bad: dict[str, tuple[str, str]],
    done_now: list[dict[str, Any]],
    finished: dict[str, dict[str, Any]],
    on_slide_done: Callable[[dict[str, Any]], None] | None,
) -> None:
    """Write a complete slide, or report it when none of its tiles could be read."""
    if assembly.tile_count and assembly.num_predicted == 0:
        bad[path] = (
            "read",
            f"all {assembly.tile_count} tiles unreadable; first: {assembly.unreadable[0]}",
        )
        log.warning("bad slide, skipped: %s", bad[path][1])
        return
    if assembly.unreadable:
        log.warning(
            "%s: %d of %d tiles unreadable, skipped: %s",
            path,
            len(assembly.unreadable),
            assembly.tile_count,
            assembly.unreadable[0],
        )
    summary = assembly.write(slides_dir)
    finished[path] = summary
    done_now.append(summary)
    print(
        f"slide {summary['slide_id']}: {summary['num_tiles']} tiles, "
        + ", ".join(f"{n} {f:.1%}" for n, f in summary["class_fractions"].items()),
        flush=True,
    )
    if on_slide_done is not None:
        on_slide_done(summary)
