"""Slides on object storage (``s3://``, ``gs://``): listing, and a per-node download cache.

OpenSlide reads local files only, so a slide given as a URL is downloaded once per node into a
cache folder and opened from there. Several processes of one node (Ray workers) share the cache:
a per-object ``fcntl.flock`` lets one of them download while the others wait, and the download
goes to a temporary file renamed into place, so no reader ever sees half a slide. Each open slide
holds a shared lock on its cache file; eviction (least recently used first, by the file's mtime,
which each open touches) takes an exclusive lock without waiting and skips files in use.

Settings (read when a slide is opened, so they travel to Ray workers with the environment):

- ``HISTOKD_SLIDE_CACHE``: the cache folder; default ``~/.cache/histokd/slides``, or
  ``$TMPDIR/histokd-slides-$UID`` where the home folder is not writable;
- ``HISTOKD_SLIDE_CACHE_GB``: its size cap in GB (default 100);
- ``HISTOKD_S3_ENDPOINT`` (or boto3's own ``AWS_ENDPOINT_URL``): an S3-compatible endpoint
  (MinIO, Ceph); credentials are boto3's usual chain (environment, profile, instance profile).

Requests that fail for a passing reason (no connection, time-outs, HTTP 5xx, throttling) are
tried ``tries`` times with a doubling wait; a missing object, a refused access or missing
credentials fail at once. Either way the error is one line naming the URL.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TypeVar

__all__ = [
    "CachedSlide",
    "ObjectInfo",
    "ObjectStoreError",
    "SlideCache",
    "default_cache",
    "is_object_url",
    "list_slides",
    "stat",
]

log = logging.getLogger(__name__)

SCHEMES = ("s3://", "gs://")
DEFAULT_CACHE_GB = 100.0
# Formats whose slide is several files (MIRAX: an index plus a folder; Hamamatsu VMS/VMU: an
# index plus images; DICOM: one file per level of a series): the cache holds single files.
MULTI_FILE_SUFFIXES = {
    ".mrxs": "MIRAX",
    ".vms": "Hamamatsu VMS",
    ".vmu": "Hamamatsu VMU",
    ".dcm": "DICOM",
}
# Where the credentials come from: a client is made again when one of these changes.
_CREDENTIAL_VARIABLES = (
    "HISTOKD_S3_ENDPOINT",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_DEFAULT_REGION",
)

T = TypeVar("T")


class ObjectStoreError(ValueError):
    """An object that cannot be listed, found or downloaded; the message is one line.

    Attributes:
        url: The object or prefix.
        problem: What went wrong, without the URL.
        transient: Whether trying again may help (no connection, HTTP 5xx, throttling).
    """

    def __init__(self, url: str, problem: str, transient: bool = False):
        self.url = url
        self.problem = problem
        self.transient = transient
        super().__init__(f"{url}: {problem}")


@dataclass(frozen=True)
class ObjectInfo:
    """One object as a listing or a HEAD request gives it.

    Attributes:
        url: ``s3://bucket/key`` or ``gs://bucket/key``.
        size: Bytes.
        version: ETag (S3) or generation (GCS): changes whenever the object is rewritten.
    """

    url: str
    size: int
    version: str


def is_object_url(path: object) -> bool:
    """Whether ``path`` is a ``s3://`` or ``gs://`` URL rather than a local path."""
    return isinstance(path, str) and path.startswith(SCHEMES)


def _split(url: str) -> tuple[str, str, str]:
    """Scheme, bucket and key of a URL (the key may be empty or a prefix)."""
    scheme, rest = url.split("://", 1)
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ObjectStoreError(
            url, "no bucket in the URL; allowed: s3://BUCKET/KEY, gs://BUCKET/KEY"
        )
    return scheme, bucket, key


# -- backends ----------------------------------------------------------------------------------
class _S3:
    """boto3, with its own retries off: :func:`_with_retries` is the only retry layer."""

    def __init__(self) -> None:
        self.endpoint = os.environ.get("HISTOKD_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
        self.client = _s3_client(tuple(os.environ.get(k) for k in _CREDENTIAL_VARIABLES))

    def list(self, bucket: str, prefix: str) -> Iterable[tuple[str, int, str]]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for item in page.get("Contents", []):
                yield item["Key"], int(item["Size"]), item["ETag"].strip('"')

    def head(self, bucket: str, key: str) -> tuple[int, str]:
        head = self.client.head_object(Bucket=bucket, Key=key)
        return int(head["ContentLength"]), head["ETag"].strip('"')

    def download(self, bucket: str, key: str, dest: str) -> None:
        from boto3.s3.transfer import TransferConfig

        # ranged GETs in parallel for large slides; one attempt each (retries are ours)
        self.client.download_file(bucket, key, dest, Config=TransferConfig(num_download_attempts=1))

    def classify(self, exc: Exception) -> tuple[str, bool] | None:
        """(problem, transient) for boto3's errors; None for anything else."""
        import botocore.exceptions as bx
        from s3transfer.exceptions import RetriesExceededError

        if isinstance(exc, RetriesExceededError):  # a ranged GET's connection broke
            return f"download interrupted: {exc.last_exception}", True
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return (
                "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                "AWS_PROFILE, or give the nodes an instance profile (docs/operators_guide.md)",
                False,
            )
        if isinstance(exc, (bx.ConnectionError, bx.HTTPClientError)):
            where = self.endpoint or "AWS S3"
            return f"cannot reach {where}: {exc}", True
        if isinstance(exc, bx.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code == "NoSuchBucket":
                return "bucket not found (NoSuchBucket)", False
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                return "object not found (HTTP 404)", False
            if status in (401, 403) or code in ("AccessDenied", "InvalidAccessKeyId", "403"):
                return (
                    f"access denied ({code or status}): check the credentials and bucket policy",
                    False,
                )
            passing = ("SlowDown", "RequestTimeout", "Throttling")
            transient = status >= 500 or status == 429 or code in passing
            return f"S3 error {code or status}: {error.get('Message', exc)}", transient
        if isinstance(exc, bx.BotoCoreError):
            return f"S3 client error: {exc}", False
        return None


@functools.lru_cache(maxsize=8)
def _s3_client(settings: tuple[str | None, ...]):
    """One thread-safe boto3 client per process and ``_CREDENTIAL_VARIABLES`` values."""
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("HISTOKD_S3_ENDPOINT") or None  # else boto3 reads AWS_ENDPOINT_URL
    custom = endpoint or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(
        retries={"total_max_attempts": 1},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=32,
        # MinIO and Ceph serve buckets as paths, not as host names
        s3={"addressing_style": "path"} if custom else None,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


class _GCS:
    """google-cloud-storage (the ``histokd[gcs]`` extra); not tested here, no GCS emulator."""

    def __init__(self, url: str) -> None:
        try:
            from google.cloud import storage
        except ImportError as exc:
            raise ObjectStoreError(
                url,
                "reading gs:// URLs needs google-cloud-storage: pip install 'histokd[gcs]'",
            ) from exc
        self.client = _gcs_client(storage)

    def list(self, bucket: str, prefix: str) -> Iterable[tuple[str, int, str]]:
        for blob in self.client.list_blobs(bucket, prefix=prefix):
            yield blob.name, int(blob.size), str(blob.generation)

    def head(self, bucket: str, key: str) -> tuple[int, str]:
        from google.api_core.exceptions import NotFound

        blob = self.client.bucket(bucket).get_blob(key)
        if blob is None:
            raise NotFound(f"gs://{bucket}/{key}")
        return int(blob.size), str(blob.generation)

    def download(self, bucket: str, key: str, dest: str) -> None:
        self.client.bucket(bucket).blob(key).download_to_filename(dest)

    def classify(self, exc: Exception) -> tuple[str, bool] | None:
        from google.api_core import exceptions as gx
        from google.auth.exceptions import DefaultCredentialsError

        if isinstance(exc, DefaultCredentialsError):
            return (
                "no Google Cloud credentials found: set GOOGLE_APPLICATION_CREDENTIALS or give "
                "the nodes a service account (docs/operators_guide.md)",
                False,
            )
        if isinstance(exc, gx.NotFound):
            return f"not found (no such bucket or object): {exc.message}", False
        if isinstance(exc, (gx.Forbidden, gx.Unauthorized)):
            return f"access denied: {exc.message}", False
        if isinstance(exc, (gx.ServerError, gx.TooManyRequests, ConnectionError, TimeoutError)):
            return f"GCS error: {exc}", True
        if isinstance(exc, gx.GoogleAPICallError):
            return f"GCS error: {exc}", False
        return None


@functools.lru_cache(maxsize=1)
def _gcs_client(storage):
    return storage.Client()


def _backend(url: str) -> _S3 | _GCS:
    return _S3() if url.startswith("s3://") else _GCS(url)


def _with_retries(
    backend: _S3 | _GCS, url: str, action: Callable[[], T], tries: int, backoff_s: float
) -> T:
    """``action()``, tried again after a passing failure (waits backoff_s, 2 backoff_s, ...).

    Raises:
        ObjectStoreError: The last failure, one line naming ``url``.
    """
    for attempt in range(1, tries + 1):
        try:
            return action()
        except ObjectStoreError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - classified below, the rest re-raised
            known = backend.classify(exc)
            if known is None:
                raise
            error = ObjectStoreError(url, known[0].replace("\n", " "), transient=known[1])
            error.__cause__ = exc
        if not error.transient:
            raise error
        if attempt == tries:
            raise ObjectStoreError(url, f"{error.problem} (failed {tries} tries)", True) from error
        log.warning("%s: %s; trying again (%d of %d)", url, error.problem, attempt + 1, tries)
        time.sleep(backoff_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


# -- listing -----------------------------------------------------------------------------------
# What listings said about each object: its size and version fingerprint a manifest without one
# HEAD request per slide.
_listed: dict[str, ObjectInfo] = {}


def list_slides(
    url: str,
    extensions: Iterable[str],
    tries: int = 3,
    skip: Callable[[str, set[str]], bool] | None = None,
) -> list[str]:
    """Slide URLs under ``url``: the object itself where its name ends in a slide extension,
    else every object under the prefix ``url`` (as a folder: ``s3://b/a`` does not take
    ``s3://b/ab/x.svs``) whose name does, less those ``skip(name, all names)`` leaves out
    (`histokd.manifest.discover_slides` passes its rule for a demo slide's truth masks).

    Raises:
        ObjectStoreError: The bucket is missing, access is refused, no credentials.
    """
    extensions = tuple(extensions)
    scheme, bucket, key = _split(url)
    if key.endswith(extensions):
        _listed.pop(url, None)  # asked for afresh when the manifest is fingerprinted
        return [url]  # a missing object is reported per slide later, as a missing file
    backend = _backend(url)
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    objects = _with_retries(backend, url, lambda: list(backend.list(bucket, prefix)), tries, 1.0)
    names = {name for name, _, _ in objects}
    found = []
    for name, size, version in objects:
        if not name.endswith(extensions) or (skip is not None and skip(name, names)):
            continue
        object_url = f"{scheme}://{bucket}/{name}"
        _listed[object_url] = ObjectInfo(object_url, size, version)
        found.append(object_url)
    return sorted(found)


def stat(url: str, tries: int = 3, backoff_s: float = 1.0, fresh: bool = False) -> ObjectInfo:
    """Size and version of one object: from the last listing that saw it, else a HEAD request.

    Args:
        fresh: Always ask the store (a cached slide must match the object as it is now).

    Raises:
        ObjectStoreError: The object is missing, or the store cannot be reached.
    """
    if not fresh and url in _listed:
        return _listed[url]
    _, bucket, key = _split(url)
    backend = _backend(url)
    size, version = _with_retries(backend, url, lambda: backend.head(bucket, key), tries, backoff_s)
    _listed[url] = ObjectInfo(url, size, version)
    return _listed[url]


# -- the download cache ------------------------------------------------------------------------
class CachedSlide:
    """A slide's local copy, held in use (a shared lock) until :meth:`release`."""

    def __init__(self, url: str, path: Path, lock: IO[bytes]):
        self.url = url
        self.path = path
        self._lock: IO[bytes] | None = lock

    def release(self) -> None:
        """Let eviction take the file again (closing the lock file drops the lock)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> CachedSlide:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass
class SlideCache:
    """A node's folder of downloaded slides, at most ``max_bytes`` (least recently used out).

    Args:
        folder: Where the copies live; every process of a node should use the same one.
        max_bytes: Size cap. Files in use are never evicted, so an open set of slides larger
            than the cap still works (a warning says the cache is over its cap).
        tries: Attempts per request when a failure may pass.
        backoff_s: Wait before the second attempt; doubled before each next one.
    """

    folder: Path
    max_bytes: int
    tries: int = 3
    backoff_s: float = 1.0

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)

    def open(self, url: str) -> CachedSlide:
        """The local copy of ``url``, downloaded unless the cache has this version of it.

        Raises:
            ObjectStoreError: A multi-file format, a missing object, or a download that failed
                ``tries`` times; one line naming the URL.
        """
        suffix = PurePosixPath(url).suffix.lower()
        if suffix in MULTI_FILE_SUFFIXES:
            raise ObjectStoreError(
                url,
                f"{MULTI_FILE_SUFFIXES[suffix]} slides are several files, and slides on object "
                "storage must be single files (SVS, TIFF, NDPI, SCN, SVSLIDE, BIF, CZI); copy "
                "this one to a shared file system",
            )
        info = stat(url, self.tries, self.backoff_s, fresh=True)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ObjectStoreError(
                url, f"cannot create the slide cache {self.folder}: {exc}"
            ) from exc
        digest = hashlib.sha1(f"{url}\0{info.version}".encode()).hexdigest()[:16]
        name = PurePosixPath(url).stem
        path = self.folder / f"{name}-{digest}{suffix}"
        lock = open(self.folder / f"{path.name}.lock", "ab")  # noqa: SIM115 - held by CachedSlide
        try:
            self._fetch(url, info, path, lock)
        except BaseException:
            lock.close()
            raise
        return CachedSlide(url, path, lock)

    def _fetch(self, url: str, info: ObjectInfo, path: Path, lock: IO[bytes]) -> None:
        """Leave ``path`` complete with ``lock`` held shared (in use)."""
        while True:
            fcntl.flock(lock, fcntl.LOCK_SH)
            if _complete(path, info.size):
                os.utime(path)  # last use, for LRU eviction
                return
            # Missing: download under the exclusive lock. Taking it drops the shared one, so
            # once it is shared again, check the file afresh.
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not _complete(path, info.size):
                self._download(url, info, path)

    def _download(self, url: str, info: ObjectInfo, path: Path) -> None:
        for stale in self.folder.glob(f".{path.name}.*.tmp"):  # a crashed download's
            stale.unlink(missing_ok=True)
        self.make_room(info.size, keep=path)
        tmp = self.folder / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
        _, bucket, key = _split(url)
        backend = _backend(url)

        def attempt() -> None:
            backend.download(bucket, key, str(tmp))
            got = tmp.stat().st_size
            if got != info.size:
                raise ObjectStoreError(
                    url, f"downloaded {got} bytes of {info.size}: it changed or broke", True
                )

        start = time.monotonic()
        try:
            _with_retries(backend, url, attempt, self.tries, self.backoff_s)
            os.replace(tmp, path)
        except OSError as exc:  # the cache's own disk: full, read-only
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ObjectStoreError(
                url, f"cannot write the slide cache {self.folder}: {reason}"
            ) from exc
        finally:
            tmp.unlink(missing_ok=True)
        seconds = time.monotonic() - start
        log.info("downloaded %s (%.1f MB) in %.1f s into %s", url, info.size / 1e6, seconds, path)

    def make_room(self, size: int, keep: Path | None = None) -> list[Path]:
        """Evict least recently used copies not in use until ``size`` more bytes fit the cap.

        Returns:
            The files evicted, oldest first.
        """
        files = []
        for entry in os.scandir(self.folder):
            if entry.name.startswith(".") or entry.name.endswith(".lock"):
                continue
            with contextlib.suppress(FileNotFoundError):
                st = entry.stat()
                if keep is None or entry.path != str(keep):
                    files.append((st.st_mtime, entry.path, st.st_size))
        total = sum(f[2] for f in files)
        evicted = []
        for _, file, file_size in sorted(files):
            if total + size <= self.max_bytes:
                break
            with open(f"{file}.lock", "ab") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno in (errno.EAGAIN, errno.EACCES):
                        continue  # in use by a reader
                    raise
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(file)
                    evicted.append(Path(file))
                total -= file_size
        if total + size > self.max_bytes:
            log.warning(
                "slide cache %s holds %.2f GB in use, over its cap of %.2f GB",
                self.folder,
                (total + size) / 1e9,
                self.max_bytes / 1e9,
            )
        return evicted


def _complete(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False


def _default_folder() -> Path:
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "histokd" / "slides"
    with contextlib.suppress(OSError):
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    return Path(tempfile.gettempdir()) / f"histokd-slides-{os.getuid()}"


def default_cache() -> SlideCache:
    """This node's cache, from ``HISTOKD_SLIDE_CACHE`` and ``HISTOKD_SLIDE_CACHE_GB``.

    Raises:
        ValueError: ``HISTOKD_SLIDE_CACHE_GB`` is not a positive number.
    """
    raw = os.environ.get("HISTOKD_SLIDE_CACHE_GB", str(DEFAULT_CACHE_GB))
    try:
        gb = float(raw)
    except ValueError:
        gb = float("nan")
    if not gb > 0:
        raise ValueError(f"HISTOKD_SLIDE_CACHE_GB={raw!r}: must be a positive number of GB")
    folder = os.environ.get("HISTOKD_SLIDE_CACHE")
    path = Path(os.path.expanduser(folder)) if folder else _default_folder()
    return SlideCache(path, int(gb * 1e9))
