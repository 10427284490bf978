"""The fine-tuning job's settings, with RCKD's defaults and where each comes from."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from histokd.cli import arg, check_ints, check_positive
from histokd.run import WorkerConfig, resolve_output_path

__all__ = ["AUGMENT_DEFAULT", "DEMO_PRESET", "PROTOCOLS", "FinetuneConfig", "resolve_init_label"]

# HED jitter is a switch away (`--augment ... hed`), not on by default: on the demo's region
# segmentation it cost mIoU 0.86 -> 0.66 in 10 epochs (tests/inference/test_demo_segmentation.py).
AUGMENT_DEFAULT = ("flip", "rot90", "brightness", "contrast", "saturation", "hue")


#: An initialisation's name in tables, by its kind (RCKD Table 3's words where it has them).
INIT_LABELS = {"random": "Random Weight", "backbone_file": "RCKD", "imagenet": "SPT on ImageNet",
               "timm": "timm weights", "hf-hub": "timm weights"}  # fmt: skip


def resolve_init_label(init: str, label: str | None) -> str:
    """The initialisation's name in tables, in the paper's words (Table 3)."""
    if label:
        return label
    from histokd.models.timm_weights import init_kind

    return INIT_LABELS[init_kind(init)]


@dataclass
class FinetuneConfig(WorkerConfig):
    """Fine-tuning on a downstream task (Kim et al. 2023, Sec. 2.2.2, Algorithm 2, Sec. 3.1).

    Defaults are the paper's. With no ``data`` the job uses the demo task (patches of synthetic
    slides, written on first use) and the demo preset's small sizes.

    Attributes:
        task: ``classification`` (a linear + softmax head) or ``segmentation`` (a U-Net
            decoder).
        init: ``random``, ``imagenet`` (timm's ImageNet weights from the Hugging Face Hub; not
            for CSAT), a weights file (RCKD pretraining writes ``STORAGE/RUN/backbone.pth``; a
            timm or Hub checkpoint; ``timm:FILE`` too) or ``hf-hub:ORG/NAME``
            (`histokd.models.timm_weights.parse_init`).
        magnification, patch_size: What the images were cut at: the magnification and the
            image side in pixels at it, recorded in the model file for whole-slide inference.
            Default: the dataset's ``dataset.json`` (docs/datasets.md); the patch size, else
            the images' common side.
        split_ratios: train:val:test without fixed lists (RCKD: 6:2:2); with a fixed test list,
            train:val is split by the first two (6:2 = 75:25); with fixed train and val lists
            but no test list, the test part (the third ratio of all samples) comes out of train.
        group_by: A CSV column (``patient``, ``slide``): each group's images go to one part of
            every split, stratified by class as far as whole groups allow
            (`histokd.finetune.splits.split_groups`).
        resize: How a non-square image becomes square before its resize to ``input_size``:
            ``squash`` (stretched), ``center-crop`` (the largest centred square) or ``pad``
            (white borders; mask borders are ``ignore_index``).
        num_workers: Ray Train workers of each split (DDP); 0: Ray Train's local mode, in the
            driver process, one split at a time (debugging, tests).
        augment: Training augmentations (`histokd.augment`), ``none`` for none; the default is
            the flips, rotations and colour jitter of earlier releases; HED jitter (`hed`) is a
            switch away.
        augment_device: ``cpu``: in the data loader, per image; ``device``: on the batch on the
            worker's device; ``auto``: the device on a GPU worker, else the CPU. Both give the
            same images for the same seed (each image's draws come from seed, epoch and index).
        stain_norm: ``macenko``: every image (training, validation, test, and whole-slide
            inference, which reads it from the model file) is stain-normalised to
            ``stain_reference`` before augmentation (`histokd.stain`).
        stain_reference: A reference tile; default: the reference implementation's H&E stain
            vectors and concentrations (`histokd.stain.DEFAULT_REFERENCE`).
    """

    # --- where ------------------------------------------------------------------------------
    data: str = arg("", "dataset folder or CSV (layouts: docs/datasets.md); empty: the demo task")
    task: Literal["classification", "segmentation"] = arg("classification", "linear head or U-Net")
    run_name: str = arg("finetune", "run name; a rerun skips finished splits, resumes the others")
    demo_dir: str = arg("demo_data/tasks", "where the demo tasks are written when no data is given")
    max_bad_fraction: float = arg(0.01, "largest share of samples with unreadable images to skip")
    # --- model (RCKD Sec. 2.2.2) ------------------------------------------------------------
    backbone: str = arg("csat", "csat[_nosat], resnet18[_sat], efficientnet_b0 or convnextv2_atto")
    init: str = arg("random", "random, imagenet, FILE (RCKD's backbone.pth) or hf-hub:ORG/NAME")
    init_label: str | None = arg(None, "table name; default: Random Weight, RCKD, SPT on ImageNet")
    magnification: float | None = arg(None, "magnification of the images; default: dataset.json's")
    patch_size: int | None = arg(None, "side in pixels at --magnification; default: dataset.json's")
    input_size: int = arg(384, "resized square side (RCKD Sec. 3.1: 384, best of {224, 384})")
    resize: Literal["squash", "center-crop", "pad"] = arg(
        "squash", "non-square images: squash, center-crop or pad (white) to a square first"
    )
    positional_encoding: Literal["frozen", "trained"] = arg("frozen", "CSAT's (RCKD: frozen best)")
    drop_rate: float = arg(0.0, "dropout before the linear classifier (not in RCKD)")
    # --- optimisation (RCKD Sec. 3.1, Eqs. 5 and 7) -----------------------------------------
    lr: float = arg(1e-4, "SGD learning rate (RCKD Sec. 3.1: 1e-4, best of {1e-3, 1e-4})")
    momentum: float = arg(0.9, "SGD momentum (not stated in RCKD)")
    weight_decay: float = arg(1e-4, "SGD weight decay (not stated in RCKD)")
    batch_size: int = arg(64, "global batch size over a split's workers (RCKD: 64)")
    epochs: int = arg(200, "most epochs (RCKD: 200)", aliases=["max_epochs"])
    patience: int = arg(20, "epochs without a lower validation loss before stopping (RCKD: 20)")
    min_delta: float = arg(0.0, "how much lower a validation loss must be to count as lower")
    focal_alpha: float = arg(0.25, "focal loss alpha, the same for every class (RCKD Eq. 5: 0.25)")
    focal_gamma: float = arg(2.0, "focal loss gamma (RCKD Eq. 5: 2)")
    augment: list[str] = arg(help="of training images: flip rot90 hed brightness contrast saturation hue, or none",
                             factory=lambda: list(AUGMENT_DEFAULT))  # fmt: skip
    augment_device: Literal["auto", "cpu", "device"] = arg(
        "auto", "augment in the loader (cpu) or the batch on the device; auto: device on GPU"
    )
    hed_sigma: float = arg(0.05, "HED jitter strength (Tellez et al. 2019: 0.05, 'HED-light')")
    color_jitter: float = arg(0.1, "brightness/contrast/saturation factors drawn from [1-x, 1+x]")
    hue_jitter: float = arg(0.02, "hue shift drawn from [-x, x] of the hue circle")
    stain_norm: Literal["none", "macenko"] = arg(
        "none", "stain normalisation of every image (Macenko 2009)"
    )
    stain_reference: str | None = arg(
        None, "reference tile of macenko; default: the usual reference stains"
    )
    # --- splits (RCKD Sec. 2.1.2, Algorithm 2) ----------------------------------------------
    num_splits: int = arg(5, "data splits, each trained and tested once (RCKD: N_fold = 5)")
    split_ratios: list[float] = arg(help="train, val, test (RCKD)", factory=lambda: [0.6, 0.2, 0.2])
    seed: int = arg(0, "training seed; split i trains with seed + i")
    split_seed: int = arg(0, "seed of the splits (split i uses SeedSequence([seed, i]))")
    group_by: str | None = arg(None, "CSV column (patient, slide) whose rows stay in one part")
    ignore_index: int = arg(255, "mask value of unlabelled pixels (segmentation)")
    cache_images: bool | None = arg(None, "keep resized images in RAM; auto: if they fit in 2 GiB")
    loader_workers: int = arg(0, "DataLoader processes per training worker")
    # --- evaluation -------------------------------------------------------------------------
    bootstrap_resamples: int = arg(10_000, "test-set bootstrap resamples for the 95%% interval")
    confidence: float = arg(0.95, "confidence level of the bootstrap interval")
    protocols: list[str] = arg(
        help="classification: finetune (the whole model), linear (logistic regression on frozen, "
        "pooled features, C chosen on validation), knn (k nearest, cosine, on the same features)",
        factory=lambda: ["finetune"],
    )
    label_fractions: list[float] = arg(
        help="shares of each split's training rows (stratified, seeded, the same for every arm); "
        "validation and test rows are never subsampled",
        factory=lambda: [1.0], aliases=["label_fraction"],
    )  # fmt: skip
    knn_k: int = arg(20, "neighbours of the knn protocol (eva, kaiko: 20)")
    # --- cluster ----------------------------------------------------------------------------
    num_workers: int = arg(1, "DDP workers per split; 0: local mode", aliases=["workers_per_split"])
    gpus_per_worker: float = arg(1.0, "GPU share of a worker; 0.2 puts five splits on one GPU")
    max_parallel_splits: int | None = arg(None, "splits at once; auto: all that the cluster holds")
    precision: Literal["auto", "fp32", "bf16"] = arg("auto", "autocast; auto: GPU bf16, else fp32")
    max_failures: int = arg(1, "worker-group restarts of a split from its last checkpoint")
    fail_at_epoch: int | None = arg(None, "test: fail once in this epoch, each split", hidden=True)
    mlflow_experiment: str = arg("histokd-finetune", "MLflow experiment name")
    register_model: str | None = arg(None, "MLflow model registry name of the logged model")

    def __post_init__(self) -> None:
        super().__post_init__()
        from histokd.tracking import check_registered_model_name

        check_registered_model_name(self.register_model)
        check_ints(
            self,
            [
                "input_size",
                "batch_size",
                "epochs",
                "patience",
                "num_splits",
                "bootstrap_resamples",
            ],
        )
        check_ints(
            self,
            ["num_workers", "loader_workers", "split_seed"],
            minimum=0,
        )
        check_ints(self, ["max_parallel_splits"], auto=True)
        check_positive(self, ["magnification"], example="20", auto="None (the dataset's)")
        check_ints(self, ["patch_size"], auto="None (the dataset's)")
        if self.input_size < 32:
            raise ValueError(
                f"input_size={self.input_size}: must be at least 32 (the backbones downsample by 32)"
            )
        if self.task not in ("classification", "segmentation"):
            raise ValueError(f"task={self.task!r}: allowed: classification, segmentation")
        if self.resize not in ("squash", "center-crop", "pad"):  # datasets.RESIZE_MODES
            raise ValueError(f"resize={self.resize!r}: allowed: squash, center-crop, pad")
        if self.group_by is not None and not str(self.group_by).strip():
            raise ValueError(f"group_by={self.group_by!r}: give a CSV column name, or leave it out")
        if self.positional_encoding not in ("frozen", "trained"):
            raise ValueError(
                f"positional_encoding={self.positional_encoding!r}: allowed: frozen, trained"
            )
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision={self.precision!r}: allowed: auto, fp32, bf16")
        check_positive(self, ["lr"])
        if not 0 <= self.momentum < 1 or not self.weight_decay >= 0:
            raise ValueError(
                f"momentum={self.momentum!r}, weight_decay={self.weight_decay!r}: need 0 <= momentum < 1 and weight_decay >= 0"
            )
        if not self.focal_alpha > 0 or not self.focal_gamma >= 0:
            raise ValueError(
                f"focal_alpha={self.focal_alpha!r}, focal_gamma={self.focal_gamma!r}: need alpha > 0 and gamma >= 0 (RCKD: 0.25, 2)"
            )
        if not 0 <= self.drop_rate < 1 or not self.min_delta >= 0:
            raise ValueError(
                f"drop_rate={self.drop_rate!r}, min_delta={self.min_delta!r}: need 0 <= drop_rate < 1 and min_delta >= 0"
            )
        from histokd.augment import check_augment, check_strengths

        self.augment = check_augment(self.augment, AUGMENT_DEFAULT)
        check_strengths(self)
        _check_stain_norm(self.stain_norm, self.stain_reference)
        self.split_ratios = [float(r) for r in self.split_ratios]
        if (
            len(self.split_ratios) != 3
            or any(r < 0 for r in self.split_ratios)
            or self.split_ratios[0] <= 0
            or self.split_ratios[1] <= 0
        ):
            raise ValueError(
                f"split_ratios={self.split_ratios!r}: need 3 ratios train val test with train, val > 0 (RCKD: 0.6 0.2 0.2)"
            )
        _check_protocols(self)
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence={self.confidence!r}: must be in (0, 1)")
        bad = self.max_bad_fraction
        if type(bad) not in (int, float) or not 0 <= bad <= 1:
            raise ValueError(f"max_bad_fraction={bad!r}: must be in [0, 1] (default 0.01: 1 %)")
        if not 0 < self.gpus_per_worker <= 1:
            raise ValueError(f"gpus_per_worker={self.gpus_per_worker!r}: must be in (0, 1]")
        from histokd.models import BACKBONES

        if self.backbone not in BACKBONES:
            raise ValueError(
                f"backbone={self.backbone!r}: unknown; allowed: {', '.join(BACKBONES)}"
            )
        from histokd.models.timm_weights import check_init

        self.init = check_init(self.init, self.backbone)  # Hub weights: cached or fetched now
        if self.data:
            if not os.path.exists(self.data):
                raise ValueError(f"data={self.data!r}: no such folder or CSV file")
            self.data = os.path.abspath(self.data)
        self.demo_dir = resolve_output_path(self.demo_dir, "demo_dir")

    @property
    def init_name(self) -> str:
        """The initialisation's name in tables."""
        return resolve_init_label(self.init, self.init_label)


#: What `FinetuneConfig.protocols` allows (`histokd.finetune.probe` for linear and knn).
PROTOCOLS = ("finetune", "linear", "knn")


def _check_protocols(config: FinetuneConfig) -> None:
    """Known protocols, each once; fractions in (0, 1]; only fine-tuning for segmentation."""
    from histokd.finetune.splits import check_label_fraction

    protocols = [str(p) for p in config.protocols]
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols or len(set(protocols)) != len(protocols):
        raise ValueError(
            f"protocols={protocols!r}: allowed: one or more of {', '.join(PROTOCOLS)}, each once"
        )
    if config.task == "segmentation" and protocols != ["finetune"]:
        raise ValueError(
            f"protocols={protocols!r}: a segmentation task allows only finetune (linear and knn are for classification)"
        )
    fractions = [check_label_fraction(f) for f in config.label_fractions]
    if not fractions or len(set(fractions)) != len(fractions):
        raise ValueError(
            f"label_fractions={config.label_fractions!r}: give one or more distinct numbers in (0, 1]"
        )
    if config.task == "segmentation" and fractions != [1.0]:
        raise ValueError(
            f"label_fractions={fractions!r}: a segmentation task allows only 1.0 (label fractions are stratified by class)"
        )
    if isinstance(config.knn_k, bool) or not isinstance(config.knn_k, int) or config.knn_k < 1:
        raise ValueError(f"knn_k={config.knn_k!r}: must be a positive integer (default 20)")
    config.protocols, config.label_fractions = protocols, sorted(fractions)


def refuse_register_model(config: FinetuneConfig, job: str) -> None:
    """A search or comparison runs many fine-tunings: registering each would pile their models
    up as versions of one name.

    Raises:
        ValueError: ``register_model`` is set, naming it and what to do instead.
    """
    if config.register_model:
        raise ValueError(
            f"register_model={config.register_model!r}: a {job} would register every run's model "
            "as a new version of one name; register the one you choose afterwards "
            "(jobs/finetune.py --register-model NAME, or mlflow.register_model on its runs:/ URI)"
        )


def _check_stain_norm(method: str, reference: str | None) -> None:
    """A known method, and a reference tile only for Macenko, which must exist."""
    if method not in ("none", "macenko"):
        raise ValueError(f"stain_norm={method!r}: allowed: none, macenko")
    if reference is not None and method != "macenko":
        raise ValueError(
            f"stain_reference={reference!r} is for stain_norm='macenko', not {method!r}; give --stain-norm macenko or drop it"
        )
    if reference is not None and not os.path.isfile(os.path.expanduser(reference)):
        raise ValueError(f"stain_reference={reference!r}: no such image file")


# Small enough to run end to end offline on a 2-core CPU in minutes: 256 px patches at 20x from
# synthetic slides, resized to 96 px, a few dozen epochs with a higher learning rate than the
# paper's (random and RCKD initialisations alike need it at this size).
DEMO_PRESET: dict = {
    "input_size": 96,
    "batch_size": 32,
    "epochs": 40,
    "patience": 8,
    "lr": 0.01,
    "bootstrap_resamples": 2000,
}
