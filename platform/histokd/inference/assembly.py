"""One slide's predictions gathered from the stream, stitched, summarised and written atomically.

The driver makes a `SlideAssembly` when the first row of a slide arrives, feeds it every row of
that slide, and calls `SlideAssembly.write` once all of the slide's tiles are in. Outputs are
written into a hidden folder beside the final one and renamed into place, so a slide folder that
exists is complete; ``summary.json``, written last inside it, records the settings' fingerprint
and every output's size and SHA-256, which a rerun compares to skip the slide.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from histokd.inference.geojson import region_features, tile_features, write_geojson
from histokd.inference.model_file import TaskModelInfo
from histokd.inference.outputs import (
    file_record,
    heatmap_panels,
    label_overlay,
    tile_table,
    write_ome_tiff,
    write_table,
)
from histokd.inference.stitching import NO_LABEL, SlideCanvas
from histokd.inference.stream import TILE, UNREADABLE

__all__ = [
    "OUTPUT_FILES",
    "PARTIAL_PREFIX",
    "SUMMARY_FILE",
    "OutputSettings",
    "SlideAssembly",
    "read_summary",
]

SUMMARY_FILE = "summary.json"
PARTIAL_PREFIX = ".partial-"
OUTPUT_FILES = {
    "predictions": "predictions.parquet",
    "heatmap": "heatmap.ome.tif",
    "labels": "labels.ome.tif",
    "overlay": "overlay.png",
    "heatmap_png": "heatmap.png",
    "geojson": "predictions.geojson",  # QuPath: File > Import objects (histokd.inference.geojson)
}


@dataclass(frozen=True)
class OutputSettings:
    """How a slide's outputs are made.

    Attributes:
        info: The model, with its magnification and patch size resolved.
        output_magnification: Magnification of the heatmap and label mask.
        tile_side: Side of a tile's footprint at ``output_magnification``.
        overlap: Fraction of a tile's side shared with its neighbour.
        blend: Weight window of overlapping tiles.
        overlay_max_side: Longest side of the PNGs.
        base_magnification: Level-0 magnification of slides that record none.
        fingerprint: Identity of the model and settings, recorded in each summary.
    """

    info: TaskModelInfo
    output_magnification: float
    tile_side: int
    overlap: float
    blend: str
    overlay_max_side: int
    base_magnification: float | None
    fingerprint: str


def read_summary(folder: str | os.PathLike) -> dict[str, Any] | None:
    """A slide folder's ``summary.json``, or None when it is missing or unreadable."""
    try:
        return json.loads((Path(folder) / SUMMARY_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


class SlideAssembly:
    """The predictions of one slide while its tiles arrive.

    Args:
        slide_id: Folder name of the slide's outputs.
        path: Slide file.
        row: The slide's first row from the stream (its geometry and tile count).
        settings: How the outputs are made.
    """

    def __init__(self, slide_id: str, path: str, row: dict[str, Any], settings: OutputSettings):
        self.slide_id = slide_id
        self.path = path
        self.settings = settings
        self.started = time.monotonic()
        self.width, self.height = int(row["width"]), int(row["height"])
        self.base_magnification = float(row["base_magnification"])
        mpp = float(row["mpp"])
        self.mpp = None if np.isnan(mpp) else mpp
        self.extent, self.stride = int(row["extent"]), int(row["stride"])
        self.grid = (int(row["grid_cols"]), int(row["grid_rows"]))
        self.tile_count = int(row["tile_count"])
        self.downsample = (
            self.base_magnification / settings.output_magnification
        )  # level-0 px per output px
        # SlideReader.size_at: the thumbnail at the output magnification has exactly this size
        out_w = max(1, int(self.width / self.downsample))
        out_h = max(1, int(self.height / self.downsample))
        self.canvas = SlideCanvas(
            out_w, out_h, settings.info.num_classes, settings.tile_side, settings.blend
        )  # type: ignore[arg-type]
        self.received = 0
        self.unreadable: list[str] = []
        self._xs: list[int] = []
        self._ys: list[int] = []
        self._tissue: list[float] = []
        self._probs: list[np.ndarray] = []

    @property
    def complete(self) -> bool:
        """Whether every planned tile of the slide has arrived."""
        return self.received >= self.tile_count

    def add(self, batch: dict[str, np.ndarray], rows: np.ndarray) -> None:
        """Take the rows ``rows`` of a stream batch (all of this slide)."""
        maps = batch.get("probability_map")
        for i in rows:
            status = batch["status"][i]
            if status == UNREADABLE:
                self.unreadable.append(str(batch["message"][i]))
                self.received += 1
                continue
            if status != TILE:  # a marker row of a slide without tiles
                continue
            self.received += 1
            x, y = int(batch["x"][i]), int(batch["y"][i])
            tile = maps[i] if maps is not None else batch["probabilities"][i]
            mean = self.canvas.add(round(x / self.downsample), round(y / self.downsample), tile)
            self._xs.append(x)
            self._ys.append(y)
            self._tissue.append(float(batch["tissue_fraction"][i]))
            self._probs.append(mean)

    @property
    def num_predicted(self) -> int:
        """Tiles with a prediction so far."""
        return len(self._xs)

    # -- outputs ------------------------------------------------------------------------------
    def _thumbnail(self) -> tuple[np.ndarray, str | None]:
        from histokd.slides import SlideError, SlideReader

        shape = (self.canvas.height, self.canvas.width, 3)
        try:
            with SlideReader(self.path, self.settings.base_magnification) as reader:
                thumb = reader.thumbnail(self.settings.output_magnification)
        except SlideError as exc:
            return np.full(shape, 255, np.uint8), str(exc)
        if thumb.shape != shape:  # only for slides smaller than one output pixel
            thumb = np.asarray(Image.fromarray(thumb).resize((shape[1], shape[0])))
        return thumb, None

    def summary(self, probabilities: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        """Slide-level results: class fractions, mean probabilities, areas, and the settings."""
        info, s = self.settings.info, self.settings
        names = list(info.class_names)
        covered = labels != NO_LABEL
        tile_probs = np.asarray(self._probs, np.float32).reshape(-1, info.num_classes)
        if info.task == "classification":
            counts = (
                np.bincount(tile_probs.argmax(1), minlength=info.num_classes)
                if len(tile_probs)
                else np.zeros(info.num_classes)
            )
            fractions = counts / max(1, len(tile_probs))
            means = tile_probs.mean(0) if len(tile_probs) else np.zeros(info.num_classes)
            basis = "tiles"
        else:
            counts = np.bincount(labels[covered], minlength=info.num_classes)
            fractions = counts / max(1, int(covered.sum()))
            means = (
                probabilities[:, covered].mean(1) if covered.any() else np.zeros(info.num_classes)
            )
            basis = "pixels"
        pixel_um = self.mpp * self.downsample if self.mpp else None
        areas = None
        if pixel_um:
            pixels = np.bincount(labels[covered], minlength=info.num_classes)
            areas = {n: float(pixels[k] * pixel_um**2 / 1e6) for k, n in enumerate(names)}
        return {
            "slide_id": self.slide_id,
            "slide_path": self.path,
            "fingerprint": s.fingerprint,
            "model": info.path,
            "task": info.task,
            "class_names": names,
            "num_tiles": self.num_predicted,
            "num_planned_tiles": self.tile_count,
            "num_unreadable_tiles": len(self.unreadable),
            "first_unreadable": self.unreadable[0] if self.unreadable else None,
            "class_fractions": {n: float(fractions[k]) for k, n in enumerate(names)},
            "class_fractions_of": basis,
            "mean_probabilities": {n: float(means[k]) for k, n in enumerate(names)},
            "class_areas_mm2": areas,
            "predicted_fraction_of_slide": float(covered.mean()),
            "slide": {
                "width": self.width,
                "height": self.height,
                "base_magnification": self.base_magnification,
                "mpp": self.mpp,
            },  # fmt: skip
            "tiles": {
                "magnification": info.magnification,
                "patch_size": info.patch_size,
                "input_size": info.input_size,
                "read_magnification": info.read_magnification,
                "extent": self.extent,
                "stride": self.stride,
                "overlap": s.overlap,
                "grid": list(self.grid),
            },  # fmt: skip
            "output": {
                "magnification": s.output_magnification,
                "downsample": self.downsample,
                "width": self.canvas.width,
                "height": self.canvas.height,
                "pixel_size_um": pixel_um,
                "blend": s.blend,
                "no_label_value": NO_LABEL,
            },  # fmt: skip
            "files": dict(OUTPUT_FILES),
        }

    def write(self, slides_dir: str | os.PathLike) -> dict[str, Any]:
        """Write every output of the slide to ``slides_dir/<slide_id>`` atomically; returns the summary."""
        info = self.settings.info
        slides_dir = Path(slides_dir)
        final = slides_dir / self.slide_id
        tmp = slides_dir / f"{PARTIAL_PREFIX}{self.slide_id}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            probabilities = self.canvas.probabilities()
            labels = self.canvas.labels()
            thumbnail, thumb_error = self._thumbnail()
            summary = self.summary(probabilities, labels)
            summary["thumbnail_error"] = thumb_error
            pixel_um = summary["output"]["pixel_size_um"]
            description = json.dumps(
                {
                    "slide": self.path,
                    "class_names": list(info.class_names),
                    "downsample": self.downsample,
                }
            )
            heat = np.clip(probabilities * 255 + 0.5, 0, 255).astype(np.uint8)
            write_ome_tiff(
                tmp / OUTPUT_FILES["heatmap"],
                heat,
                channel_names=info.class_names,
                pixel_size_um=pixel_um,
                kind="mean",
                description=description,
            )
            write_ome_tiff(
                tmp / OUTPUT_FILES["labels"],
                labels,
                channel_names=["label"],
                pixel_size_um=pixel_um,
                kind="nearest",
                description=description,
            )
            max_side = self.settings.overlay_max_side
            Image.fromarray(
                label_overlay(thumbnail, labels, info.class_names, max_side=max_side)
            ).save(tmp / OUTPUT_FILES["overlay"])
            panels = heatmap_panels(
                thumbnail,
                probabilities,
                self.canvas.covered,
                info.class_names,
                max_side=max(64, max_side // 2),
            )
            Image.fromarray(panels).save(tmp / OUTPUT_FILES["heatmap_png"])
            table = tile_table(
                self.slide_id, np.asarray(self._xs, np.int64), np.asarray(self._ys, np.int64), self.extent,
                np.asarray(self._tissue, np.float32), np.asarray(self._probs, np.float32), info.class_names,
                info.magnification, info.patch_size,
            )  # fmt: skip
            write_table(tmp / OUTPUT_FILES["predictions"], table)
            tiles = (
                tile_features(self._xs, self._ys, self.extent, np.asarray(self._probs, np.float32), info.class_names)
                if info.task == "classification"
                else []
            )  # fmt: skip
            regions = region_features(labels, info.class_names, self.downsample)
            write_geojson(tmp / OUTPUT_FILES["geojson"], tiles + regions)
            # what a rerun checks before it trusts this folder (histokd.inference.job)
            summary["outputs"] = {n: file_record(tmp / n) for n in OUTPUT_FILES.values()}
            summary["seconds"] = round(time.monotonic() - self.started, 3)
            (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
            if final.exists():  # outputs of other settings (or --overwrite): replace them whole
                stale = slides_dir / f"{PARTIAL_PREFIX}stale-{self.slide_id}-{uuid.uuid4().hex[:8]}"
                os.replace(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        summary["dir"] = str(final)
        return summary
