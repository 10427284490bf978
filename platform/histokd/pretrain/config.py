"""The RCKD pretraining job's settings, with the paper's defaults and where each comes from."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Literal

from histokd.cli import arg, check_ints, parse_json_object
from histokd.run import WorkerConfig, resolve_output_path

__all__ = ["AUGMENT_DEFAULT", "DEMO_PRESET", "PretrainConfig"]

# The flips and rotations of earlier releases, plus HED jitter (Tellez et al. 2019).
AUGMENT_DEFAULT = ("flip", "rot90", "hed")


@dataclass
class PretrainConfig(WorkerConfig):
    """RCKD pretraining (Kim et al. 2023, Sec. 2.2.1 and Algorithm 1).

    Defaults are the paper's. With no ``slides`` the job uses the demo preset (synthetic demo
    slides, the shipped demo teacher, small sizes) so that it runs offline in minutes.

    Attributes:
        mpp: The patches' pixel size in um/px (RCKD: 20x, 0.5 um/px); ``magnification`` is its
            alias (``10 / magnification``). Both resolve here: after construction both are set.
        patch_size, patch_size_um: The patch side in pixels (RCKD: 1024) or in um (512 um is
            1024 px at 0.5 um/px).
        assume_mpp: um per level-0 pixel of slides that record no MPP, TIFF resolution or
            objective power (else they are bad slides); ``base_magnification`` is the older way
            to say it (``10 / base_magnification``).
        sampling, max_patches_per_slide: How patches spread over slides
            (`histokd.manifest.slide_quotas`): ``uniform``, ``capped`` (at most
            ``max_patches_per_slide`` each; the default when it is set) or ``proportional`` (to
            tissue area, with the cap).
        teacher: A StarDist pretrained name (RCKD: ``2D_versatile_he``), ``stardist:<name>``, a
            StarDist model folder, a registered teacher (``demo``, ``deconvolution``), or
            ``package.module:name`` (a teacher that module registers).
        alpha: RCKD Eq. 2's threshold on the teacher's probability (paper: 0.5); None (``auto``
            on the command line): the teacher's own default. For StarDist 0.5 marks nucleus
            cores, not whole nuclei; 0.1-0.2 recovers whole nuclei (README).
        mask_mode: ``probability``: the pseudo label is Eq. 2 on the probability map (fast);
            ``instances``: StarDist's ``predict_instances`` polygons (its NMS runs in
            TensorFlow: the ``tf-cpu``/``tf-gpu`` extra).
        teacher_backend: How a StarDist teacher runs: ``torch`` (its network in PyTorch, no
            TensorFlow needed) or ``tensorflow`` (StarDist itself: the ``tf-cpu``/``tf-gpu``
            extra).
        teacher_precision: A torch teacher on CUDA runs in fp32 or under bf16 autocast; on CPU
            always fp32.
        teacher_placement: ``actors``: a Ray Data pool of teacher actors labels the patches
            once, before training, into the record cache, and every epoch streams the records
            (no slide read, no teacher). ``trainer``: each training worker labels its own
            batches on its device, every epoch, with no cache; it needs a StarDist
            teacher, ``teacher_backend='torch'`` and ``mask_mode='probability'``. What each
            costs: docs/operators_guide.md, section 6.
        teacher_mpp: The pixel size (um/px) the teacher was trained at: patches are resampled
            to it, labelled, and the probability resampled back before Eq. 2. Default: the
            teacher's own (its ``histokd_teacher.json``; ``2D_versatile_he``: 0.25, 40x), else
            the patches' scale. Check it with ``jobs/check_teacher.py``.
        teacher_normalization: The percentile normalisation the teacher was trained with:
            ``joint`` over the channels or ``per_channel``. Default: the teacher's own (joint
            for ``2D_versatile_he``).
        teacher_settings: A ``histokd_teacher.json`` (``jobs/check_teacher.py`` writes one):
            its alpha, normalization, percentiles and teacher_mpp replace ``alpha``,
            ``teacher_normalization`` and ``teacher_mpp``.
        empty_patch_share: A patch whose pseudo label has less than this share of nucleus
            pixels counts as empty.
        empty_slide_fraction: The job warns, naming the slide, when more than this share of a
            slide's patches are empty; ``label_share.csv`` in the run folder has every slide.
        teacher_actors, teacher_resources: Settings of the actor pool (``teacher_placement``
            ``actors`` only). ``teacher_gpus`` is ignored with ``trainer``.
        teacher_resources, trainer_resources: Custom Ray resources each teacher actor or
            training worker asks for, e.g. ``{"teacher_node": 1}`` to place them on nodes
            started with that resource (JSON on the command line; CPUs and GPUs have their
            own fields).
        record_cache: The record cache folder (``teacher_placement`` ``actors`` only): each
            patch's training record (resized image and pseudo label) is made once and every
            epoch reads it from there. Default: ``records/`` in the run folder. A folder shared
            by several runs lets those with the same teacher, teacher settings, input size and
            record format reuse the records (other settings get folders of their own inside).
        record_format, jpeg_quality: How cached images are stored: ``jpeg`` at this quality
            (RCKD names none; 95, without chroma subsampling, keeps stain texture: on the demo
            slides 139 kB a 512 px record, a sixth of the raw image) or lossless ``png`` (about
            3x the disk of JPEG 95 there). ``benchmarks/record_cache.py`` measures both.
        lr: The paper gives none: SimCLR's LARS rule, 0.3 x batch/256.
        init: The student backbone's initial weights: ``random`` (the default), ``imagenet``
            (what RCKD did, Sec. 2.2.1, following USI: timm's ImageNet weights from the Hugging
            Face Hub; not for CSAT, which has none), a weights file, or ``hf-hub:ORG/NAME``
            (`histokd.models.timm_weights.parse_init`).
        augment: Augmentations of the training patches (`histokd.augment`; the pseudo label
            gets the same flips and rotations), ``none`` for none. ``augment_device``: ``cpu``
            augments the batch before it moves to the device, ``device`` after; ``auto``: the
            device on a GPU worker. Both give the same patches for the same seed.
    """

    # --- where ------------------------------------------------------------------------------
    run_name: str = arg("rckd", "run name; rerunning it resumes from its last checkpoint")
    mlflow_experiment: str = arg("histokd-rckd", "MLflow experiment name")
    register_model: str | None = arg(None, "MLflow model registry name of the logged model")
    slides: list[str] = arg(
        help="files, folders, .txt lists, s3:// or gs:// URLs; empty: demo slides", factory=list
    )
    demo_dir: str = arg("demo_data", "where the demo slides are written when no slides are given")
    # --- patches (RCKD Sec. 2.1.1, Algorithm 1) ----------------------------------------------
    mpp: float | None = arg(None, "um per patch pixel; default 0.5 (RCKD: Mag = 20, 0.5 um/px)")
    magnification: float | None = arg(None, "alias of --mpp: 10 / magnification (20x: 0.5 um/px)")
    patch_size: int | None = arg(None, "patch side in pixels; default 1024 (RCKD: P_size = 1024)")
    patch_size_um: float | None = arg(None, "patch side in um instead (512 um = 1024 px at 0.5)")
    num_patches: int = arg(400_000, "S_n, patches sampled over all slides (RCKD: 400,000)")
    assume_mpp: float | None = arg(None, "um/px of slides recording no MPP, resolution or power")
    base_magnification: float | None = arg(None, "older way to give --assume-mpp: 10 / this")
    sampling: Literal["uniform", "capped", "proportional"] | None = arg(
        None, "patches per slide: uniform, capped, proportional; auto: capped if a cap is set"
    )
    max_patches_per_slide: int | None = arg(None, "cap of capped/proportional sampling")
    holdout_fraction: float = arg(0.02, "share of patches held out for teacher-vs-student metrics")
    # --- teacher (RCKD Sec. 2.2.1, Eqs. 1-2) --------------------------------------------------
    teacher: str = arg("2D_versatile_he", "StarDist name (RCKD) or folder, demo, deconvolution")
    alpha: float | None = arg(0.5, "Eq. 2 probability threshold (RCKD: 0.5); auto: the teacher's")
    mask_mode: Literal["probability", "instances"] = arg("probability", "Eq. 2 (fast) or NMS (TF)")
    teacher_backend: Literal["torch", "tensorflow"] = arg("torch", "StarDist in PyTorch or TF")
    teacher_precision: Literal["fp32", "bf16"] = arg("fp32", "autocast of a torch teacher on CUDA")
    teacher_compile: bool = arg(False, "torch.compile a torch teacher (~30 s; for long runs)")
    teacher_placement: Literal["actors", "trainer"] = arg("actors", "actor pool, or each trainer")
    teacher_mpp: float | None = arg(None, "um/px the teacher was trained at; default: its own")
    teacher_normalization: Literal["joint", "per_channel"] | None = arg(None, "default: teacher's")
    teacher_settings: str | None = arg(None, "a histokd_teacher.json from jobs/check_teacher.py")
    empty_patch_share: float = arg(0.005, "nucleus-pixel share below which a patch is empty")
    empty_slide_fraction: float = arg(0.9, "warn above this share of empty patches in a slide")
    teacher_batch_size: int = arg(8, "patches per teacher call (an actor's or a training worker's)")
    teacher_actors: int | None = arg(None, "actors in the pool; auto: one per GPU, or 1 on CPU")
    teacher_gpus: float = arg(0.5, "GPU share of each teacher actor (the student shares the GPU)")
    teacher_resources: dict[str, float] = arg(help="Ray resources per actor (JSON)", factory=dict)
    record_cache: str | None = arg(None, "record cache folder; default: records/ in the run folder")
    record_format: Literal["jpeg", "png"] = arg(
        "jpeg", "cached images: jpeg (small) or png (lossless)"
    )
    jpeg_quality: int = arg(95, "JPEG quality of cached images, 1-100")
    # --- student (RCKD Sec. 2.2.1, 2.3) -------------------------------------------------------
    backbone: str = arg("csat", "csat[_nosat], resnet18[_sat], efficientnet_b0 or convnextv2_atto")
    input_size: int = arg(512, "side patches are resized to (bilinear) for the student (RCKD: 512)")
    epochs: int = arg(100, "training epochs (RCKD: 100)")
    warmup_epochs: int = arg(10, "linear warm-up from a learning rate of 0 (RCKD: 10 of 100)")
    batch_size: int = arg(64, "global batch size over all workers (RCKD: 64)")
    lr: float = arg(0.075, "peak LARS rate after warm-up (not in RCKD; SimCLR: 0.3 x batch/256)")
    weight_decay: float = arg(1e-6, "LARS weight decay (SimCLR's setting; not stated in RCKD)")
    momentum: float = arg(0.9, "LARS momentum")
    init: str = arg("random", "random, imagenet (RCKD Sec. 2.2.1, USI), FILE or hf-hub:ORG/NAME")
    # --- augmentation (not in RCKD; histokd.augment) -----------------------------------------
    augment: list[str] = arg(help="flip rot90 hed brightness contrast saturation hue, or none",
                             factory=lambda: list(AUGMENT_DEFAULT))  # fmt: skip
    augment_device: Literal["auto", "cpu", "device"] = arg(
        "auto", "augment before (cpu) or after the batch moves to the device; auto: device on GPU"
    )
    hed_sigma: float = arg(0.05, "HED jitter strength (Tellez et al. 2019: 0.05, 'HED-light')")
    color_jitter: float = arg(0.1, "brightness/contrast/saturation factors drawn from [1-x, 1+x]")
    hue_jitter: float = arg(0.02, "hue shift drawn from [-x, x] of the hue circle")
    # --- cluster -----------------------------------------------------------------------------
    trainer_resources: dict[str, float] = arg(help="Ray resources per worker (JSON)", factory=dict)
    precision: Literal["auto", "fp32", "bf16"] = arg("auto", "autocast; auto: GPU bf16, else fp32")
    keep_checkpoints: int = arg(3, "last N checkpoints kept (the best by hold-out IoU is kept too)")
    dataloader_prefetch: int = arg(2, "batches prefetched per worker")
    overlays: int = arg(8, "hold-out patches drawn in the teacher-vs-student overlay each epoch")
    stop_after_epoch: int | None = arg(None, "stop cleanly after this epoch; rerunning it resumes")
    fail_at_epoch: int | None = arg(None, "test: one worker raises once in this epoch", hidden=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        from histokd.tracking import check_registered_model_name

        check_registered_model_name(self.register_model)
        if isinstance(self.slides, str):
            self.slides = [self.slides]
        self._resolve_units()
        check_ints(
            self,
            [
                "patch_size",
                "num_patches",
                "input_size",
                "batch_size",
                "teacher_batch_size",
                "keep_checkpoints",
                "dataloader_prefetch",
                "epochs",
            ],
        )
        check_ints(self, ["warmup_epochs", "overlays"], minimum=0)
        if self.warmup_epochs > self.epochs:
            raise ValueError(
                f"warmup_epochs={self.warmup_epochs}: must be at most epochs={self.epochs}"
            )
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r}: must be positive")
        if self.alpha is not None and not 0 < self.alpha <= 1:
            raise ValueError(f"alpha={self.alpha!r}: must be in (0, 1] (RCKD Eq. 2: 0.5)")
        if self.mask_mode not in ("probability", "instances"):
            raise ValueError(f"mask_mode={self.mask_mode!r}: allowed: probability, instances")
        _check_teacher_backend(self.teacher_backend, self.mask_mode, self.teacher_precision)
        self._teacher_settings = _read_teacher_settings(self.teacher_settings)
        if self.teacher_mpp is not None and not 0.01 <= self.teacher_mpp <= 100:
            raise ValueError(
                f"teacher_mpp={self.teacher_mpp!r}: must be a pixel size in um/px in [0.01, 100] (40x: 0.25), or unset"
            )
        if self.teacher_normalization not in (None, "joint", "per_channel"):
            raise ValueError(
                f"teacher_normalization={self.teacher_normalization!r}: allowed: joint, per_channel, or unset"
            )
        if not 0 <= self.empty_patch_share < 1 or not 0 < self.empty_slide_fraction <= 1:
            raise ValueError(
                f"empty_patch_share={self.empty_patch_share!r}, empty_slide_fraction={self.empty_slide_fraction!r}: "
                "need 0 <= empty_patch_share < 1 and 0 < empty_slide_fraction <= 1"
            )
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision={self.precision!r}: allowed: auto, fp32, bf16")
        if not 0 < self.holdout_fraction < 0.5:
            raise ValueError(f"holdout_fraction={self.holdout_fraction!r}: must be in (0, 0.5)")
        if not 0 < self.teacher_gpus <= 1:
            raise ValueError(f"teacher_gpus={self.teacher_gpus!r}: must be in (0, 1]")
        check_ints(self, ["num_workers", "teacher_actors"], auto=True)
        for name in ["teacher_resources", "trainer_resources"]:
            setattr(self, name, _check_resources(name, getattr(self, name)))
        if not self.weight_decay >= 0 or not 0 <= self.momentum < 1:
            raise ValueError(
                f"weight_decay={self.weight_decay!r}, momentum={self.momentum!r}: need weight_decay >= 0 and 0 <= momentum < 1"
            )
        from histokd.models import BACKBONES

        if self.backbone not in BACKBONES:
            raise ValueError(
                f"backbone={self.backbone!r}: unknown; allowed: {', '.join(BACKBONES)}"
            )
        from histokd.teachers.registry import resolve_teacher_spec

        resolve_teacher_spec(self.teacher)
        _check_teacher_placement(self)
        from histokd.teachers.cache import check_record_settings

        check_record_settings(self.input_size, self.record_format, self.jpeg_quality)
        if self.record_cache is not None:
            if "://" in self.record_cache:
                raise ValueError(
                    f"record_cache={self.record_cache!r}: must be a folder on a filesystem every node "
                    "mounts (object storage is not supported for the record cache)"
                )
            self.record_cache = resolve_output_path(self.record_cache, "record_cache")
        from histokd.models.timm_weights import check_init

        self.init = check_init(self.init, self.backbone)  # Hub weights: cached or fetched now
        from histokd.augment import check_augment, check_strengths

        self.augment = check_augment(self.augment, AUGMENT_DEFAULT)
        check_strengths(self)
        self.demo_dir = resolve_output_path(self.demo_dir, "demo_dir")

    def _resolve_units(self) -> None:
        """mpp from mpp or magnification, patch_size from px or um, assume_mpp from itself or
        base_magnification, and the sampling rule; each conflict as one error."""
        from histokd.manifest import patch_size_px, resolve_sampling
        from histokd.slides import resolve_assume_mpp, resolve_target_mpp

        self.mpp = resolve_target_mpp(self.mpp, self.magnification)
        self.magnification = 10.0 / self.mpp
        self.patch_size = patch_size_px(self.patch_size, self.patch_size_um, self.mpp)
        self.assume_mpp = resolve_assume_mpp(self.assume_mpp, self.base_magnification)
        self.sampling = resolve_sampling(self.sampling, self.max_patches_per_slide)

    def teacher_kwargs(self) -> dict:
        """The teacher's settings for :func:`histokd.teachers.build_teacher`.

        The patches' pixel size (``patch_mpp``: 20x is 0.5 um/px) lets
        a StarDist teacher resample them to its own scale; other teachers ignore it.
        """
        kwargs = {"alpha": self.alpha, "mask_mode": self.mask_mode, "backend": self.teacher_backend,
                  "patch_mpp": round(self.mpp, 6)}  # fmt: skip
        if self.teacher_mpp is not None:
            kwargs["teacher_mpp"] = self.teacher_mpp
        if self.teacher_normalization is not None:
            kwargs["normalization"] = self.teacher_normalization
        kwargs.update(getattr(self, "_teacher_settings", None) or {})
        if self.teacher_backend == "torch":
            kwargs.update(precision=self.teacher_precision, compile=self.teacher_compile)
        return kwargs


def _check_resources(name: str, value: dict | str) -> dict[str, float]:
    """Custom Ray resources: a mapping (or its JSON text, from the command line) of resource
    names to non-negative amounts. CPUs and GPUs have their own fields."""
    if isinstance(value, str):
        where, example = f"{name}={value!r}", "'{\"trainer_node\": 1}'"
        value = parse_json_object(value, where, example) if value.strip() else {}
    if not isinstance(value, dict):
        raise ValueError(
            f"{name}={value!r}: must be a mapping of Ray resource names to amounts, e.g. {{'trainer_node': 1}}"
        )
    for key, amount in value.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name}={value!r}: resource names must be non-empty strings")
        if key in ("CPU", "GPU", "memory"):
            raise ValueError(
                f"{name}={value!r}: {key!r} is not a custom resource; set cpus_per_worker, teacher_gpus or use_gpu instead"
            )
        if (
            isinstance(amount, bool)
            or not isinstance(amount, (int, float))
            or not 0 <= amount < math.inf
        ):
            raise ValueError(
                f"{name}={value!r}: the amount of {key!r} must be a non-negative number"
            )
    return {key: float(amount) for key, amount in value.items()}


def _read_teacher_settings(path: str | None) -> dict:
    """The teacher settings in a histokd_teacher.json (as jobs/check_teacher.py writes it)."""
    if path is None:
        return {}
    try:
        stored = json.loads(open(os.path.expanduser(path)).read())
    except OSError as exc:
        raise ValueError(f"teacher_settings={path!r}: cannot read it ({exc.strerror})") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"teacher_settings={path!r}: not JSON ({exc.msg})") from exc
    keys = ("alpha", "normalization", "percentiles", "teacher_mpp")
    if not isinstance(stored, dict) or not any(k in stored for k in keys):
        raise ValueError(
            f"teacher_settings={path!r}: holds none of {', '.join(keys)} (jobs/check_teacher.py writes them)"
        )
    return {k: stored[k] for k in keys if stored.get(k) is not None}


def _check_teacher_backend(backend: str, mask_mode: str, precision: str) -> None:
    """The teacher backend exists here and can do what is asked of it."""
    import importlib.util

    if backend not in ("torch", "tensorflow"):
        raise ValueError(f"teacher_backend={backend!r}: allowed: torch, tensorflow")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"teacher_precision={precision!r}: allowed: fp32, bf16")
    asked = (
        "mask_mode='instances' (StarDist's NMS)"
        if mask_mode == "instances"
        else "teacher_backend='tensorflow'"
    )
    if (backend == "tensorflow" or mask_mode == "instances") and not all(
        importlib.util.find_spec(m) for m in ("tensorflow", "stardist")
    ):
        raise ValueError(
            f"{asked} needs TensorFlow and StarDist: pip install 'histokd[tf-cpu]' "
            "(or 'histokd[tf-gpu]' on NVIDIA GPUs)"
            + ("" if mask_mode == "instances" else ", or use --teacher-backend torch")
        )


def _check_teacher_placement(config: PretrainConfig) -> None:
    """``trainer`` placement runs a StarDist network in PyTorch on the worker's device; the
    actor pool's own settings mean nothing there, so setting them is a mistake."""
    placement = config.teacher_placement
    if placement not in ("actors", "trainer"):
        raise ValueError(f"teacher_placement={placement!r}: allowed: actors, trainer")
    if placement == "actors":
        return
    if config.teacher_backend != "torch":
        raise ValueError(
            f"teacher_placement='trainer' runs the teacher's network in the training worker's PyTorch; "
            f"teacher_backend={config.teacher_backend!r} cannot: give --teacher-backend torch, or --teacher-placement actors"
        )
    if config.teacher == "deconvolution":
        raise ValueError(
            "teacher_placement='trainer' needs a StarDist teacher (it runs its network on the worker's device); "
            "teacher='deconvolution' has none: use --teacher-placement actors"
        )
    if config.mask_mode != "probability":
        raise ValueError(
            f"mask_mode={config.mask_mode!r} runs StarDist's NMS in TensorFlow, which teacher_placement='trainer' "
            "cannot: use --mask-mode probability (RCKD Eq. 2), or --teacher-placement actors"
        )
    for name, unset in (("teacher_actors", None), ("teacher_resources", {})):
        if getattr(config, name) != unset:
            raise ValueError(
                f"{name}={getattr(config, name)!r}: a setting of the teacher actor pool, which "
                "teacher_placement='trainer' does not start; leave it unset or use --teacher-placement actors"
            )
    for name, unset in (("record_cache", None), ("record_format", "jpeg"), ("jpeg_quality", 95)):
        if getattr(config, name) != unset:
            raise ValueError(
                f"{name}={getattr(config, name)!r}: a setting of the record cache, which "
                "teacher_placement='trainer' does not keep (its workers label every epoch); leave it "
                "unset or use --teacher-placement actors"
            )


# Small enough to run end to end offline on a 2-core CPU in a few minutes: the demo slides, the
# shipped demo teacher, 256 px patches at 20x resized to 128 px for the student.
DEMO_PRESET: dict = {
    "teacher": "demo",
    "alpha": None,  # the demo teacher's own 0.1: whole nuclei (IoU 0.89 with the truth; 0.5 gives cores, 0.39)
    "patch_size": 256,
    "num_patches": 192,
    "input_size": 128,
    "batch_size": 16,
    "epochs": 8,
    "warmup_epochs": 1,
    "lr": 1.0,
    "holdout_fraction": 0.1,
    "teacher_batch_size": 16,
}
