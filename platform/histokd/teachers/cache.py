"""The record cache: training records (image and pseudo label) in Parquet shards, made once.

RCKD trains for 100 epochs over the same patches (Sec. 2.2.1). A patch's training record never
changes: its image resized to the input size and the teacher's pseudo label of it. So each
record is made once, by the teacher stream's first phase (read the patch from its slide,
label it, resize, encode) and every epoch after, and every rerun, streams the records from
their shards: no slide decode and no teacher. Images are encoded (JPEG, quality 95 by default,
or lossless PNG), labels stored as packed bits.

Layout::

    <cache_dir>/<teacher fingerprint>/records-<input size>px-<format>/shard-<hash of keys>.parquet

The teacher fingerprint covers the teacher spec, its settings (alpha, mask mode) and its
weight files; the folder below it the input size and the image format and quality. Changing
any of them starts a new cache instead of reusing stale records; runs that share a cache
folder (``--record-cache``) and agree on all of them share the records. Label-only shards of
earlier versions (``<fingerprint>/shard-*.parquet``, no image) lie outside the record folders
and are never read as records.

A shard is named by the keys it holds, so a retried batch (an actor died and the batch ran
again) overwrites its own shard instead of adding a second copy; shards are written to a
temporary file, synced and renamed, so a crash leaves only complete shards, and a ``.sha256``
beside each is written after it. A shard that fails its checksum or does not load (a disk
fault, a copy cut short) is set aside as ``.bad`` with one line when the index is read, and
its records are made again: a damaged cache never stops a run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from histokd.resume import SIDECAR_SUFFIX, load_verified, write_atomic, write_sidecar

__all__ = [
    "RECORD_FORMATS",
    "RECORD_SCHEMA",
    "RecordCache",
    "check_record_settings",
    "decode_image",
    "encode_image",
    "patch_key",
    "teacher_fingerprint",
]

RECORD_FORMATS = ("jpeg", "png")
PAPER_SCALE_RECORDS = 400_000  # RCKD Sec. 2.1.1: S_n, the patches of one pretraining run

RECORD_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # patch_key(): slide, position, magnification, sizes
        ("slide", pa.string()),
        ("x", pa.int64()),
        ("y", pa.int64()),
        ("size", pa.int32()),  # side of the stored image and label (the training input size)
        ("image", pa.binary()),  # the (size, size, 3) RGB image, JPEG or PNG
        ("pseudo_label", pa.binary()),  # np.packbits of the (size, size) {0, 1} label
        ("nuclei_fraction", pa.float32()),
    ]
)


def patch_key(slide: str, x: int, y: int, magnification: float, patch_size: int, size: int) -> str:
    """The cache key of one patch's record: where it is, how it was read and its stored size."""
    return f"{slide}|{int(x)}|{int(y)}|{float(magnification):g}|{int(patch_size)}|{int(size)}"


def encode_image(image: np.ndarray, record_format: str = "jpeg", jpeg_quality: int = 95) -> bytes:
    """An RGB uint8 image as JPEG (4:4:4, no chroma subsampling: stain edges keep their colour)
    or lossless PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    if record_format == "jpeg":
        Image.fromarray(image).save(buffer, "JPEG", quality=jpeg_quality, subsampling=0)
    elif record_format == "png":
        Image.fromarray(image).save(buffer, "PNG", compress_level=1)  # 6 is 3x slower, 5 % smaller
    else:
        raise ValueError(f"record_format={record_format!r}: allowed: {', '.join(RECORD_FORMATS)}")
    return buffer.getvalue()


def decode_image(blob: bytes) -> np.ndarray:
    """The RGB uint8 image of :func:`encode_image`'s bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(blob)) as image:
        return np.asarray(image.convert("RGB"))


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


class RecordCache:
    """The training records of one teacher at one input size and image format.

    Args:
        root: Cache folder shared by all teachers, sizes and formats.
        fingerprint: The teacher's :func:`teacher_fingerprint`.
        input_size: Side of the records' image and label.
        record_format: ``jpeg`` (lossy, small) or ``png`` (lossless).
        jpeg_quality: JPEG quality, 1-100 (RCKD names none; 95 keeps stain texture).

    Raises:
        ValueError: An input size, format or quality outside what is allowed.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        fingerprint: str,
        input_size: int,
        record_format: str = "jpeg",
        jpeg_quality: int = 95,
    ):
        check_record_settings(input_size, record_format, jpeg_quality)
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.input_size = int(input_size)
        self.record_format = record_format
        self.jpeg_quality = int(jpeg_quality)
        encoding = f"jpeg{self.jpeg_quality}" if record_format == "jpeg" else record_format
        self.folder = self.root / fingerprint / f"records-{self.input_size}px-{encoding}"

    @classmethod
    def for_teacher(
        cls,
        root: str | os.PathLike,
        teacher: str,
        teacher_kwargs: Mapping[str, Any] | None,
        input_size: int,
        record_format: str = "jpeg",
        jpeg_quality: int = 95,
    ) -> RecordCache:
        """The cache :func:`histokd.teachers.stream.pseudo_label_dataset` uses for a teacher spec."""
        from histokd.teachers.registry import portable_spec

        fingerprint = teacher_fingerprint(portable_spec(teacher), teacher_kwargs)
        return cls(root, fingerprint, input_size, record_format, jpeg_quality)

    def shards(self) -> list[Path]:
        """The shard files, sorted by name."""
        return sorted(self.folder.glob("shard-*.parquet")) if self.folder.is_dir() else []

    def index(self) -> dict[str, tuple[str, int]]:
        """Key -> (shard path, row) of every cached record; the first shard wins on duplicates.

        Every shard is checked against its ``.sha256``; a damaged one is set aside.
        """
        found: dict[str, tuple[str, int]] = {}
        for shard in self.shards():
            keys = load_verified(shard, _shard_keys, "record cache shard")
            if keys is None:  # gone, or damaged and set aside: its records are made again
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
        images: np.ndarray,
        labels: np.ndarray,
    ) -> Path:
        """Write one batch of records as a shard; returns its path.

        Args:
            keys: Each record's :func:`patch_key`.
            slides: Each record's slide path.
            xs: Level-0 x of each patch.
            ys: Level-0 y of each patch.
            images: uint8 (N, S, S, 3) at the input size S.
            labels: {0, 1} (N, S, S).
        """
        images = np.asarray(images, np.uint8)
        labels = np.asarray(labels, np.uint8)
        n, size = len(keys), self.input_size
        if images.shape != (n, size, size, 3) or labels.shape != (n, size, size):
            raise ValueError(
                f"images of shape {images.shape} and labels of shape {labels.shape} for {n} keys: "
                f"expected ({n}, {size}, {size}, 3) and ({n}, {size}, {size})"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pydict(
            {
                "key": list(keys),
                "slide": list(slides),
                "x": np.asarray(xs, np.int64),
                "y": np.asarray(ys, np.int64),
                "size": np.full(n, size, np.int32),
                "image": [encode_image(im, self.record_format, self.jpeg_quality) for im in images],
                "pseudo_label": [np.packbits(label).tobytes() for label in labels],
                "nuclei_fraction": labels.reshape(n, -1).mean(axis=1).astype(np.float32),
            },
            schema=RECORD_SCHEMA,
        )
        name = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:24]
        path = self.folder / f"shard-{name}.parquet"
        # a retried batch replaces its shard: the old checksum goes first, so no reader ever
        # pairs the new shard with it (without one, a reader loads the shard to check it).
        # The images are compressed already: zstd would spend CPU on every read for little.
        Path(f"{path}{SIDECAR_SUFFIX}").unlink(missing_ok=True)
        compression = {c: "none" if c == "image" else "zstd" for c in RECORD_SCHEMA.names}
        write_atomic(path, lambda tmp: pq.write_table(table, tmp, compression=compression))
        write_sidecar(path)
        return path

    @staticmethod
    def read(shard: str | os.PathLike, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The records at ``rows`` of one shard: images uint8 (len(rows), S, S, 3) and labels
        {0, 1} uint8 (len(rows), S, S)."""
        table = pq.read_table(shard, columns=["size", "image", "pseudo_label"])
        sizes = table.column("size").to_numpy()
        images, labels = table.column("image"), table.column("pseudo_label")
        out_images, out_labels = [], []
        for row in rows:
            size = int(sizes[row])
            out_images.append(decode_image(images[row].as_py()))
            bits = np.frombuffer(labels[row].as_py(), np.uint8)
            out_labels.append(np.unpackbits(bits, count=size * size).reshape(size, size))
        if not out_images:
            return np.zeros((0, 0, 0, 3), np.uint8), np.zeros((0, 0, 0), np.uint8)
        return np.stack(out_images), np.stack(out_labels)

    def size(self) -> tuple[int, int]:
        """Records and bytes on disk (shards and their checksums), from the shards' footers."""
        records = nbytes = 0
        for shard in self.shards():
            try:
                records += pq.read_metadata(shard).num_rows
                nbytes += shard.stat().st_size
            except (OSError, pa.ArrowException):  # removed or damaged meanwhile: not counted
                continue
            sidecar = Path(f"{shard}{SIDECAR_SUFFIX}")
            nbytes += sidecar.stat().st_size if sidecar.is_file() else 0
        return records, nbytes

    def size_line(self) -> str:
        """One line for the console: records, MB, bytes per record and the paper-scale disk."""
        records, nbytes = self.size()
        per_record = nbytes / records if records else 0.0
        return (
            f"record cache {self.folder}: {records:,} records, {nbytes / 1e6:,.1f} MB, "
            f"{per_record:,.0f} bytes/record; {PAPER_SCALE_RECORDS:,} records (RCKD's S_n) "
            f"would take {per_record * PAPER_SCALE_RECORDS / 1e9:,.1f} GB"
        )


def check_record_settings(input_size: int, record_format: str, jpeg_quality: int) -> None:
    """The records' side is a positive integer, the format one of :data:`RECORD_FORMATS` and the
    JPEG quality an integer in [1, 100].

    Raises:
        ValueError: Naming the setting, its value and what is allowed.
    """
    if (
        isinstance(input_size, bool)
        or not isinstance(input_size, (int, np.integer))
        or input_size < 1
    ):
        raise ValueError(f"input_size={input_size!r}: must be a positive integer (RCKD: 512)")
    if record_format not in RECORD_FORMATS:
        raise ValueError(f"record_format={record_format!r}: allowed: {', '.join(RECORD_FORMATS)}")
    if (
        isinstance(jpeg_quality, bool)
        or not isinstance(jpeg_quality, (int, np.integer))
        or not 1 <= jpeg_quality <= 100
    ):
        raise ValueError(
            f"jpeg_quality={jpeg_quality!r}: must be an integer in [1, 100] (default 95)"
        )
