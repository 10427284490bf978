"""The RCKD pretraining job's settings, with the paper's defaults and where each comes from."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Literal

from histokd.cli import check_ints
from histokd.run import WorkerConfig

__all__ = ["DEMO_PRESET", "PretrainConfig"]


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class PretrainConfig(WorkerConfig):
    """RCKD pretraining (Kim et al. 2023, Sec. 2.2.1 and Algorithm 1).

    Defaults are the paper's. With no ``slides`` the job uses the demo preset (synthetic demo
    slides, the shipped demo teacher, small sizes) so that it runs offline in minutes.
    """

    # --- where ------------------------------------------------------------------------------
    run_name: str = field(
        default="rckd", metadata=_help("run name; rerunning it resumes from its last checkpoint")
    )
    mlflow_experiment: str = field(default="histokd-rckd", metadata=_help("MLflow experiment name"))
    slides: list[str] = field(
        default_factory=list,
        metadata=_help("slide files, folders or .txt lists; empty: the demo slides"),
    )
    demo_dir: str = field(
        default="demo_data",
        metadata=_help("where the demo slides are written when no slides are given"),
    )
    # --- patches (RCKD Sec. 2.1.1, Algorithm 1) ----------------------------------------------
    magnification: float = field(
        default=20.0, metadata=_help("patch magnification (RCKD: Mag = 20)")
    )
    patch_size: int = field(
        default=1024,
        metadata=_help("patch side in pixels at --magnification (RCKD: P_size = 1024)"),
    )
    num_patches: int = field(
        default=400_000, metadata=_help("S_n, patches sampled over all slides (RCKD: 400,000)")
    )
    base_magnification: float | None = field(
        default=None,
        metadata=_help(
            "level-0 magnification for slides that record neither objective power nor MPP"
        ),
    )
    holdout_fraction: float = field(
        default=0.02,
        metadata=_help(
            "fixed share of the patches held out for per-epoch student-vs-teacher metrics"
        ),
    )
    # --- teacher (RCKD Sec. 2.2.1, Eqs. 1-2) --------------------------------------------------
    teacher: str = field(
        default="2D_versatile_he",
        metadata=_help(
            "teacher: a StarDist name (RCKD: 2D_versatile_he), stardist:<name>, a StarDist model folder, 'demo' or 'deconvolution'"
        ),
    )
    alpha: float | None = field(
        default=0.5,
        metadata=_help(
            "RCKD Eq. 2 threshold on the teacher's probability (paper: 0.5); 'auto': the teacher's own default. For StarDist 0.5 marks nucleus cores, not whole nuclei; 0.1-0.2 recovers whole nuclei (see README)"
        ),
    )
    mask_mode: Literal["probability", "instances"] = field(
        default="probability",
        metadata=_help(
            "pseudo label from the probability map (Eq. 2, fast) or from predict_instances polygons (StarDist's NMS: runs in TensorFlow, the tf-cpu/tf-gpu extra)"
        ),
    )
    teacher_backend: Literal["torch", "tensorflow"] = field(
        default="torch",
        metadata=_help(
            "how a StarDist teacher runs: torch (its network in PyTorch, no TensorFlow needed) or tensorflow (StarDist itself: the tf-cpu/tf-gpu extra)"
        ),
    )
    teacher_precision: Literal["fp32", "bf16"] = field(
        default="fp32",
        metadata=_help(
            "torch teacher on CUDA: fp32, or bf16 autocast of its network (fp32 on CPU)"
        ),
    )
    teacher_compile: bool = field(
        default=False,
        metadata=_help(
            "torch teacher: torch.compile its network (worth it for long runs; compiling takes ~30 s)"
        ),
    )
    teacher_placement: Literal["actors", "trainer"] = field(default="actors", metadata=_help(
        "where the teacher runs. actors: a Ray Data pool of teacher actors (--teacher-actors, each with "
        "--teacher-gpus of a GPU) labels the stream and caches the labels in the run folder, so the teacher "
        "runs once per patch. trainer: each training worker runs the teacher on its own device (cuda with "
        "GPUs, else cpu) on each batch, train and hold-out, before using it: no actor pool, each worker takes "
        "a whole GPU, and no pseudo-label cache (the teacher labels every patch every epoch). The stream then "
        "carries the full-size patch beside the resized image (1024 -> 512: 3.75 MiB a record, against 1 MiB "
        "labelled; the actors' read tasks send the same 3 MiB patch to the actors); the worker labels the full "
        "patch and resizes the label as the actors do, so both placements train on pixel-identical labels. "
        "trainer needs a StarDist teacher, --teacher-backend torch and --mask-mode probability. On 2 CPUs "
        "(demo teacher) trainer was faster at 256 px; at 512 px it lost each cached epoch "
        "(benchmarks/RESULTS.md, Teacher placement)"
    ))  # fmt: skip
    teacher_mpp: float | None = field(
        default=None,
        metadata=_help(
            "pixel size (um/px) the teacher was trained at: patches are resampled to it, labelled, and the probability resampled back before Eq. 2; default: the teacher's own (its histokd_teacher.json; 2D_versatile_he: 0.25, 40x), else the patches' scale. Check with jobs/check_teacher.py"
        ),
    )
    teacher_normalization: Literal["joint", "per_channel"] | None = field(
        default=None,
        metadata=_help(
            "percentile normalisation the teacher was trained with: joint over the channels or per channel; default: the teacher's own (joint for 2D_versatile_he)"
        ),
    )
    teacher_settings: str | None = field(
        default=None,
        metadata=_help(
            "a histokd_teacher.json (jobs/check_teacher.py writes one): its alpha, normalization, percentiles and teacher_mpp replace --alpha, --teacher-normalization and --teacher-mpp"
        ),
    )
    empty_patch_share: float = field(
        default=0.005,
        metadata=_help(
            "a patch whose pseudo label has less than this share of nucleus pixels counts as empty"
        ),
    )
    empty_slide_fraction: float = field(
        default=0.9,
        metadata=_help(
            "warn, naming the slide, when more than this share of a slide's patches are empty (label_share.csv in the run folder has every slide)"
        ),
    )
    teacher_batch_size: int = field(
        default=8,
        metadata=_help(
            "patches per teacher call (in a teacher actor, or in a training worker with --teacher-placement trainer)"
        ),
    )
    teacher_actors: int | None = field(
        default=None,
        metadata=_help(
            "teacher actors in the pool; auto: one per GPU, or 1 on CPU (--teacher-placement actors only)"
        ),
    )
    teacher_gpus: float = field(
        default=0.5,
        metadata=_help(
            "GPU share of each teacher actor when the cluster has GPUs (fractional: the student shares the GPU); ignored with --teacher-placement trainer"
        ),
    )
    teacher_resources: dict[str, float] = field(
        default_factory=dict,
        metadata=_help(
            'custom Ray resources each teacher actor asks for, e.g. {"teacher_node": 1} to place the actors on nodes started with that resource; JSON on the command line (--teacher-placement actors only)'
        ),
    )
    # --- student (RCKD Sec. 2.2.1, 2.3) -------------------------------------------------------
    backbone: str = field(
        default="csat",
        metadata=_help(
            "student backbone: csat, csat_nosat, resnet18, resnet18_sat, efficientnet_b0, convnextv2_atto"
        ),
    )
    input_size: int = field(
        default=512,
        metadata=_help("patches are resized (bilinear) to this side for the student (RCKD: 512)"),
    )
    epochs: int = field(default=100, metadata=_help("training epochs (RCKD: 100)"))
    warmup_epochs: int = field(
        default=10, metadata=_help("linear warm-up from a learning rate of 0 (RCKD: 10 of 100)")
    )
    batch_size: int = field(
        default=64, metadata=_help("global batch size over all workers (RCKD: 64)")
    )
    lr: float = field(
        default=0.075,
        metadata=_help(
            "peak learning rate of LARS after warm-up; the paper gives none: 0.3 x batch/256, SimCLR's LARS rule"
        ),
    )
    weight_decay: float = field(
        default=1e-6, metadata=_help("LARS weight decay (SimCLR's setting; not stated in RCKD)")
    )
    momentum: float = field(default=0.9, metadata=_help("LARS momentum"))
    init: str | None = field(
        default=None,
        metadata=_help(
            "initial backbone weights: a backbone file (RCKD starts from ImageNet weights, USI); default: random"
        ),
    )
    # --- cluster -----------------------------------------------------------------------------
    trainer_resources: dict[str, float] = field(
        default_factory=dict,
        metadata=_help(
            'custom Ray resources each training worker asks for, e.g. {"trainer_node": 1}; JSON on the command line'
        ),
    )
    precision: Literal["auto", "fp32", "bf16"] = field(
        default="auto", metadata=_help("autocast precision; auto: bf16 on GPU, fp32 on CPU")
    )
    keep_checkpoints: int = field(
        default=3, metadata=_help("last N checkpoints kept (the best by hold-out IoU is kept too)")
    )
    dataloader_prefetch: int = field(default=2, metadata=_help("batches prefetched per worker"))
    overlays: int = field(
        default=8,
        metadata=_help("hold-out patches drawn in the teacher-vs-student overlay each epoch"),
    )
    stop_after_epoch: int | None = field(
        default=None,
        metadata=_help("stop cleanly after this epoch (resume later with the same run name)"),
    )
    fail_at_epoch: int | None = field(
        default=None,
        metadata=_help("test only: one worker raises once in this epoch", cli="hidden"),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.slides, str):
            self.slides = [self.slides]
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
        for name in ["magnification", "lr"]:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be positive")
        if self.base_magnification is not None and not self.base_magnification > 0:
            raise ValueError(
                f"base_magnification={self.base_magnification!r}: must be positive or unset"
            )
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
        if self.init is not None and not os.path.isfile(self.init):
            raise ValueError(f"init={self.init!r}: no such backbone file")
        self.demo_dir = os.path.abspath(self.demo_dir)

    def teacher_kwargs(self) -> dict:
        """The teacher's settings for :func:`histokd.teachers.build_teacher`.

        The patches' pixel size (``patch_mpp``, from ``magnification``: 20x is 0.5 um/px) lets
        a StarDist teacher resample them to its own scale; other teachers ignore it.
        """
        kwargs = {"alpha": self.alpha, "mask_mode": self.mask_mode, "backend": self.teacher_backend,
                  "patch_mpp": round(10.0 / self.magnification, 6)}  # fmt: skip
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
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{name}={value!r}: not JSON ({exc.msg}); give an object such as '{{\"trainer_node\": 1}}'"
            ) from exc
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
