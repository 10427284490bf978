"""The inference stream: slides -> tile plans -> tile reads -> model actor pool -> tile predictions.

One Ray Dataset carries every slide of a run, so slides flow through as a stream and the
driver only ever holds the slides in flight:

1. plan (a task per slide, `plan_slide_batch`): the tissue tiles of the slide
   (`histokd.inference.tiling.plan_tiles`), one row each, with the slide's geometry and its
   tile count. A slide that cannot be used becomes one ``bad`` row, a slide without tissue one
   ``empty`` row, so the driver learns about every slide through the same stream;
2. read (tasks, `read_tile_batch`): each tile at the magnification where ``input_size`` pixels
   cover the training images' field; an unreadable tile is marked ``unreadable``;
3. predict (``map_batches`` on an `~ray.data.ActorPoolStrategy` pool, `TilePredictor`): each
   actor builds the model once, on its GPU share where the cluster has GPUs, and returns class
   probabilities per tile, and for a segmentation model per-pixel probabilities already
   resized to the tile's footprint at the output magnification (small, float16).

The CPU shares of the actors and read tasks come from `histokd.streams.plan_resources`
(fractional, so a 2-CPU machine cannot deadlock).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from histokd.inference.tiling import plan_tiles
from histokd.slides import SlideError
from histokd.streams import plan_resources, worker_patch_reader
from histokd.tissue import TissueFilter

__all__ = [
    "META_COLUMNS",
    "TilePredictor",
    "TileStreamSettings",
    "plan_slide_batch",
    "prediction_dataset",
    "read_tile_batch",
]

log = logging.getLogger(__name__)

#: Columns every row carries from the plan to the driver.
META_COLUMNS = (
    "slide_index", "slide_path", "status", "message", "x", "y", "tile_count", "tissue_fraction",
    "width", "height", "extent", "stride", "base_magnification", "mpp", "grid_cols", "grid_rows",
)  # fmt: skip

# Row status: a tile to predict; a tile that could not be read; a slide that cannot be used;
# a slide without tissue. Only "tile" rows reach the model.
TILE, UNREADABLE, BAD, EMPTY = "tile", "unreadable", "bad", "empty"


@dataclass(frozen=True)
class TileStreamSettings:
    """What the stream needs to tile and read slides for one model.

    Attributes:
        magnification: Magnification of the model's training images.
        patch_size: Side of a training image at ``magnification``.
        input_size: Side of the model's input.
        overlap: Fraction of a tile's side shared with its neighbour.
        tissue: Tissue thresholds of the tile selection.
        base_magnification: Level-0 magnification of slides that record none.
    """

    magnification: float
    patch_size: int
    input_size: int
    overlap: float
    tissue: TissueFilter
    base_magnification: float | None = None

    @property
    def read_magnification(self) -> float:
        """Where ``input_size`` pixels cover ``patch_size`` pixels at ``magnification``."""
        return self.magnification * self.input_size / self.patch_size


# -- 1. plan ---------------------------------------------------------------------------------------
def _slide_rows(index: int, path: str, settings: TileStreamSettings) -> dict[str, np.ndarray]:
    try:
        tiles = plan_tiles(
            path,
            settings.magnification,
            settings.patch_size,
            settings.overlap,
            settings.tissue,
            settings.base_magnification,
        )
    except SlideError as exc:
        return _marker(index, path, BAD, str(exc))
    except Exception as exc:  # noqa: BLE001 - one broken slide must not end the run; it is reported
        return _marker(index, path, BAD, f"{path}: {type(exc).__name__}: {exc}")
    n = len(tiles)
    geometry = {
        "width": tiles.width, "height": tiles.height, "extent": tiles.extent, "stride": tiles.stride,
        "base_magnification": tiles.base_magnification, "mpp": tiles.mpp if tiles.mpp is not None else math.nan,
        "grid_cols": tiles.grid_shape[0], "grid_rows": tiles.grid_shape[1],
    }  # fmt: skip
    if n == 0:
        return _marker(index, path, EMPTY, "no tile reaches the tissue threshold", **geometry)
    rows = _columns(n, index, path, TILE, "", n, **geometry)
    rows["x"], rows["y"] = tiles.xs.astype(np.int64), tiles.ys.astype(np.int64)
    rows["tissue_fraction"] = tiles.tissue_fraction.astype(np.float32)
    return rows


def _columns(
    n: int, index: int, path: str, status: str, message: str, tile_count: int, **geometry: Any
) -> dict[str, np.ndarray]:
    ints = ("width", "height", "extent", "stride", "grid_cols", "grid_rows")
    rows = {
        "slide_index": np.full(n, index, np.int64),
        "slide_path": np.array([path] * n, dtype=object),
        "status": np.array([status] * n, dtype=object),
        "message": np.array([message] * n, dtype=object),
        "x": np.zeros(n, np.int64),
        "y": np.zeros(n, np.int64),
        "tile_count": np.full(n, tile_count, np.int64),
        "tissue_fraction": np.full(n, np.nan, np.float32),
        "base_magnification": np.full(
            n, float(geometry.get("base_magnification", math.nan)), np.float64
        ),
        "mpp": np.full(n, float(geometry.get("mpp", math.nan)), np.float64),
    }
    for name in ints:
        rows[name] = np.full(n, int(geometry.get(name, 0)), np.int64)
    return rows


def _marker(
    index: int, path: str, status: str, message: str, **geometry: Any
) -> dict[str, np.ndarray]:
    return _columns(1, index, path, status, message, 0, **geometry)


def plan_slide_batch(
    batch: dict[str, np.ndarray], settings: TileStreamSettings
) -> dict[str, np.ndarray]:
    """Tile rows of a batch of slides (``slide_index``, ``slide_path``); see the module docstring."""
    parts = [
        _slide_rows(int(i), str(p), settings)
        for i, p in zip(batch["slide_index"], batch["slide_path"], strict=True)
    ]
    return {k: np.concatenate([part[k] for part in parts]) for k in META_COLUMNS}


# -- 2. read ----------------------------------------------------------------------------------------
def read_tile_batch(
    batch: dict[str, np.ndarray], input_size: int, read_magnification: float
) -> dict[str, np.ndarray]:
    """Adds ``image`` (N, S, S, 3) uint8: each ``tile`` row's tile at ``read_magnification``.

    A tile that cannot be read becomes ``unreadable`` with the reader's message; other rows
    get a black image.
    """
    batch = {k: batch[k] for k in META_COLUMNS}
    n = len(batch["x"])
    images = np.zeros((n, input_size, input_size, 3), np.uint8)
    status = np.asarray(batch["status"], dtype=object).copy()
    message = np.asarray(batch["message"], dtype=object).copy()
    reader = worker_patch_reader(max_open=4)
    for i in np.flatnonzero(status == TILE):
        row = {
            "slide_path": str(batch["slide_path"][i]), "base_magnification": float(batch["base_magnification"][i]),
            "x": int(batch["x"][i]), "y": int(batch["y"][i]), "patch_size": input_size, "magnification": read_magnification,
        }  # fmt: skip
        try:
            images[i] = reader.read(row)
        except SlideError as exc:
            status[i], message[i] = UNREADABLE, str(exc)
    batch["status"], batch["message"], batch["image"] = status, message, images
    return batch


# -- 3. predict -----------------------------------------------------------------------------------------
class TilePredictor:
    """A Ray Data actor holding one fine-tuned model: tiles in, class probabilities out.

    Args:
        checkpoint: The model file's contents (`histokd.inference.model_file.load_checkpoint`),
            or a one-element list holding their ``ObjectRef``; shipped to the actor so the file
            need not be on the worker's disk.
        model_path: Where the checkpoint came from (for messages).
        tile_side: Side of a tile's footprint at the output magnification; a segmentation
            model's probabilities are resized to it.
        precision: ``auto`` (bf16 on GPU, fp32 on CPU), ``fp32`` or ``bf16``.
        threads: Torch CPU threads (the actor's CPU share).
    """

    def __init__(
        self,
        checkpoint: dict | list,
        model_path: str,
        tile_side: int,
        precision: str = "auto",
        threads: int | None = None,
    ):
        import torch

        from histokd.inference.model_file import build_model, describe_checkpoint

        if isinstance(checkpoint, list):  # [ObjectRef]: the driver put it in the object store once
            import ray

            checkpoint = ray.get(checkpoint[0])
        if threads is not None:
            torch.set_num_threads(max(1, int(threads)))
        self.info = describe_checkpoint(model_path, checkpoint)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        self.model = build_model(self.info, checkpoint["model"]).to(self.device)
        from histokd.stain import stain_normalizer

        # the training images' stain normalisation, on the tiles at the model's input size
        self.normalize_stain = stain_normalizer(self.info.stain_normalization)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.tile_side = int(tile_side)
        self.segmentation = self.info.task == "segmentation"

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities of uint8 (N, S, S, 3) tiles: (N, C) and, for segmentation, (N, C, T, T)."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            x = (
                torch.from_numpy(np.ascontiguousarray(images))
                .to(self.device, non_blocking=True)
                .permute(0, 3, 1, 2)
            )
            if self.normalize_stain is not None:
                x = self.normalize_stain(x)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.model(x)
            probs = logits.float().softmax(1)
            if not self.segmentation:
                return probs.cpu().numpy(), None
            side = self.tile_side
            mode = "area" if side < probs.shape[-1] else "bilinear"
            maps = F.interpolate(
                probs,
                size=(side, side),
                mode=mode,
                **({} if mode == "area" else {"align_corners": False}),
            )
            return maps.mean((2, 3)).cpu().numpy(), maps.half().cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Predictions of the ``tile`` rows; other rows pass through with zeros."""
        out = {k: batch[k] for k in META_COLUMNS}
        n = len(out["x"])
        c, side = self.info.num_classes, self.tile_side
        probs = np.zeros((n, c), np.float32)
        maps = np.zeros((n, c, side, side), np.float16) if self.segmentation else None
        todo = np.flatnonzero(np.asarray(out["status"], dtype=object) == TILE)
        if len(todo):
            p, m = self.predict(np.asarray(batch["image"])[todo])
            probs[todo] = p
            if maps is not None:
                maps[todo] = m
        out["probabilities"] = probs
        if maps is not None:
            out["probability_map"] = maps
        return out


# -- the dataset --------------------------------------------------------------------------------------------
def _read_memory(input_size: int, batch_size: int) -> int:
    """Bytes a read task holds: a worker's baseline and about three copies of the batch."""
    return 384 * 2**20 + batch_size * input_size * input_size * 3 * 3


def prediction_dataset(
    slides: list[str],
    checkpoint: dict,
    model_path: str,
    settings: TileStreamSettings,
    tile_side: int,
    batch_size: int = 32,
    num_actors: int | None = None,
    num_gpus: float = 1.0,
    precision: str = "auto",
):
    """A lazy Ray Dataset of tile predictions of ``slides`` (see the module docstring).

    Args:
        slides: Slide paths; ``slide_index`` in the rows is the position here.
        checkpoint: The model file's contents.
        model_path: The model file (for messages).
        settings: Tiling and reading.
        tile_side: Side of a tile's footprint at the output magnification.
        batch_size: Tiles per read task batch and per model call.
        num_actors: Model actors; None: one per GPU, or one on a CPU cluster.
        num_gpus: GPU share per actor where the cluster has GPUs.
        precision: Autocast precision of the actors.

    Returns:
        ``ray.data.Dataset`` of rows with `META_COLUMNS`, ``probabilities`` (C,) and, for a
        segmentation model, ``probability_map`` (C, T, T) float16.
    """
    import ray
    from ray.data import ActorPoolStrategy

    plan = plan_resources(ray.cluster_resources(), num_actors, num_gpus)
    log.info(
        "inference stream: %d slide(s), %d actor(s) x %.2g CPU, %.2g GPU; read tasks %.2g CPU",
        len(slides), plan.num_actors, plan.actor_cpus, plan.actor_gpus, plan.read_cpus,
    )  # fmt: skip
    items = [{"slide_index": i, "slide_path": p} for i, p in enumerate(slides)]
    # One copy in the object store, fetched by each actor; wrapped in a list so that Ray does
    # not inline it into every actor's constructor arguments.
    checkpoint_ref = [ray.put(checkpoint)]
    return (
        ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        .map_batches(
            plan_slide_batch,
            fn_kwargs={"settings": settings},
            batch_size=1,
            num_cpus=plan.read_cpus,
            batch_format="numpy",
        )
        # A slide's tiles leave its planning task as one small block; cut into blocks of a
        # batch, they are read by many tasks at once and reach the model as they are read.
        .repartition(target_num_rows_per_block=batch_size)
        .map_batches(
            read_tile_batch,
            fn_kwargs={
                "input_size": settings.input_size,
                "read_magnification": settings.read_magnification,
            },
            batch_size=batch_size,
            num_cpus=plan.read_cpus,
            # Also keeps the reads in their own tasks: Ray Data fuses maps whose remote args
            # match, which would read every tile of a slide inside its planning task.
            memory=_read_memory(settings.input_size, batch_size),
            batch_format="numpy",
        )
        .map_batches(
            TilePredictor,
            fn_constructor_kwargs={
                "checkpoint": checkpoint_ref,
                "model_path": model_path,
                "tile_side": tile_side,
                "precision": precision,
                "threads": plan.intra_op_threads,
            },  # fmt: skip
            compute=ActorPoolStrategy(size=plan.num_actors),
            batch_size=batch_size,
            num_cpus=plan.actor_cpus,
            num_gpus=plan.actor_gpus or None,
            batch_format="numpy",
        )
    )
