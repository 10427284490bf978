"""Per-patch features of a frozen backbone for slide-level models (CLAM, TRIDENT, ABMIL).

For every slide: the tissue patch grid of the patch manifest (`histokd.manifest.scan_slide`:
non-overlapping ``patch_size`` px cells at ``mpp``, kept where the thumbnail tissue mask covers
``min_tissue_fraction``), each patch read exactly as pretraining reads it
(`histokd.manifest.PatchReader`), and the backbone's deepest feature map, average-pooled: what
a linear probe or the classification head sees (``ClassificationModel``'s ``avg`` pool). The
backbone normalises its input with its own mean and std (its timm ``pretrained_cfg``).

The stream (Ray Data, sized by `histokd.streams.plan_resources`): plan tasks (a slide's grid,
or one ``bad`` row) -> read tasks (patches, an unreadable one marked) -> an
`~ray.data.ActorPoolStrategy` pool of `PatchEncoder` actors (a GPU each where the cluster has
them) -> the driver, which writes a slide's file as soon as its last patch arrives.

Layout, as CLAM (``h5_files/``) and TRIDENT (``features_<encoder>/``) read it::

    OUTPUT/features_<tag>/h5_files/<slide>.h5
        features   float32 (N, D)   pooled features, one row per patch
        coords     int64   (N, 2)   level-0 x, y of each patch's top-left corner
          attrs  patch_size          patch side in px at the target (TRIDENT, CLAM)
                 patch_size_level0   patch side in level-0 px (TRIDENT)
                 level0_magnification, target_magnification   10 / um-per-px (TRIDENT)
                 level0_mpp, target_mpp   um/px of level 0 and of the patches
                 overlap (0), name (slide), savetodir (this folder)   (TRIDENT)
                 patch_level, downsample, level_dim   pyramid level read, level-0 px per
                                                      patch px, level-0 width and height (CLAM)
        file attrs: slide_path, arch, backbone, backbone_sha256, feature_dim, fingerprint

``<slide>`` is the slide file's stem. Each file is written under a temporary name and renamed,
so one that exists is whole; a rerun skips slides whose file exists with the same fingerprint
(backbone bytes and grid settings). A slide that cannot be used (unreadable, no tissue) is
skipped, printed, and listed in the run folder's ``bad_slides.csv``; the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histokd.features.config import ExtractConfig
from histokd.manifest import (
    BAD_SLIDES_FILE,
    ManifestConfig,
    discover_slides,
    scan_slide,
    write_skipped_slides,
)
from histokd.resume import file_sha256, write_atomic, write_text_atomic
from histokd.run import holds_run_lock
from histokd.slides import SlideError, SlideReader
from histokd.streams import plan_resources, worker_patch_reader
from histokd.tissue import TissueFilter

__all__ = [
    "ExtractResult",
    "PatchEncoder",
    "build_encoder",
    "encode_patches",
    "feature_dataset",
    "h5_is_complete",
    "load_encoder",
    "run_extraction",
    "write_features_h5",
]

log = logging.getLogger(__name__)

H5_DIR = "h5_files"
RUN_FILE = "run.json"
PATCH, UNREADABLE, BAD = "patch", "unreadable", "bad"

#: Columns every row carries from the plan to the driver.
META_COLUMNS = (
    "slide_index", "slide_path", "status", "message", "x", "y", "count", "base_magnification",
    "extent", "level", "width", "height", "base_mpp", "mpp",
)  # fmt: skip


# -- the encoder -----------------------------------------------------------------------------------
def build_encoder(arch: str):
    """The backbone ``arch`` behind its own input normalisation, in eval mode (random weights).

    Calling it on ``N x 3 x H x W`` uint8 images gives the feature maps; `encode_patches`
    pools the deepest.
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torch import nn

    from histokd.models import InputNormalization, create_backbone

    backbone = create_backbone(arch)
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    norm = InputNormalization(
        cfg.get("mean", IMAGENET_DEFAULT_MEAN), cfg.get("std", IMAGENET_DEFAULT_STD)
    )
    return nn.Sequential(norm, backbone).eval()


def encode_patches(encoder, images: np.ndarray, device: Any = "cpu") -> np.ndarray:
    """Pooled features (N, D) float32 of uint8 (N, S, S, 3) patches."""
    import torch

    with torch.inference_mode():
        x = (
            torch.from_numpy(np.require(images, requirements=["C", "W"]))
            .to(device)
            .permute(0, 3, 1, 2)
        )
        return encoder(x)[-1].float().mean((2, 3)).cpu().numpy()


def _arch_beside(path: Path) -> str | None:
    """The ``backbone`` of the pretraining run's config.yaml beside a backbone file."""
    config = path.parent / "config.yaml"
    if not config.is_file():
        return None
    import yaml

    try:
        value = (yaml.safe_load(config.read_text()) or {}).get("backbone")
    except (yaml.YAMLError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def load_encoder(path: str, arch: str | None = None) -> tuple[Any, str, str]:
    """The encoder of a backbone file or of a task-model file, with its weights.

    Args:
        path: ``backbone.pth`` (``.safetensors``) of pretraining, or a fine-tuning model file.
        arch: The architecture of a backbone file; None: ``config.yaml`` beside it, else the
            one of ``histokd.models.BACKBONES`` whose keys and shapes the file matches exactly.

    Returns:
        The encoder, its architecture, and ``backbone`` or ``task model`` (the kind of file).

    Raises:
        ValueError: The file fits no backbone, or not ``arch``; one line naming the file.
    """
    import torch
    from timm.models import load_state_dict

    from histokd.models import BACKBONES, backbone_state_dict, load_backbone_state_dict

    payload: Any = None
    if not path.endswith(".safetensors"):
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
            raise ValueError(
                f"backbone={path!r}: cannot be read as a weights file ({type(exc).__name__}: {exc})"
            ) from None
    if isinstance(payload, dict) and "model" in payload and "config" in payload:
        from histokd.inference.model_file import ModelFileError, load_task_model

        try:
            model, info = load_task_model(path)
        except ModelFileError as exc:
            raise ValueError(str(exc)) from None
        encoder = build_encoder(info.backbone)
        encoder[1].load_state_dict(model.backbone.state_dict())
        return encoder, info.backbone, "task model"
    state = payload if payload is not None else load_state_dict(path)
    if arch is not None and arch not in BACKBONES:
        raise ValueError(f"arch={arch!r}: allowed: {', '.join(BACKBONES)}")
    candidates = [arch] if arch else ([a] if (a := _arch_beside(Path(path))) else list(BACKBONES))
    for name in candidates:
        encoder = build_encoder(name)
        expected = backbone_state_dict(encoder[1])
        exact = set(expected) == set(state) and all(
            tuple(state[k].shape) == tuple(v.shape) for k, v in expected.items()
        )
        if arch or len(candidates) == 1 or exact:
            try:
                load_backbone_state_dict(encoder[1], state, source=path)
            except ValueError as exc:
                raise ValueError(f"backbone={path!r}: not a {name} backbone file: {exc}") from None
            return encoder, name, "backbone"
    raise ValueError(
        f"backbone={path!r}: its {len(state)} keys fit none of {', '.join(BACKBONES)}; "
        "give the architecture with --arch"
    )


class PatchEncoder:
    """A Ray Data actor holding the frozen backbone: patches in, pooled features out.

    Args:
        weights: ``[ObjectRef]`` of ``{"arch", "state"}`` (the encoder's state dict), put in
            the object store once by the driver.
        threads: Torch CPU threads (the actor's CPU share).
    """

    def __init__(self, weights: list, threads: int | None = None):
        import ray
        import torch

        if threads is not None:
            torch.set_num_threads(max(1, int(threads)))
        spec = ray.get(weights[0])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.encoder = build_encoder(spec["arch"])
        self.encoder.load_state_dict(spec["state"])
        self.encoder.to(self.device)
        self.dim = int(self.encoder[1].feature_info.channels()[-1])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Features of the ``patch`` rows; other rows pass through with zeros."""
        out = {k: batch[k] for k in META_COLUMNS}
        features = np.zeros((len(out["x"]), self.dim), np.float32)
        todo = np.flatnonzero(np.asarray(out["status"], dtype=object) == PATCH)
        if len(todo):
            features[todo] = encode_patches(
                self.encoder, np.asarray(batch["image"])[todo], self.device
            )
        out["features"] = features
        return out


# -- the stream -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GridSettings:
    """The patch grid: ``patch_size`` px at ``mpp``, tissue threshold, assumed level-0 um/px."""

    mpp: float
    patch_size: int
    tissue: TissueFilter
    assume_mpp: float | None = None


def _columns(n: int, index: int, path: str, status: str, message: str, **values: Any):
    rows: dict[str, np.ndarray] = {
        "slide_index": np.full(n, index, np.int64),
        "slide_path": np.array([path] * n, dtype=object),
        "status": np.array([status] * n, dtype=object),
        "message": np.array([message] * n, dtype=object),
    }
    for name in ("x", "y", "count", "extent", "level", "width", "height"):
        rows[name] = np.full(n, int(values.get(name, 0)), np.int64)
    for name in ("base_magnification", "base_mpp", "mpp"):
        rows[name] = np.full(n, float(values.get(name, math.nan)), np.float64)
    return rows


def _slide_rows(index: int, path: str, grid: GridSettings) -> dict[str, np.ndarray]:
    config = ManifestConfig(
        mpp=grid.mpp, patch_size=grid.patch_size, assume_mpp=grid.assume_mpp, tissue=grid.tissue
    )
    try:
        scan = scan_slide(path, config)
        with SlideReader(path, assume_mpp=grid.assume_mpp) as reader:
            width, height = reader.info.dimensions
    except SlideError as exc:
        return _columns(1, index, path, BAD, str(exc))
    except Exception as exc:  # noqa: BLE001 - one broken slide must not end the run; it is reported
        return _columns(1, index, path, BAD, f"{path}: {type(exc).__name__}: {exc}")
    n = len(scan.xs)
    rows = _columns(
        n, index, path, PATCH, "", count=n, extent=scan.extent, level=scan.level, width=width,
        height=height, base_magnification=scan.base_magnification, base_mpp=scan.base_mpp_x, mpp=scan.mpp,
    )  # fmt: skip
    rows["x"], rows["y"] = scan.xs.astype(np.int64), scan.ys.astype(np.int64)
    return rows


def plan_slide_batch(batch: dict[str, np.ndarray], grid: GridSettings) -> dict[str, np.ndarray]:
    """Patch rows of a batch of slides (``slide_index``, ``slide_path``)."""
    parts = [
        _slide_rows(int(i), str(p), grid)
        for i, p in zip(batch["slide_index"], batch["slide_path"], strict=True)
    ]
    return {k: np.concatenate([part[k] for part in parts]) for k in META_COLUMNS}


def read_patch_batch(batch: dict[str, np.ndarray], grid: GridSettings) -> dict[str, np.ndarray]:
    """Adds ``image`` (N, S, S, 3) uint8, read as pretraining reads manifest rows."""
    batch = {k: batch[k] for k in META_COLUMNS}
    n, size = len(batch["x"]), grid.patch_size
    images = np.zeros((n, size, size, 3), np.uint8)
    status = np.asarray(batch["status"], dtype=object).copy()
    message = np.asarray(batch["message"], dtype=object).copy()
    reader = worker_patch_reader(max_open=4)
    for i in np.flatnonzero(status == PATCH):
        row = {
            "slide_path": str(batch["slide_path"][i]), "base_magnification": float(batch["base_magnification"][i]),
            "x": int(batch["x"][i]), "y": int(batch["y"][i]), "patch_size": size, "magnification": 10.0 / grid.mpp,
        }  # fmt: skip
        try:
            images[i] = reader.read(row)
        except SlideError as exc:
            status[i], message[i] = UNREADABLE, str(exc)
    batch["status"], batch["message"], batch["image"] = status, message, images
    return batch


def feature_dataset(
    slides: list[str],
    weights: dict[str, Any],
    grid: GridSettings,
    batch_size: int = 64,
    num_actors: int | None = None,
    num_gpus: float = 1.0,
):
    """A lazy Ray Dataset of `META_COLUMNS` and ``features`` (D,) rows of ``slides``.

    ``slide_index`` is the position in ``slides``; ``weights`` is ``{"arch", "state"}``.
    """
    import ray
    from ray.data import ActorPoolStrategy

    plan = plan_resources(ray.cluster_resources(), num_actors, num_gpus)
    log.info(
        "feature stream: %d slide(s), %d actor(s) x %.2g CPU, %.2g GPU; read tasks %.2g CPU",
        len(slides), plan.num_actors, plan.actor_cpus, plan.actor_gpus, plan.read_cpus,
    )  # fmt: skip
    items = [{"slide_index": i, "slide_path": p} for i, p in enumerate(slides)]
    size = grid.patch_size
    return (
        ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        .map_batches(
            plan_slide_batch, fn_kwargs={"grid": grid}, batch_size=1, num_cpus=plan.read_cpus,
            batch_format="numpy",
        )
        .repartition(target_num_rows_per_block=batch_size)
        .map_batches(
            read_patch_batch, fn_kwargs={"grid": grid}, batch_size=batch_size, num_cpus=plan.read_cpus,
            # keeps the reads in their own tasks (Ray Data fuses maps whose remote args match)
            memory=384 * 2**20 + batch_size * size * size * 9, batch_format="numpy",
        )
        .map_batches(
            PatchEncoder, fn_constructor_kwargs={"weights": [ray.put(weights)], "threads": plan.intra_op_threads},
            compute=ActorPoolStrategy(size=plan.num_actors), batch_size=batch_size,
            num_cpus=plan.actor_cpus, num_gpus=plan.actor_gpus or None, batch_format="numpy",
        )
    )  # fmt: skip


# -- the files ----------------------------------------------------------------------------------------
def write_features_h5(
    path: str | Path,
    features: np.ndarray,
    coords: np.ndarray,
    coords_attrs: dict[str, Any],
    file_attrs: dict[str, Any] | None = None,
) -> Path:
    """Write one slide's ``features`` and ``coords`` (layout in the module docstring) atomically."""
    import h5py

    features = np.asarray(features, np.float32)
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    if len(features) != len(coords):
        raise ValueError(f"{path}: {len(features)} feature rows but {len(coords)} coords")

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features)
            dataset = f.create_dataset("coords", data=coords)
            for key, value in coords_attrs.items():
                dataset.attrs[key] = value
            for key, value in (file_attrs or {}).items():
                f.attrs[key] = value

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, write)


def h5_is_complete(path: str | Path, fingerprint: str | None = None) -> str | None:
    """None when ``path`` is a whole features file (of ``fingerprint``), else why not."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            n, m = f["features"].shape[0], f["coords"].shape[0]
            if n != m or n == 0 or f["coords"].shape[1:] != (2,):
                return f"{n} feature rows and coords of shape {f['coords'].shape}"
            if fingerprint is not None and f.attrs.get("fingerprint") != fingerprint:
                return "made with another backbone or other settings"
    except FileNotFoundError:
        return "missing"
    except Exception as exc:  # noqa: BLE001 - h5py raises OSError, KeyError, ... for a damaged file
        return f"unreadable ({type(exc).__name__}: {exc})"
    return None


@dataclass
class ExtractResult:
    """What an extraction run did.

    Attributes:
        features_dir: The ``h5_files`` folder.
        files: Slide name -> its h5 file (this run's and those from before).
        bad_slides: Slide path -> reason, of this run.
        num_extracted, num_skipped: Slides written now, and found whole from before.
        num_patches: Patches encoded now.
        feature_dim: D.
        seconds: Wall time of the stream.
        mlflow_run_id: The MLflow run, when tracked.
    """

    run_dir: str
    features_dir: str
    files: dict[str, str]
    bad_slides: dict[str, str]
    num_slides: int
    num_extracted: int
    num_skipped: int
    num_patches: int
    feature_dim: int
    seconds: float
    mlflow_run_id: str | None = None
    report: dict[str, str] = field(default_factory=dict)


def _slide_names(paths: list[str]) -> dict[str, str]:
    names: dict[str, str] = {}
    for p in paths:
        name = Path(p.rstrip("/")).stem
        if name in names.values():
            other = next(q for q, n in names.items() if n == name)
            raise ValueError(
                f"slides={p!r} and {other!r} share the name {name!r}; the h5 files are named by "
                "slide: give slides with distinct file names"
            )
        names[p] = name
    return names


@dataclass
class _Slide:
    """One slide's rows as they arrive in the driver."""

    first: dict[str, Any]
    xs: list[np.ndarray] = field(default_factory=list)
    ys: list[np.ndarray] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)
    received: int = 0
    unreadable: list[str] = field(default_factory=list)


@holds_run_lock
def run_extraction(config: ExtractConfig, *, tracking: bool = True) -> ExtractResult:
    """Extract the features of every slide of ``config`` (module docstring).

    Raises:
        ValueError: No backbone or slides, a backbone file that fits no architecture, two
            slides of one name, or no usable slide at all.
    """
    from histokd.cli import config_to_dict, save_config

    if not config.backbone:
        raise ValueError("backbone is empty: give backbone.pth of rckd_pretrain as --backbone")
    paths = discover_slides(config.slides) if config.slides else []
    if not paths:
        raise ValueError(
            f"slides={config.slides!r}: no slides found; give files, folders or .txt lists"
        )
    names = _slide_names(paths)
    encoder, arch, kind = load_encoder(config.backbone, config.arch)
    sha = file_sha256(config.backbone)
    tag = config.tag or f"{arch}-{sha[:8]}"
    dim = int(encoder[1].feature_info.channels()[-1])
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out_root = Path(config.output).expanduser().resolve() if config.output else run_dir
    h5_dir = out_root / f"features_{tag}" / H5_DIR
    h5_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    settings = {
        "backbone_sha256": sha, "arch": arch, "mpp": config.mpp, "patch_size": config.patch_size,
        "min_tissue_fraction": config.min_tissue_fraction, "assume_mpp": config.assume_mpp,
    }  # fmt: skip
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    files: dict[str, str] = {}
    for p in paths:
        target = h5_dir / f"{names[p]}.h5"
        if config.overwrite or not target.exists():
            continue
        why = h5_is_complete(target, fingerprint)
        if why is None:
            files[names[p]] = str(target)
        else:
            print(f"slide {names[p]}: extracting again, {target.name} is {why}", flush=True)
    pending = [p for p in paths if names[p] not in files]
    print(
        f"extracting {len(pending)} of {len(paths)} slide(s) with {arch} ({kind} {config.backbone}, "
        f"{dim} features; {config.patch_size} px at {config.mpp:g} um/px) into {h5_dir}; "
        f"{len(files)} done before",
        flush=True,
    )
    run = None
    if tracking:
        from histokd.run import open_mlflow_run

        params = {**config_to_dict(config), "resolved_arch": arch, "tag": tag, "feature_dim": dim}
        run = open_mlflow_run(config, "extract_features", params=params)

    bad: dict[str, tuple[str, str]] = {}
    num_patches, done = 0, 0
    started = time.monotonic()
    try:
        if pending:
            from histokd.cluster import init_ray

            init_ray(config.ray_address)
            grid = GridSettings(
                config.mpp, config.patch_size, config.tissue_filter(), config.assume_mpp
            )
            weights = {"arch": arch, "state": encoder.state_dict()}
            dataset = feature_dataset(
                pending,
                weights,
                grid,
                config.batch_size,
                config.num_workers,
                config.gpus_per_worker,
            )
            in_flight: dict[int, _Slide] = {}
            for batch in dataset.iter_batches(
                batch_size=None, batch_format="numpy", prefetch_batches=0
            ):
                index = np.asarray(batch["slide_index"])
                for slide_index in np.unique(index):
                    rows = np.flatnonzero(index == slide_index)
                    path = pending[int(slide_index)]
                    if batch["status"][rows[0]] == BAD:
                        bad[path] = ("plan", str(batch["message"][rows[0]]))
                        print(f"bad slide, skipped: {bad[path][1]}", flush=True)
                        continue
                    slide = in_flight.setdefault(
                        int(slide_index), _Slide({k: batch[k][rows[0]] for k in META_COLUMNS})
                    )
                    status = np.asarray(batch["status"], dtype=object)[rows]
                    ok = rows[status == PATCH]
                    slide.xs.append(batch["x"][ok])
                    slide.ys.append(batch["y"][ok])
                    slide.features.append(batch["features"][ok])
                    slide.unreadable += [
                        str(m) for m in batch["message"][rows[status == UNREADABLE]]
                    ]
                    slide.received += len(rows)
                    if slide.received < int(slide.first["count"]):
                        continue
                    del in_flight[int(slide_index)]
                    written = _finish(
                        slide, path, names[path], h5_dir, config, arch, sha, fingerprint, bad
                    )
                    if written is not None:
                        files[names[path]] = written
                        done += 1
                        num_patches += slide.received - len(slide.unreadable)
                    elapsed = max(time.monotonic() - started, 1e-9)
                    print(
                        f"[{done + len(bad)}/{len(pending)}] {names[path]}: "
                        f"{slide.received - len(slide.unreadable)} patches "
                        f"({num_patches / elapsed:.1f} patches/s overall)",
                        flush=True,
                    )
            for slide_index, slide in in_flight.items():  # cannot happen unless rows were lost
                bad[pending[slide_index]] = (
                    "stream", f"only {slide.received} of {slide.first['count']} patches arrived"
                )  # fmt: skip
    except Exception:  # Ctrl-C and SIGTERM: cli.run_job ends the run as KILLED
        if run is not None:
            run.finish("FAILED")
        raise
    seconds = time.monotonic() - started
    report = {"bad_slides": str(run_dir / BAD_SLIDES_FILE), "run": str(run_dir / RUN_FILE)}
    write_skipped_slides(Path(report["bad_slides"]), bad)
    counts = {
        "num_slides": len(paths), "num_extracted": done, "num_skipped": len(paths) - len(pending),
        "num_bad": len(bad), "num_patches": num_patches, "feature_dim": dim, "seconds": round(seconds, 3),
        "patches_per_second": round(num_patches / seconds, 3) if seconds > 0 else 0.0,
    }  # fmt: skip
    record = {**counts, "features_dir": str(h5_dir), "tag": tag, "arch": arch, "fingerprint": fingerprint,
              "bad_slides": {p: list(v) for p, v in bad.items()}}  # fmt: skip
    write_text_atomic(report["run"], json.dumps(record, indent=2) + "\n")
    if run is not None:
        run.log_metrics({k: float(v) for k, v in counts.items()})
        for name in ("bad_slides", "run"):
            run.log_artifact(report[name])
    print(
        f"{done} slide(s) extracted ({num_patches} patches), {counts['num_skipped']} done before, "
        f"{len(bad)} bad (listed in {report['bad_slides']})",
        flush=True,
    )
    if not files:
        if run is not None:
            run.finish("FAILED")
        reasons = "\n".join(f"  {why}" for _, (_, why) in sorted(bad.items()))
        raise ValueError(
            f"no usable slides among {len(paths)}; {len(bad)} bad:\n{reasons}\nreport: {report['bad_slides']}"
        )
    if run is not None:
        run.finish("FINISHED")
    return ExtractResult(
        run_dir=str(run_dir), features_dir=str(h5_dir), files=files, bad_slides={p: v[1] for p, v in bad.items()},
        num_slides=len(paths), num_extracted=done, num_skipped=counts["num_skipped"], num_patches=num_patches,
        feature_dim=dim, seconds=seconds, mlflow_run_id=run.run_id if run else None, report=report,
    )  # fmt: skip


def _finish(
    slide: _Slide,
    path: str,
    name: str,
    h5_dir: Path,
    config: ExtractConfig,
    arch: str,
    sha: str,
    fingerprint: str,
    bad: dict[str, tuple[str, str]],
) -> str | None:
    """Write a slide whose patches all arrived; report it when none could be read."""
    features = np.concatenate(slide.features) if slide.features else np.empty((0, 0), np.float32)
    if len(features) == 0:
        first = slide.unreadable[0] if slide.unreadable else "no patch"
        bad[path] = ("read", f"all {slide.received} patches unreadable; first: {first}")
        print(f"bad slide, skipped: {bad[path][1]}", flush=True)
        return None
    if slide.unreadable:
        print(
            f"{name}: {len(slide.unreadable)} of {slide.received} patches unreadable, left out: "
            f"{slide.unreadable[0]}",
            flush=True,
        )
    coords = np.stack([np.concatenate(slide.xs), np.concatenate(slide.ys)], 1)
    order = np.lexsort((coords[:, 0], coords[:, 1]))  # row by row, as the grid is laid out
    first = slide.first
    extent, mpp, base_mpp = int(first["extent"]), float(first["mpp"]), float(first["base_mpp"])
    coords_attrs = {
        "patch_size": config.patch_size, "patch_size_level0": extent,
        "level0_magnification": float(first["base_magnification"]), "target_magnification": 10.0 / config.mpp,
        "level0_mpp": base_mpp, "target_mpp": mpp, "overlap": 0, "name": name, "savetodir": str(h5_dir),
        "patch_level": int(first["level"]), "downsample": np.array([extent / config.patch_size] * 2),
        "level_dim": np.array([int(first["width"]), int(first["height"])], np.int64),
    }  # fmt: skip
    file_attrs = {
        "slide_path": path, "arch": arch, "backbone": config.backbone, "backbone_sha256": sha,
        "feature_dim": features.shape[1], "fingerprint": fingerprint,
    }  # fmt: skip
    target = h5_dir / f"{name}.h5"
    write_features_h5(target, features[order], coords[order], coords_attrs, file_attrs)
    return str(target)
