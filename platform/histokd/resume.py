"""Checkpoints of Ray Train worker functions: one style for every training loop.

Each epoch, :func:`report_checkpoint` reports the epoch's metrics with a checkpoint whose
``state_file`` holds a torch file of plain values (rank 0 writes it, with any other files of the
epoch). Once a run is done, a loop may report its final result (``result_file``, JSON) too. A
restarted worker group starts the function again, and :func:`restore_checkpoint` gives it what
to continue from: the saved state, or the finished result reported again.

A checkpoint is trusted only when whole. Its files are written under a temporary name, synced
and renamed, and a ``checksums.json`` of them is written last (:func:`seal_folder`). On resume
the checkpoint must match its checksums and load; one that does not is set aside (its folder
renamed ``checkpoint_X.bad``, an empty ``checkpoint_X`` left with a note, since Ray Train's run
snapshot still names it) with one line on the console, and the run goes on from the newest
good checkpoint beside it. Files a driver reuses on a rerun follow the same rule, with a
``<file>.sha256`` beside each (:func:`write_sidecar`, :func:`load_verified`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKSUM_FILE",
    "DamagedFile",
    "check_folder",
    "find_good_checkpoint",
    "inject_fault",
    "load_verified",
    "report_checkpoint",
    "restore_checkpoint",
    "seal_folder",
    "set_aside",
    "write_atomic",
    "write_text_atomic",
    "write_sidecar",
]

CHECKSUM_FILE = "checksums.json"
SIDECAR_SUFFIX = ".sha256"
BAD_SUFFIX = ".bad"
SET_ASIDE_NOTE = "SET_ASIDE.txt"  # left in an emptied checkpoint folder


class DamagedFile(Exception):
    """A file or checkpoint that fails its checksum or does not load; the message says why."""


def inject_fault(config: dict[str, Any], epoch: int, rank: int, world: int, folder: str) -> None:
    """Test aid (``fail_at_epoch``): the last worker raises once in that epoch of a run.

    A ``.fault_injected`` marker in ``folder`` (shared by the workers and their restarts) makes
    it happen once, so the restarted worker group goes on from the last checkpoint.
    """
    if config.get("fail_at_epoch") != epoch or rank != world - 1:
        return
    marker = os.path.join(folder, ".fault_injected")
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError(f"injected fault (fail_at_epoch={epoch}), worker rank {rank}")


# -- whole files --------------------------------------------------------------------------------
def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` writes the file under a temporary name of its own (writers of one file in
    several processes or threads never share one); it is synced, then renamed to ``path``, so a
    reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """:func:`write_atomic` of a text file."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    return write_atomic(path, write)


def write_sidecar(path: str | os.PathLike) -> Path:
    """Write ``<path>.sha256`` beside a finished file (after it, so it vouches for it)."""
    return write_text_atomic(f"{path}{SIDECAR_SUFFIX}", file_sha256(path) + "\n")


def _check_sidecar(path: Path) -> None:
    sidecar = Path(f"{path}{SIDECAR_SUFFIX}")
    if not sidecar.is_file():  # written before checksums, or the writer died just before it
        return
    expected = sidecar.read_text().strip()
    if file_sha256(path) != expected:
        raise DamagedFile(f"checksum mismatch (expected sha256 {expected[:12]}...)")


def set_aside(path: str | os.PathLike, reason: str) -> Path:
    """Rename a damaged file or folder to ``<name>.bad`` (its sidecar goes), with one line."""
    path = Path(path)
    bad = path.with_name(path.name + BAD_SUFFIX)
    n = 1
    while bad.exists():
        n += 1
        bad = path.with_name(f"{path.name}{BAD_SUFFIX}{n}")
    try:
        os.replace(path, bad)
    except FileNotFoundError:  # another process set it aside first
        return bad
    Path(f"{path}{SIDECAR_SUFFIX}").unlink(missing_ok=True)
    print(f"warning: {path}: {reason}; set aside as {bad.name}, it will be redone", flush=True)
    return bad


def load_verified(
    path: str | os.PathLike, load: Callable[[Path], Any], what: str = "output"
) -> Any | None:
    """A file a rerun reuses: its value, or None where it is missing or damaged.

    A damaged file (its ``.sha256`` does not match, or ``load`` raises) is set aside with one
    line naming it, so the caller computes it again.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        _check_sidecar(path)
        return load(path)
    except Exception as exc:  # noqa: BLE001 - any failure to load means: redo it
        set_aside(path, f"damaged {what} ({_reason(exc)})")
        return None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


# -- whole checkpoint folders -------------------------------------------------------------------
def seal_folder(folder: str | os.PathLike) -> Path:
    """Write ``checksums.json`` (SHA-256 of every file under ``folder``) last, atomically."""
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != CHECKSUM_FILE
    }
    return write_text_atomic(
        folder / CHECKSUM_FILE, json.dumps({"algorithm": "sha256", "files": files}, indent=1)
    )


def check_folder(folder: str | os.PathLike) -> None:
    """Raise :class:`DamagedFile` where a sealed folder's files are missing or changed.

    A folder without ``checksums.json`` (written before checksums) is left to its loader.
    """
    folder = Path(folder)
    if (folder / SET_ASIDE_NOTE).is_file():
        raise DamagedFile("set aside before: " + (folder / SET_ASIDE_NOTE).read_text().strip())
    sums = folder / CHECKSUM_FILE
    if not sums.is_file():
        return
    try:
        files = json.loads(sums.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DamagedFile(f"unreadable {CHECKSUM_FILE}: {exc}") from exc
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise DamagedFile(f"{name} is missing")
        if file_sha256(path) != expected:
            raise DamagedFile(f"{name} fails its checksum")


@contextlib.contextmanager
def _local_folder(fs: Any, path: str) -> Iterator[str]:
    """A local folder holding the checkpoint at ``(fs, path)``: itself, or a downloaded copy."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        yield path
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())  # fmt: skip
        yield tmp


def _set_aside_checkpoint(fs: Any, path: str, reason: str) -> None:
    """Rename a damaged checkpoint folder to ``.bad`` and leave its name, empty, with a note
    (Ray Train's run snapshot names it, and refuses to start where a named folder is gone)."""
    import pyarrow.fs as pafs

    bad = path + BAD_SUFFIX
    try:
        if fs.get_file_info(bad).type != pafs.FileType.NotFound:
            fs.delete_dir(bad)
        fs.move(path, bad)
        fs.create_dir(path)
        with fs.open_output_stream(f"{path}/{SET_ASIDE_NOTE}") as f:
            f.write(f"{reason}; its files are in {os.path.basename(bad)}\n".encode())
        where = f"set aside as {os.path.basename(bad)}"
    except (OSError, NotImplementedError) as exc:  # remote storage may not rename folders
        where = f"left in place (cannot rename it there: {exc})"
    print(f"warning: checkpoint {path}: {reason}; {where}", flush=True)


def find_good_checkpoint(
    fs: Any, latest: str, load: Callable[[str], Any], set_aside_bad: bool = True
) -> tuple[str | None, Any]:
    """The newest checkpoint, from ``latest`` back, that passes its checksums and ``load``.

    Args:
        fs: The storage's ``pyarrow.fs`` file system.
        latest: Path of the checkpoint Ray Train hands back; older ``checkpoint_*`` folders
            beside it (their names sort by time) are the fallbacks.
        load: Loads a checkpoint from a local folder (raises where it cannot).
        set_aside_bad: Rename damaged ones (rank 0); other workers only skip them.

    Returns:
        ``(path, load(folder))`` of the first good one, or ``(None, None)`` where none is.
    """
    import pyarrow.fs as pafs

    parent, name = os.path.dirname(latest.rstrip("/")), os.path.basename(latest.rstrip("/"))
    siblings = [
        info.base_name
        for info in fs.get_file_info(pafs.FileSelector(parent))
        if info.type == pafs.FileType.Directory
        and info.base_name.startswith("checkpoint_")
        and BAD_SUFFIX not in info.base_name
        and info.base_name < name
    ]
    skipped = 0
    for candidate in [name, *sorted(siblings, reverse=True)]:
        path = f"{parent}/{candidate}"
        try:
            with _local_folder(fs, path) as folder:
                if (Path(folder) / SET_ASIDE_NOTE).is_file():
                    skipped += 1
                    continue
                check_folder(folder)
                value = load(folder)
        except Exception as exc:  # noqa: BLE001 - a checkpoint that does not load is damaged
            skipped += 1
            if set_aside_bad:
                _set_aside_checkpoint(fs, path, f"damaged ({_reason(exc)})")
            continue
        if skipped and set_aside_bad:
            print(f"resuming from the newest good checkpoint, {path}", flush=True)
        return path, value
    if skipped and set_aside_bad:
        print(f"no good checkpoint left in {parent}: starting from scratch", flush=True)
    return None, None


# -- the worker side ----------------------------------------------------------------------------
def report_checkpoint(
    metrics: dict[str, Any],
    state: Callable[[], dict[str, Any]],
    state_file: str,
    rank: int,
    write_files: Callable[[str], None] | None = None,
) -> None:
    """Report an epoch; rank 0 attaches a checkpoint of ``state()`` (and ``write_files(folder)``).

    Args:
        metrics: The epoch's metrics (every worker reports).
        state: Builds the state to continue from (called on rank 0 only).
        state_file: Its file name in the checkpoint.
        rank: This worker's world rank.
        write_files: Writes more files of the epoch into the checkpoint folder (rank 0).
    """
    import tempfile

    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            value = state()
            write_atomic(os.path.join(tmp, state_file), lambda f: torch.save(value, f))
            if write_files is not None:
                write_files(tmp)
            seal_folder(tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def restore_checkpoint(
    state_file: str,
    result_file: str | None = None,
    final_metrics: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    rank: int = 0,
) -> tuple[bool, dict[str, Any] | None]:
    """The state to continue from, or the finished run's result reported again.

    The checkpoint Ray Train hands back is used only when whole (:func:`find_good_checkpoint`);
    otherwise the newest good one beside it.

    Args:
        state_file: Name of the per-epoch state file in a checkpoint.
        result_file: Name of the final result file in a checkpoint, if the loop writes one.
        final_metrics: Turns the final result into the metrics to report.
        rank: This worker's world rank (rank 0 reports the checkpoint again, and sets damaged
            checkpoints aside).

    Returns:
        ``(finished, state)``: ``finished`` when the last checkpoint holds the final result,
        which was reported again here, so the caller returns at once; otherwise ``state`` is the
        saved state (``torch.load(..., weights_only=True)``), or None with no checkpoint.
    """
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return False, None

    def load(folder: str) -> tuple[str, Any]:
        result_path = os.path.join(folder, result_file) if result_file else ""
        if result_path and os.path.exists(result_path):
            with open(result_path) as f:
                return "result", json.load(f)
        path = os.path.join(folder, state_file)
        return "state", torch.load(path, map_location="cpu", weights_only=True)

    fs = checkpoint.filesystem
    path, found = find_good_checkpoint(fs, checkpoint.path, load, set_aside_bad=rank == 0)
    if path is None:
        return False, None
    kind, value = found
    if kind == "state":
        return False, value
    with _local_folder(fs, path) as folder:
        ray.train.report(
            final_metrics(value),
            checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None,
        )
    return True, None
