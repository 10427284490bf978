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

Pseudo labels are written through to a :class:`PseudoLabelCache`; on later epochs and reruns
patches with a cached label skip the teacher. Ray Data restarts a dead actor and retries the
batch it held (``max_restarts=-1``, ``max_task_retries=-1``), so every manifest patch comes out
exactly once.

With the teacher in the training workers instead (``teacher_placement="trainer"``),
:func:`patch_dataset` streams read tasks only, into records::

    {image: uint8 (S, S, 3), patch: uint8 (P, P, 3), slide, x, y, patch_id}

(``patch`` only when P != S), and each worker's :class:`TrainerTeacher` labels the full-size
patch on its device with the PyTorch StarDist teacher and resizes the label with
:func:`resize_label_tensor`, which equals :func:`resize_label` pixel for pixel: both placements
train on the same labels.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from PIL import Image

from histokd.streams import plan_resources, worker_patch_reader
from histokd.teachers.base import TeacherError
from histokd.teachers.cache import PseudoLabelCache, patch_key, teacher_fingerprint

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
    """Records of patches whose pseudo label is cached: the patch is read, the label loaded."""
    images = _read_images(batch)
    labels = np.empty((len(images), input_size, input_size), np.uint8)
    shards = batch["cache_shard"]
    rows = batch["cache_row"]
    for shard in np.unique(shards):
        where = np.flatnonzero(shards == shard)
        labels[where] = PseudoLabelCache.read_labels(str(shard), rows[where].tolist())
    return _record(batch, np.stack([resize_image(im, input_size) for im in images]), labels)


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
    """A Ray Data actor holding one teacher: labels batches, resizes, writes the cache.

    Args:
        teacher: Teacher spec for :func:`histokd.teachers.build_teacher`.
        teacher_kwargs: Its settings (``alpha``, ``mask_mode``, ...).
        input_size: Side of the output records.
        cache_root: Cache folder, or None for no cache.
        fingerprint: The teacher's cache fingerprint.
        intra_op_threads: TensorFlow CPU threads (the actor's CPU share).
    """

    def __init__(
        self,
        teacher: str,
        teacher_kwargs: dict[str, Any] | None,
        input_size: int,
        cache_root: str | None,
        fingerprint: str,
        intra_op_threads: int | None = None,
    ):
        from histokd.teachers.registry import is_stardist_spec

        kwargs = dict(teacher_kwargs or {})
        if intra_op_threads is not None and is_stardist_spec(teacher):
            kwargs.setdefault("intra_op_threads", intra_op_threads)
        self._spec, self._kwargs = teacher, kwargs
        self._teacher = None  # built on the first cache miss: see `teacher`
        self.input_size = input_size
        self.cache = PseudoLabelCache(cache_root, fingerprint) if cache_root else None
        # Read once per actor: a dataset executes again every epoch with fresh actors, so
        # labels written in earlier epochs are found here and the teacher is skipped.
        self.index = self.cache.index() if self.cache is not None else {}
        self.labelled = 0  # patches this actor ran the teacher on
        self.reused = 0

    @property
    def teacher(self):
        """The teacher, loaded on first use.

        Every epoch starts fresh actors; once the cache holds every patch (after the first
        epoch) they never load TensorFlow and the model, which took ~10 s an epoch in the demo.
        The spec was checked in the driver before any actor started (`_check_spec`).
        """
        if self._teacher is None:
            from histokd.teachers.registry import build_teacher

            self._teacher = build_teacher(self._spec, **self._kwargs)
        return self._teacher

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Label a batch of read patches (or load their cached labels); records at the input size."""
        images = np.asarray(batch["image"])
        size = self.input_size
        small_images = np.stack([resize_image(image, size) for image in images])
        small_labels = np.empty((len(images), size, size), np.uint8)
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
        hits = [self.index.get(k) for k in keys]
        missing = [i for i, hit in enumerate(hits) if hit is None]
        by_shard: dict[str, list[int]] = {}
        for i, hit in enumerate(hits):
            if hit is not None:
                by_shard.setdefault(hit[0], []).append(i)
        for shard, where in by_shard.items():
            small_labels[where] = PseudoLabelCache.read_labels(shard, [hits[i][1] for i in where])
        if missing:
            labels = self.teacher.pseudo_label(images[missing])
            small_labels[missing] = np.stack([resize_label(label, size) for label in labels])
            if self.cache is not None:
                shard = self.cache.write(
                    [keys[i] for i in missing],
                    [str(batch["slide_path"][i]) for i in missing],
                    np.asarray(batch["x"])[missing],
                    np.asarray(batch["y"])[missing],
                    small_labels[missing],
                )
                for row, i in enumerate(missing):
                    self.index[keys[i]] = (str(shard), row)
        self.labelled += len(missing)
        self.reused += len(keys) - len(missing)
        return _record(batch, small_images, small_labels)


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
):
    """A Ray Dataset of pseudo-labelled patches of a manifest, each patch exactly once.

    Args:
        manifest: Manifest Parquet file or folder, Arrow table or DataFrame
            (:mod:`histokd.manifest`).
        teacher: Teacher spec (see :func:`histokd.teachers.build_teacher`).
        teacher_kwargs: Teacher settings, e.g. ``{"alpha": 0.5, "mask_mode": "probability"}``.
        input_size: Side of the records' image and pseudo label (RCKD: 512).
        cache_dir: Pseudo-label cache folder; None labels every patch every time.
        batch_size: Patches per teacher call.
        num_actors: Teacher actors; None: one per GPU, or one on a CPU cluster.
        num_gpus: GPU share per actor when the cluster has GPUs.
        reserved_cpus: CPUs to leave for the training workers.
        resources: Custom Ray resources each teacher actor asks for (e.g. ``{"teacher_node": 1}``
            places the actors on the nodes started with that resource); read tasks go anywhere.

    Returns:
        A lazy ``ray.data.Dataset`` of records {image, pseudo_label, slide, x, y, patch_id}.

    Raises:
        TeacherError: A bad manifest, settings or cluster size (before any work starts).
    """
    import ray
    from ray.data import ActorPoolStrategy

    from histokd.teachers.registry import portable_spec

    _check_sizes(input_size, batch_size)
    _check_spec(teacher, teacher_kwargs)
    teacher = portable_spec(teacher)  # a user's registered teacher: its module, for the actors
    table = load_manifest_table(manifest)
    from histokd.cluster import init_ray

    init_ray()
    plan = plan_resources(ray.cluster_resources(), num_actors, num_gpus, reserved_cpus)
    fingerprint = teacher_fingerprint(teacher, teacher_kwargs)
    cache = PseudoLabelCache(cache_dir, fingerprint) if cache_dir else None

    cached_rows: list[int] = []
    shards: list[str] = []
    rows: list[int] = []
    if cache is not None:
        index = cache.index()
        columns = [
            table.column(c).to_pylist()
            for c in ("slide_path", "x", "y", "magnification", "patch_size")
        ]
        for i, (s, x, y, m, p) in enumerate(zip(*columns, strict=True)):
            hit = index.get(patch_key(s, x, y, m, p, input_size))
            if hit is not None:
                cached_rows.append(i)
                shards.append(hit[0])
                rows.append(hit[1])
    cached_set = set(cached_rows)
    missing = table.take(
        pa.array([i for i in range(table.num_rows) if i not in cached_set], pa.int64())
    )
    log.info(
        "teacher stream %s: %d patches, %d with cached labels, %d to label; %d actor(s) x %.2g CPU, %.2g GPU",
        fingerprint, table.num_rows, len(cached_rows), missing.num_rows, plan.num_actors, plan.actor_cpus, plan.actor_gpus,
    )  # fmt: skip

    parts = []
    if missing.num_rows:
        labelled = (
            ray.data.from_arrow(_blocks(missing, batch_size * 2))
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
                    "cache_root": str(cache_dir) if cache_dir else None,
                    "fingerprint": fingerprint,
                    "intra_op_threads": plan.intra_op_threads,
                },
                compute=ActorPoolStrategy(size=plan.num_actors),
                batch_size=batch_size,
                num_cpus=plan.actor_cpus,
                num_gpus=plan.actor_gpus or None,
                resources=dict(resources) if resources else None,
                batch_format="numpy",
            )
        )
        parts.append(labelled)
    if cached_rows:
        hits = table.take(pa.array(cached_rows, pa.int64()))
        hits = hits.append_column("cache_shard", pa.array(shards, pa.string()))
        hits = hits.append_column("cache_row", pa.array(rows, pa.int64()))
        reused = ray.data.from_arrow(_blocks(hits, batch_size * 4)).map_batches(
            read_cached_batch,
            fn_kwargs={"input_size": input_size},
            batch_size=batch_size,
            num_cpus=plan.read_cpus,
            batch_format="numpy",
        )
        parts.append(reused)
    if not parts:
        raise TeacherError("the manifest has no rows: nothing to label")
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


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
