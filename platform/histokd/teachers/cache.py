"""A write-through cache of pseudo labels: Parquet shards keyed by slide and position.

RCKD trains for 100 epochs over the same patches (Sec. 2.2.1); the teacher's pseudo label of
a patch never changes, so each patch is labelled once. The teacher actors write every batch
they label as one shard; a later epoch or rerun reads the index of all shards and sends only
patches without a label to the teacher.

Layout::

    <cache_dir>/<teacher fingerprint>/shard-<hash of the batch's keys>.parquet

The fingerprint covers the teacher spec, its settings (alpha, mask mode) and its weight
files, so changing any of them starts a new cache instead of reusing stale labels. A shard is
named by the keys it holds, so a retried batch (an actor died and the batch ran again)
overwrites its own shard instead of adding a second copy; shards are written to a temporary
file, synced and renamed, so a reader never sees half a shard, and a ``.sha256`` beside each is
written after it. A shard that fails its checksum or does not load (a disk fault, a copy cut
short) is set aside as ``.bad`` with one line when the index is read, and its patches are
labelled again: a damaged cache never stops a run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from histokd.resume import SIDECAR_SUFFIX, load_verified, write_atomic, write_sidecar

__all__ = ["CACHE_SCHEMA", "PseudoLabelCache", "patch_key", "teacher_fingerprint"]

CACHE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # patch_key(): slide, position, magnification, sizes
        ("slide", pa.string()),
        ("x", pa.int64()),
        ("y", pa.int64()),
        ("size", pa.int32()),  # side of the stored label (the training input size)
        ("pseudo_label", pa.binary()),  # np.packbits of the (size, size) {0, 1} label
        ("nuclei_fraction", pa.float32()),
    ]
)


def patch_key(slide: str, x: int, y: int, magnification: float, patch_size: int, size: int) -> str:
    """The cache key of one patch's label: where it is, how it was read and its stored size."""
    return f"{slide}|{int(x)}|{int(y)}|{float(magnification):g}|{int(patch_size)}|{int(size)}"


def _folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.suffix in (".h5", ".hdf5", ".json") and path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def teacher_fingerprint(spec: str, teacher_kwargs: Mapping | None = None) -> str:
    """A short name for a teacher and its settings, without loading the teacher.

    Folders (the demo teacher, model paths) contribute the contents of their weight and JSON
    files; registered names (``2D_versatile_he``) contribute the name, which StarDist pins to
    one published file by hash.
    """
    from histokd.teachers.registry import DEMO_TEACHER_DIR
    from histokd.teachers.stardist_models import STARDIST_PRETRAINED

    kwargs = dict(teacher_kwargs or {})
    if spec == "stardist":  # one name for one model, however it was asked for
        spec = f"stardist:{kwargs.pop('name', STARDIST_PRETRAINED[0])}"
    elif spec in STARDIST_PRETRAINED:
        spec = f"stardist:{spec}"
    for key in ("batch_size", "intra_op_threads", "device", "compile"):  # speed, not labels
        kwargs.pop(key, None)
    folder = DEMO_TEACHER_DIR if spec == "demo" else Path(spec).expanduser()
    files = _folder_digest(folder) if folder.is_dir() else ""
    blob = json.dumps({"spec": spec, "kwargs": kwargs, "files": files}, sort_keys=True, default=str)
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(spec).name)[:40]
    return f"{safe}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _shard_keys(shard: Path) -> list[str]:
    """The keys of a shard. Its ``.sha256`` (checked before) vouches for the rest of it; a
    shard without one is read whole, so a damaged one fails here."""
    sealed = Path(f"{shard}{SIDECAR_SUFFIX}").is_file()
    return pq.read_table(shard, columns=["key"] if sealed else None).column("key").to_pylist()


class PseudoLabelCache:
    """The pseudo labels of one teacher, stored as Parquet shards.

    Args:
        root: Cache folder shared by all teachers.
        fingerprint: The teacher's :func:`teacher_fingerprint`.
    """

    def __init__(self, root: str | os.PathLike, fingerprint: str):
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.folder = self.root / fingerprint

    def shards(self) -> list[Path]:
        """The shard files, sorted by name."""
        return sorted(self.folder.glob("shard-*.parquet")) if self.folder.is_dir() else []

    def index(self) -> dict[str, tuple[str, int]]:
        """Key -> (shard path, row) of every cached label; the first shard wins on duplicates."""
        found: dict[str, tuple[str, int]] = {}
        for shard in self.shards():
            keys = load_verified(shard, _shard_keys, "pseudo-label cache shard")
            if keys is None:  # gone, or damaged and set aside: its patches are labelled again
                continue
            for row, key in enumerate(keys):
                found.setdefault(key, (str(shard), row))
        return found

    def write(
        self,
        keys: Sequence[str],
        slides: Sequence[str],
        xs: Sequence[int],
        ys: Sequence[int],
        labels: np.ndarray,
    ) -> Path:
        """Write one batch of labels (N, S, S) {0, 1} as a shard; returns its path."""
        labels = np.asarray(labels, np.uint8)
        if labels.ndim != 3 or labels.shape[1] != labels.shape[2] or len(labels) != len(keys):
            raise ValueError(
                f"labels of shape {labels.shape} for {len(keys)} keys: expected ({len(keys)}, S, S)"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pydict(
            {
                "key": list(keys),
                "slide": list(slides),
                "x": np.asarray(xs, np.int64),
                "y": np.asarray(ys, np.int64),
                "size": np.full(len(keys), labels.shape[1], np.int32),
                "pseudo_label": [np.packbits(label).tobytes() for label in labels],
                "nuclei_fraction": labels.reshape(len(labels), -1).mean(axis=1).astype(np.float32),
            },
            schema=CACHE_SCHEMA,
        )
        name = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:24]
        path = self.folder / f"shard-{name}.parquet"
        # a retried batch replaces its shard: the old checksum goes first, so no reader ever
        # pairs the new shard with it (without one, a reader loads the shard to check it)
        Path(f"{path}{SIDECAR_SUFFIX}").unlink(missing_ok=True)
        write_atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
        write_sidecar(path)
        return path

    @staticmethod
    def read_labels(shard: str | os.PathLike, rows: Sequence[int]) -> np.ndarray:
        """Labels at ``rows`` of one shard, uint8 (len(rows), S, S)."""
        table = pq.read_table(shard, columns=["size", "pseudo_label"])
        sizes = table.column("size").to_numpy()
        blobs = table.column("pseudo_label")
        out = []
        for row in rows:
            size = int(sizes[row])
            bits = np.frombuffer(blobs[row].as_py(), np.uint8)
            out.append(np.unpackbits(bits, count=size * size).reshape(size, size))
        return np.stack(out) if out else np.zeros((0, 0, 0), np.uint8)
