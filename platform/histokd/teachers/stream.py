"""The teacher stream: manifest -> patch reads -> teacher actor pool -> training records.

RCKD Sec. 2.2.1 labels every pretraining patch with the teacher's pseudo label. Here Ray Data
streams the manifest's patches from the slides (read tasks), through a pool of teacher actors
(``map_batches`` with an :class:`~ray.data.ActorPoolStrategy`; each actor loads its teacher
once, TensorFlow only in the actor processes), into records::

    {image: uint8 (S, S, 3), pseudo_label: uint8 (S, S) {0, 1}, slide, x, y, patch_id}

at the training input size S (RCKD: 512, resized bilinearly from the 1024 px patch).

Resources: each actor takes ``num_gpus`` of a GPU when the cluster has GPUs (fractional, so a
training worker shares the GPU), and the CPUs left after ``reserved_cpus`` are split between
the actors and the read tasks, so on a 2-CPU machine neither starves the other. Custom
``resources`` pin the actors to the nodes that offer them.

With a record cache (:class:`~histokd.teachers.cache.RecordCache`) the stream runs in two
phases. First the patches without a cached record go through the read tasks and the actor
pool, which write each batch's records (encoded image and packed label) as a shard; this runs to
the end on the driver, before the dataset is returned. Then the dataset returned streams the
records of every manifest patch from the shards (:func:`read_cached_batch`: decode the images,
unpack the labels): Ray Train executes a dataset's plan again every epoch, and this plan has no
slide read and no teacher in it, so no epoch and no rerun decodes a slide or runs the teacher
again. Without a cache every epoch reads and labels every patch. Ray Data restarts a dead actor
and retries the batch it held (``max_restarts=-1``, ``max_task_retries=-1``), so every manifest
patch comes out exactly once.

With the teacher in the training workers instead (``teacher_placement="trainer"``),
:func:`patch_dataset` streams read tasks only, into records::

    {image: uint8 (S, S, 3), patch: uint8 (P, P, 3), slide, x, y, patch_id}

(``patch`` only when P != S), and each worker's :class:`TrainerTeacher` labels the full-size
patch on its device with the PyTorch StarDist teacher and resizes the label with
:func:`resize_label_tensor`, which equals :func:`resize_label` pixel for pixel: both placements
train on the same labels. That placement keeps no record cache: the teacher labels every epoch.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from PIL import Image

from histokd.streams import StreamResources, plan_resources, worker_patch_reader
from histokd.teachers.base import TeacherError
from histokd.teachers.cache import RecordCache, check_record_settings, patch_key

if TYPE_CHECKING:
    import torch

__all__ = [
    "REQUIRED_COLUMNS",
    "TeacherActor",
    "TrainerTeacher",
    "load_manifest_table",
    "patch_dataset",
    "pseudo_label_dataset",
    "read_cached_batch",
    "read_patch_batch",
    "read_resized_batch",
    "resize_image",
    "resize_label",
    "resize_label_tensor",
]

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("slide_path", "x", "y", "magnification", "patch_size", "base_magnification")
_META_COLUMNS = (
    "patch_id",
    "slide_path",
    "x",
    "y",
    "magnification",
    "patch_size",
    "base_magnification",
)


# -- resizing to the training input size ----------------------------------------------------
def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 to (size, size, 3), bilinear, as RCKD Sec. 2.2.1 resizes inputs to 512.

    PIL's bilinear filter widens its support on downscaling, so it does not alias.
    """
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def resize_label(label: np.ndarray, size: int) -> np.ndarray:
    """A {0, 1} mask to (size, size): the area-weighted share of nucleus, thresholded at one half."""
    if label.shape[0] == size and label.shape[1] == size:
        return label.astype(np.uint8, copy=False)
    share = Image.fromarray((label > 0).astype(np.float32)).resize(
        (size, size), Image.Resampling.BILINEAR
    )
    return (np.asarray(share) >= 0.5).astype(np.uint8)


def resize_label_tensor(labels: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`resize_label` on the labels' device: {0, 1} (N, H, W) to uint8 (N, size, size).

    PIL's computation, pass for pass: antialiased bilinear weights (``antialias=True`` is
    PIL's filter) in float64 along the width, the result rounded to float32 as PIL's "F" mode
    stores it, then along the height, then the threshold at one half. Rounding to float32
    between the passes is what makes shares of exactly one half come out as PIL's; in float32
    throughout, about 5 in 100,000 pixels differ at ratios such as 1000 -> 512.
    """
    import torch
    import torch.nn.functional as F

    height, width = labels.shape[-2:]
    if height == size and width == size:
        return (labels > 0).to(torch.uint8)
    share = (labels > 0).to(torch.float64)[:, None]
    with torch.no_grad():
        if width != size:
            share = F.interpolate(
                share, size=(height, size), mode="bilinear", align_corners=False, antialias=True
            )
            share = share.to(torch.float32).to(torch.float64)
        if height != size:
            share = F.interpolate(
                share, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
        return (share[:, 0].to(torch.float32) >= 0.5).to(torch.uint8)


# -- reading patches (Ray Data tasks) ---------------------------------------------------------
def _read_images(batch: dict[str, np.ndarray]) -> np.ndarray:
    reader = worker_patch_reader(max_open=8)
    rows = [{c: batch[c][i] for c in REQUIRED_COLUMNS} for i in range(len(batch["x"]))]
    return np.stack([reader.read(row) for row in rows])


def read_patch_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Read the patches of a batch of manifest rows; adds ``image`` (N, P, P, 3) uint8."""
    batch = dict(batch)
    batch["image"] = _read_images(batch)
    return batch


def read_cached_batch(batch: dict[str, np.ndarray], input_size: int) -> dict[str, np.ndarray]:
    """Records from the record cache: each row's ``cache_shard`` and ``cache_row`` name its
    record, whose image is decoded and label unpacked. No slide is opened."""
    n = len(batch["x"])
    images = np.empty((n, input_size, input_size, 3), np.uint8)
    labels = np.empty((n, input_size, input_size), np.uint8)
    shards = np.asarray(batch["cache_shard"]).astype(str)
    rows = np.asarray(batch["cache_row"])
    for shard in np.unique(shards):
        where = np.flatnonzero(shards == shard)
        try:
            images[where], labels[where] = RecordCache.read(str(shard), rows[where].tolist())
        except FileNotFoundError:
            import socket

            raise TeacherError(
                f"record cache shard {shard} is not on node {socket.gethostname()}: the record cache "
                "must be on a filesystem every node mounts (--record-cache), and not removed while a run reads it"
            ) from None
    return _record(batch, images, labels)


def read_resized_batch(batch: dict[str, np.ndarray], input_size: int) -> dict[str, np.ndarray]:
    """Records for a teacher in the training workers: the resized image and the full-size patch.

    The image is resized here exactly as :class:`TeacherActor` resizes it; ``patch`` (what the
    teacher labels) is left out when the patch is already at the input size.
    """
    patches = _read_images(batch)
    images = np.stack([resize_image(patch, input_size) for patch in patches])
    record = _record(batch, images)
    if patches.shape[1:3] != images.shape[1:3]:
        record["patch"] = patches
    return record


def _record(
    batch: dict[str, np.ndarray], images: np.ndarray, labels: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    record = {"image": images}
    if labels is not None:
        record["pseudo_label"] = labels
    record.update(
        slide=np.asarray(batch["slide_path"]).astype(str),
        x=np.asarray(batch["x"], np.int64),
        y=np.asarray(batch["y"], np.int64),
        patch_id=np.asarray(batch["patch_id"]).astype(str),
    )
    return record


# -- the teacher actor -----------------------------------------------------------------------
class TeacherActor:
    """A Ray Data actor holding one teacher: labels batches, resizes, writes the record cache.

    Without a cache it returns the records. With one it writes each batch's records as a
    shard and returns only where each record went (``patch_id``, ``cache_shard``,
    ``cache_row``): the records themselves are streamed from the shards later, so they need not
    travel to the driver now.

    Args:
        teacher: Teacher spec for :func:`histokd.teachers.build_teacher`.
        teacher_kwargs: Its settings (``alpha``, ``mask_mode``, ...).
        input_size: Side of the output records.
        cache_root: Record cache folder, or None for no cache.
        fingerprint: The teacher's cache fingerprint.
        intra_op_threads: TensorFlow CPU threads (the actor's CPU share).
        record_format: Image encoding of the cached records (``jpeg`` or ``png``).
        jpeg_quality: Their JPEG quality.
    """

    def __init__(
        self,
        teacher: str,
        teacher_kwargs: dict[str, Any] | None,
        input_size: int,
        cache_root: str | None,
        fingerprint: str,
        intra_op_threads: int | None = None,
        record_format: str = "jpeg",
        jpeg_quality: int = 95,
    ):
        from histokd.teachers.registry import is_stardist_spec

        kwargs = dict(teacher_kwargs or {})
        if intra_op_threads is not None and is_stardist_spec(teacher):
            kwargs.setdefault("intra_op_threads", intra_op_threads)
        self._spec, self._kwargs = teacher, kwargs
        self._teacher = None  # built on the first batch: see `teacher`
        self.input_size = input_size
        self.cache = (
            RecordCache(cache_root, fingerprint, input_size, record_format, jpeg_quality)
            if cache_root
            else None
        )
        self.labelled = 0  # patches this actor ran the teacher on

    @property
    def teacher(self):
        """The teacher, loaded on first use.

        The spec was checked in the driver before any actor started (`_check_spec`).
        """
        if self._teacher is None:
            from histokd.teachers.registry import build_teacher

            self._teacher = build_teacher(self._spec, **self._kwargs)
        return self._teacher

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Label a batch of read patches: records at the input size, or with a cache, where
        their records were written."""
        images = np.asarray(batch["image"])
        size = self.input_size
        small_images = np.stack([resize_image(image, size) for image in images])
        labels = self.teacher.pseudo_label(images)
        small_labels = np.stack([resize_label(label, size) for label in labels])
        self.labelled += len(images)
        if self.cache is None:
            return _record(batch, small_images, small_labels)
        keys = [
            patch_key(s, x, y, m, p, size)
            for s, x, y, m, p in zip(
                batch["slide_path"],
                batch["x"],
                batch["y"],
                batch["magnification"],
                batch["patch_size"],
                strict=True,
            )
        ]
        shard = self.cache.write(
            keys,
            [str(s) for s in batch["slide_path"]],
            batch["x"],
            batch["y"],
            small_images,
            small_labels,
        )
        return {
            "patch_id": np.asarray(batch["patch_id"]).astype(str),
            "cache_shard": np.full(len(keys), str(shard)),
            "cache_row": np.arange(len(keys), dtype=np.int64),
        }


# -- the teacher in a training worker ------------------------------------------------------------
class TrainerTeacher:
    """The teacher inside a training worker (``teacher_placement="trainer"``).

    Built on first use, on the worker's device; labels a batch of :func:`patch_dataset`
    records there, in calls of ``batch_size`` patches: the full-size patch through
    ``label_tensor`` (normalisation, network, grid upsampling, RCKD Eq. 2), then
    :func:`resize_label_tensor` to the input size, as :class:`TeacherActor` does on the CPU.

    Args:
        teacher: Teacher spec for :func:`histokd.teachers.build_teacher`: a StarDist teacher.
        teacher_kwargs: Its settings (``alpha``, ``backend="torch"``, ``precision``, ...).
        input_size: Side of the labels returned.
        batch_size: Patches per teacher call.
        device: The worker's device.
    """

    def __init__(
        self,
        teacher: str,
        teacher_kwargs: dict[str, Any] | None,
        input_size: int,
        batch_size: int,
        device: torch.device | str,
    ):
        self._spec = teacher
        self._kwargs = {**(teacher_kwargs or {}), "device": device}
        self.input_size = input_size
        self.batch_size = batch_size
        self._teacher = None

    @property
    def teacher(self):
        """The PyTorch teacher, built on first use.

        Raises:
            TeacherError: The spec does not give a teacher that labels tensors (a StarDist
                teacher on the torch backend).
        """
        if self._teacher is None:
            from histokd.teachers.registry import build_teacher

            teacher = build_teacher(self._spec, **self._kwargs)
            if not callable(getattr(teacher, "label_tensor", None)):
                raise TeacherError(
                    f"teacher {self._spec!r} ({type(teacher).__name__}) cannot label tensors on a device; "
                    "teacher_placement='trainer' needs a StarDist teacher with backend='torch'"
                )
            self._teacher = teacher
        return self._teacher

    def __call__(self, batch: dict[str, np.ndarray]) -> torch.Tensor:
        """Pseudo labels of a batch of records, uint8 (N, S, S) on the device."""
        import torch

        patches = np.asarray(batch["patch"] if "patch" in batch else batch["image"])
        teacher = self.teacher
        labels = []
        for start in range(0, len(patches), self.batch_size):
            chunk = torch.from_numpy(patches[start : start + self.batch_size]).to(
                teacher.device, non_blocking=True
            )
            labels.append(resize_label_tensor(teacher.label_tensor(chunk), self.input_size))
        return torch.cat(labels)


# -- the dataset --------------------------------------------------------------------------------
def load_manifest_table(manifest) -> pa.Table:
    """The manifest as an Arrow table: a Parquet file or folder, a table or a DataFrame.

    Raises:
        TeacherError: Columns are missing, or patches differ in size or magnification.
    """
    if isinstance(manifest, (str, os.PathLike)):
        from histokd.manifest import read_manifest

        table = read_manifest(manifest)
        where = str(manifest)
    elif isinstance(manifest, pa.Table):
        table, where = manifest, "manifest table"
    else:
        table, where = pa.Table.from_pandas(manifest, preserve_index=False), "manifest DataFrame"
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise TeacherError(
            f"{where}: missing column(s) {missing}; a manifest needs {', '.join(REQUIRED_COLUMNS)} "
            "(build it with histokd.manifest.build_manifest)"
        )
    if "patch_id" not in table.column_names:
        ids = [
            f"{s}/{x}_{y}"
            for s, x, y in zip(
                *(table.column(c).to_pylist() for c in ("slide_path", "x", "y")), strict=True
            )
        ]
        table = table.append_column("patch_id", pa.array(ids, pa.string()))
    for column in ("patch_size", "magnification"):
        values = set(table.column(column).to_pylist())
        if len(values) > 1:
            raise TeacherError(
                f"{where}: {column} takes {len(values)} values {sorted(values)[:5]}; the stream labels one "
                "patch size at one magnification (split the manifest)"
            )
    ids = table.column("patch_id")
    if len(set(ids.to_pylist())) != table.num_rows:
        raise TeacherError(
            f"{where}: patch_id is not unique; every manifest patch must appear once"
        )
    return table.select(list(_META_COLUMNS))


def _read_memory(table: pa.Table, batch_size: int) -> int:
    """Bytes a read task holds.

    A worker's baseline (Python, OpenSlide, open slides) and the batch of RGB patches, about
    three copies while decoding.
    """
    side = int(table.column("patch_size")[0].as_py())
    return 192 * 2**20 + batch_size * side * side * 3 * 3


def _blocks(table: pa.Table, rows_per_block: int) -> list[pa.Table]:
    return [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)]


def pseudo_label_dataset(
    manifest,
    teacher: str = "demo",
    teacher_kwargs: dict[str, Any] | None = None,
    input_size: int = 512,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    num_actors: int | None = None,
    num_gpus: float = 0.5,
    reserved_cpus: float = 0.0,
    resources: dict[str, float] | None = None,
    record_format: str = "jpeg",
    jpeg_quality: int = 95,
):
    """A Ray Dataset of pseudo-labelled patches of a manifest, each patch exactly once.

    With ``cache_dir``, the patches without a cached record are labelled first, here, before
    this returns (read tasks, then the teacher actors, which write the record shards; a
    progress line every tenth of the way), and the dataset returned streams every manifest
    patch's record from the shards: iterating it (each training epoch) reads no slide and runs
    no teacher, and a rerun with the same teacher, settings, input size and format labels
    nothing. That first phase has the cluster to itself (nothing trains yet), so it plans
    without ``reserved_cpus``. Without ``cache_dir``, every iteration reads and labels every
    patch. A teacher in the training workers (``teacher_placement="trainer"``) uses
    :func:`patch_dataset` instead, with no cache.

    Args:
        manifest: Manifest Parquet file or folder, Arrow table or DataFrame
            (:mod:`histokd.manifest`).
        teacher: Teacher spec (see :func:`histokd.teachers.build_teacher`).
        teacher_kwargs: Teacher settings, e.g. ``{"alpha": 0.5, "mask_mode": "probability"}``.
        input_size: Side of the records' image and pseudo label (RCKD: 512).
        cache_dir: Record cache folder (:class:`~histokd.teachers.cache.RecordCache`); None:
            no cache.
        batch_size: Patches per teacher call (and per cache shard).
        num_actors: Teacher actors; None: one per GPU, or one on a CPU cluster.
        num_gpus: GPU share per actor when the cluster has GPUs.
        reserved_cpus: CPUs to leave for the training workers.
        resources: Custom Ray resources each teacher actor asks for (e.g. ``{"teacher_node": 1}``
            places the actors on the nodes started with that resource); read tasks go anywhere.
        record_format: Image encoding of cached records: ``jpeg`` or lossless ``png``.
        jpeg_quality: Their JPEG quality, 1-100.

    Returns:
        A lazy ``ray.data.Dataset`` of records {image, pseudo_label, slide, x, y, patch_id}.

    Raises:
        TeacherError: A bad manifest, settings or cluster size (before any work starts).
    """
    import ray

    from histokd.teachers.registry import portable_spec

    _check_sizes(input_size, batch_size)
    try:
        check_record_settings(input_size, record_format, jpeg_quality)
    except ValueError as exc:
        raise TeacherError(str(exc)) from None
    _check_spec(teacher, teacher_kwargs)
    teacher = portable_spec(teacher)  # a user's registered teacher: its module, for the actors
    table = load_manifest_table(manifest)
    if not table.num_rows:
        raise TeacherError("the manifest has no rows: nothing to label")
    from histokd.cluster import init_ray

    init_ray()
    label = functools.partial(
        _label_stream,
        teacher=teacher,
        teacher_kwargs=teacher_kwargs,
        input_size=input_size,
        batch_size=batch_size,
        resources=resources,
    )
    if not cache_dir:
        plan = plan_resources(ray.cluster_resources(), num_actors, num_gpus, reserved_cpus)
        log.info(
            "teacher stream %s: %d patches, no record cache: labelled every epoch; %d actor(s) x %.2g CPU, "
            "%.2g GPU", teacher, table.num_rows, plan.num_actors, plan.actor_cpus, plan.actor_gpus,
        )  # fmt: skip
        return label(table, plan, cache=None)

    cache = RecordCache.for_teacher(
        cache_dir, teacher, teacher_kwargs, input_size, record_format, jpeg_quality
    )
    keys = [
        patch_key(*row, input_size)
        for row in zip(
            *(table.column(c).to_pylist() for c in ("slide_path", "x", "y", "magnification", "patch_size")),
            strict=True,
        )
    ]  # fmt: skip
    index = cache.index()
    located = [index.get(key) for key in keys]
    missing = [i for i, where in enumerate(located) if where is None]
    log.info(
        "teacher stream %s: %d patches, %d records cached, %d to label",
        cache.folder, table.num_rows, table.num_rows - len(missing), len(missing),
    )  # fmt: skip
    if missing:
        plan = plan_resources(ray.cluster_resources(), num_actors, num_gpus, 0.0)
        written = _run_labelling(
            label(table.take(pa.array(missing, pa.int64())), plan, cache=cache), len(missing)
        )
        ids = table.column("patch_id").to_pylist()
        for i in missing:
            located[i] = written.get(ids[i])
        lost = sum(where is None for where in located)
        if lost:
            raise TeacherError(
                f"record cache {cache.folder}: {lost} of {len(missing)} patches came back from "
                "the teacher actors without a record; run again to label them"
            )
    plan = plan_resources(ray.cluster_resources(), num_actors, num_gpus, reserved_cpus)
    records = table.append_column("cache_shard", pa.array([w[0] for w in located], pa.string()))
    records = records.append_column("cache_row", pa.array([w[1] for w in located], pa.int64()))
    return ray.data.from_arrow(_blocks(records, batch_size * 4)).map_batches(
        read_cached_batch,
        fn_kwargs={"input_size": input_size},
        batch_size=batch_size * 4,
        num_cpus=plan.read_cpus,
        batch_format="numpy",
    )


def _label_stream(
    table: pa.Table,
    plan: StreamResources,
    cache: RecordCache | None,
    teacher: str,
    teacher_kwargs: dict[str, Any] | None,
    input_size: int,
    batch_size: int,
    resources: dict[str, float] | None,
):
    """Read tasks -> teacher actors over ``table``: records, or with ``cache``, where the
    actors wrote them."""
    import ray
    from ray.data import ActorPoolStrategy

    return (
        ray.data.from_arrow(_blocks(table, batch_size * 2))
        .map_batches(
            read_patch_batch,
            batch_size=batch_size,
            num_cpus=plan.read_cpus,
            # The decoded batch's size, for the scheduler. It also keeps reads in their own
            # tasks: Ray Data fuses a task map into the next actor map when their remote
            # args match, which would serialise reading and labelling inside the actor.
            memory=_read_memory(table, batch_size),
            batch_format="numpy",
        )
        .map_batches(
            TeacherActor,
            fn_constructor_kwargs={
                "teacher": teacher,
                "teacher_kwargs": teacher_kwargs,
                "input_size": input_size,
                "cache_root": str(cache.root) if cache else None,
                "fingerprint": cache.fingerprint if cache else "",
                "intra_op_threads": plan.intra_op_threads,
                "record_format": cache.record_format if cache else "jpeg",
                "jpeg_quality": cache.jpeg_quality if cache else 95,
            },
            compute=ActorPoolStrategy(size=plan.num_actors),
            batch_size=batch_size,
            num_cpus=plan.actor_cpus,
            num_gpus=plan.actor_gpus or None,
            resources=dict(resources) if resources else None,
            batch_format="numpy",
        )
    )


def _run_labelling(labelling, total: int) -> dict[str, tuple[str, int]]:
    """Run the labelling phase to its end on the driver, a progress line every tenth of the way;
    returns patch id -> (shard, row) of each record written."""
    written: dict[str, tuple[str, int]] = {}
    start = last = time.monotonic()
    step = max(1, total // 10)
    for batch in labelling.iter_batches(batch_size=None, batch_format="numpy"):
        before = len(written)
        for pid, shard, row in zip(
            batch["patch_id"], batch["cache_shard"], batch["cache_row"], strict=True
        ):
            written[str(pid)] = (str(shard), int(row))
        done = len(written)
        if done // step > before // step or done == total or time.monotonic() - last > 300:
            last = time.monotonic()
            rate = done / max(last - start, 1e-9)
            print(
                f"record cache: {done:,}/{total:,} patches labelled and stored ({rate:.1f}/s)",
                flush=True,
            )
    return written


def patch_dataset(
    manifest,
    input_size: int = 512,
    batch_size: int = 8,
    reserved_cpus: float = 0.0,
):
    """A Ray Dataset of the manifest's patches for a teacher in the training workers.

    Read tasks only (no actor pool, no pseudo labels, no cache): each record holds the image
    resized to ``input_size`` as the teacher actors resize it and, when the patch is larger
    or smaller, the full-size ``patch`` that :class:`TrainerTeacher` labels. Each patch comes
    out exactly once.

    Args:
        manifest: Manifest Parquet file or folder, Arrow table or DataFrame.
        input_size: Side of the records' image (RCKD: 512).
        batch_size: Patches per read task call.
        reserved_cpus: CPUs to leave for the training workers.

    Returns:
        A lazy ``ray.data.Dataset`` of records {image, patch, slide, x, y, patch_id}.

    Raises:
        TeacherError: A bad manifest, settings or cluster size (before any work starts).
    """
    import ray

    _check_sizes(input_size, batch_size)
    table = load_manifest_table(manifest)
    if not table.num_rows:
        raise TeacherError("the manifest has no rows: nothing to read")
    from histokd.cluster import init_ray

    init_ray()
    plan = plan_resources(ray.cluster_resources(), reserved_cpus=reserved_cpus, placement="trainer")
    side = int(table.column("patch_size")[0].as_py())
    log.info(
        "patch stream for a teacher in the training workers: %d patches of %d px (records carry them beside "
        "the %d px image); read tasks of %.2g CPU", table.num_rows, side, input_size, plan.read_cpus,
    )  # fmt: skip
    return ray.data.from_arrow(_blocks(table, batch_size * 2)).map_batches(
        read_resized_batch,
        fn_kwargs={"input_size": input_size},
        batch_size=batch_size,
        num_cpus=plan.read_cpus,
        memory=_read_memory(table, batch_size) + batch_size * input_size * input_size * 3,
        batch_format="numpy",
    )


def _check_sizes(input_size: int, batch_size: int) -> None:
    """The records' side and the patches per call are positive integers."""
    if not (isinstance(input_size, int) and input_size > 0):
        raise TeacherError(f"input_size={input_size!r}: must be a positive integer (RCKD: 512)")
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise TeacherError(f"batch_size={batch_size!r}: must be a positive integer")


def _check_spec(spec: str, teacher_kwargs: dict[str, Any] | None = None) -> None:
    """The spec names a teacher and its settings are valid, checked in the driver.

    Nothing here loads TensorFlow; an actor that fails to start would only be retried.
    """
    from histokd.teachers.base import TeacherSettings
    from histokd.teachers.registry import build_teacher, resolve_teacher_spec

    kwargs = dict(teacher_kwargs or {})
    TeacherSettings(
        alpha=kwargs.get("alpha") if kwargs.get("alpha") is not None else 0.5,
        mask_mode=kwargs.get("mask_mode") or "probability",
    )
    if resolve_teacher_spec(spec) == ("registered", "deconvolution"):
        build_teacher(spec, **kwargs)  # cheap: checks its own arguments
