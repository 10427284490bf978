"""Train a StarDist2D teacher on images with instance masks, on the CPU or a GPU.

Training data come from two kinds of source, used together:

* folders in the MoNuSeg-like layout (see :func:`load_instance_folder`): RGB images and, for
  each, an instance mask (0 = background, 1..n = nuclei) or MoNuSeg's XML annotations;
* the synthetic demo slides (:mod:`histokd.demos.synthetic`), tiled, with their exact nuclei masks.

Every image is brought to one magnification (the stream's, 20x as RCKD Sec. 2.1.1) so the
teacher sees nuclei at the size it will label them. One source (an image or a slide) in
``validation_fraction`` is held out; on it StarDist optimises its NMS thresholds and histokd
picks the teacher's default alpha (RCKD Eq. 2) as the one with the best pseudo-mask IoU,
written with the numbers to ``histokd_teacher.json`` beside the weights.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from histokd.cli import arg
from histokd.run import RunFolderConfig, take_legacy_device
from histokd.teachers.base import TeacherError
from histokd.teachers.quality import binary_iou, iou_by_alpha
from histokd.teachers.stardist_models import DEFAULTS_FILE

__all__ = [
    "IMAGE_EXTENSIONS",
    "InstanceImage",
    "TeacherTrainingConfig",
    "TeacherTrainingResult",
    "demo_slide_images",
    "load_image_mask_pairs",
    "load_instance_folder",
    "read_monuseg_xml",
    "train_teacher",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
MASK_EXTENSIONS = (".tif", ".tiff", ".png", ".npy")
ALPHA_CANDIDATES = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
NMS_TILES = 6  # held-out tiles StarDist's threshold optimisation runs NMS on


@dataclass
class InstanceImage:
    """One training image with its nuclei instances.

    Attributes:
        image: RGB uint8 (H, W, 3) at the training magnification.
        labels: int32 (H, W): 0 background, 1..n nuclei.
        source: Image file or slide it came from (the unit of the validation split).
    """

    image: np.ndarray
    labels: np.ndarray
    source: str


# -- data ----------------------------------------------------------------------------------
def read_monuseg_xml(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise MoNuSeg 2018 XML annotations (one ``Region`` of ``Vertex`` X/Y per nucleus).

    Args:
        path: The ``.xml`` file.
        shape: (H, W) of its image.

    Returns:
        int32 instance labels; where polygons overlap, the later one wins.

    Raises:
        TeacherError: The XML cannot be parsed or holds no regions.
    """
    from skimage.draw import polygon

    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise TeacherError(f"{path}: not a readable MoNuSeg XML annotation file: {exc}") from exc
    labels = np.zeros(shape, np.int32)
    regions = root.iter("Region")
    count = 0
    for region in regions:
        vertices = [(float(v.get("Y")), float(v.get("X"))) for v in region.iter("Vertex")]
        if len(vertices) < 3:
            continue
        rows, cols = np.asarray(vertices).T
        rr, cc = polygon(rows, cols, shape)
        count += 1
        labels[rr, cc] = count
    if count == 0:
        raise TeacherError(
            f"{path}: no Region with at least 3 Vertex elements (MoNuSeg XML expected)"
        )
    return labels


def _rescale(image: np.ndarray, labels: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Image bilinear and labels nearest, by ``factor`` (0.5 takes 40x to 20x)."""
    if math.isclose(factor, 1.0, rel_tol=1e-3):
        return image, labels
    height, width = labels.shape
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    rows = ((np.arange(size[1]) + 0.5) / factor).astype(np.int64).clip(0, height - 1)
    cols = ((np.arange(size[0]) + 0.5) / factor).astype(np.int64).clip(0, width - 1)
    return image, labels[rows[:, None], cols[None, :]]


def _read_rgb(path: Path) -> np.ndarray:
    try:
        import tifffile

        if path.suffix.lower() in (".tif", ".tiff"):
            image = tifffile.imread(path)
        else:
            image = np.asarray(Image.open(path))
    except Exception as exc:  # noqa: BLE001 - PIL and tifffile raise many kinds
        raise TeacherError(f"{path}: cannot read the image: {exc}") from exc
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise TeacherError(f"{path}: image of shape {image.shape}; expected RGB (H, W, 3) or RGBA")
    if image.dtype != np.uint8:
        raise TeacherError(f"{path}: image of dtype {image.dtype}; expected 8-bit RGB")
    return np.ascontiguousarray(image[..., :3])


def _read_mask(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        labels = np.load(path)
    elif path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        labels = tifffile.imread(path)
    else:
        labels = np.asarray(Image.open(path))
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise TeacherError(
            f"{path}: mask of shape {labels.shape} and dtype {labels.dtype}; expected a 2-D integer "
            "instance mask (0 = background, 1..n = nuclei)"
        )
    return labels.astype(np.int32)


def load_instance_folder(
    folder: str | os.PathLike, data_magnification: float = 40.0, magnification: float = 20.0
) -> list[InstanceImage]:
    """Images and instance masks from a MoNuSeg-like folder.

    Accepted layouts (file stems pair an image with its mask)::

        folder/images/<stem>.tif|png|jpg     RGB images
        folder/masks/<stem>.tif|png|npy      instance masks, 0 = background, 1..n = nuclei

        folder/Tissue Images/<stem>.tif      MoNuSeg 2018 as distributed
        folder/Annotations/<stem>.xml        its polygon annotations

    Args:
        folder: The dataset folder.
        data_magnification: Magnification of the images (MoNuSeg and TNBC: 40x).
        magnification: Magnification to train at; images are resized by
            ``magnification / data_magnification``.

    Raises:
        TeacherError: The folder has neither layout, an image has no mask, or a file is bad.
    """
    folder = Path(folder)
    image_dir = next(
        (folder / d for d in ("images", "Tissue Images") if (folder / d).is_dir()), None
    )
    mask_dirs = [
        folder / d
        for d in ("masks", "labels", "Annotations", "annotations")
        if (folder / d).is_dir()
    ]
    if image_dir is None or not mask_dirs:
        raise TeacherError(
            f"{folder}: not a MoNuSeg-like dataset; expected images/ with masks/ (instance masks), "
            "or 'Tissue Images/' with Annotations/ (MoNuSeg XML)"
        )
    return load_image_mask_pairs(image_dir, mask_dirs, magnification / data_magnification)


def load_image_mask_pairs(
    image_dir: str | os.PathLike, mask_dirs: list[Path] | Path, factor: float = 1.0
) -> list[InstanceImage]:
    """Images and their nuclei masks, paired by file stem (``<stem>.png`` with ``<stem>.tif``).

    Masks are instance labels (0 = background, 1..n = nuclei), binary masks (any value > 0 is
    nucleus) or MoNuSeg XML.

    Args:
        image_dir: RGB images (tif, png, jpg, bmp).
        mask_dirs: Folder(s) searched, in order, for each image's mask (tif, png, npy, xml).
        factor: Resize both by this (0.5 takes 40x to 20x; labels nearest).

    Raises:
        TeacherError: No images, an image without a mask, a size mismatch or an unreadable file.
    """
    image_dir = Path(image_dir)
    mask_dirs = (
        [Path(mask_dirs)]
        if isinstance(mask_dirs, (str, os.PathLike))
        else [Path(d) for d in mask_dirs]
    )
    if not image_dir.is_dir():
        raise TeacherError(f"{image_dir}: no such image folder")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise TeacherError(f"{image_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    out = []
    for path in images:
        image = _read_rgb(path)
        labels = None
        for mask_dir in mask_dirs:
            for ext in (*MASK_EXTENSIONS, ".xml"):
                candidate = mask_dir / f"{path.stem}{ext}"
                if candidate.is_file():
                    labels = (
                        read_monuseg_xml(candidate, image.shape[:2])
                        if ext == ".xml"
                        else _read_mask(candidate)
                    )
                    break
            if labels is not None:
                break
        if labels is None:
            raise TeacherError(
                f"{path}: no mask named {path.stem}.(tif|tiff|png|npy|xml) in "
                f"{', '.join(str(d) for d in mask_dirs)}"
            )
        if labels.shape != image.shape[:2]:
            raise TeacherError(
                f"{path}: mask shape {labels.shape} differs from image shape {image.shape[:2]}"
            )
        image, labels = _rescale(image, labels, factor)
        out.append(InstanceImage(image, labels, str(path)))
    return out


def demo_slide_images(
    slides, magnification: float = 20.0, tile_size: int = 512, min_nuclei: int = 1
) -> list[InstanceImage]:
    """Tiles of demo slides with their true nuclei, read as the stream reads patches.

    Args:
        slides: :class:`histokd.demos.synthetic.DemoSlide` objects.
        magnification: Magnification of the tiles (the slide reader resizes to it).
        tile_size: Tile side in pixels at ``magnification``.
        min_nuclei: Tiles with fewer nuclei are skipped (glass).
    """
    from histokd.slides import SlideReader

    out = []
    for slide in slides:
        with SlideReader(slide.slide_path) as reader:
            extent = round(tile_size * reader.downsample_for(magnification))
            width, height = reader.info.dimensions
            for y in range(0, height - extent + 1, extent):
                for x in range(0, width - extent + 1, extent):
                    labels = slide.read_truth(x, y, extent, extent, size=(tile_size, tile_size))
                    if len(np.unique(labels)) - 1 < min_nuclei:
                        continue
                    image = reader.read_region(x, y, tile_size, magnification)
                    out.append(InstanceImage(image, labels.astype(np.int32), str(slide.slide_path)))
    return out


# -- configuration --------------------------------------------------------------------------
@dataclass
class TeacherTrainingConfig(RunFolderConfig):
    """How to train a StarDist2D teacher.

    The defaults make the shipped demo teacher (``histokd/assets/demo_teacher``): a StarDist2D
    of the ``2D_versatile_he`` shape (32 rays, grid 2, U-Net depth 3) with half its filters,
    trained for about three minutes on two CPU cores.

    Attributes:
        storage_path: Parent folder of the model folder.
        run_name: Model folder name.
        data: MoNuSeg-like dataset folders (see :func:`load_instance_folder`): ``images/`` +
            ``masks/`` (instance masks), or ``Tissue Images/`` + ``Annotations/`` (MoNuSeg XML).
        data_magnification: Magnification of the images in ``data`` (MoNuSeg: 40x).
        demo_slides: Number of synthetic demo slides to train on (0: none).
        demo_seed: Seed of the demo slides (the tests hold out other seeds).
        demo_slide_size: Width and height of each demo slide in pixels.
        demo_dir: Where the demo slides are written; ``<storage_path>/demo_slides`` when None.
        magnification: Magnification of the training tiles, the stream's (RCKD Sec. 2.1.1:
            20x); the teacher's scale, stored as ``teacher_mpp = 10 / magnification``.
        normalization: The percentile normalisation (1, 99.8) of each training image: ``joint``
            over the three channels (StarDist's H&E example) or ``per_channel``; stored with the
            teacher, which labels the same way.
        tile_size: Side of the tiles cut from demo slides.
        patch_size: StarDist's random training patch side (a multiple of 16).
        n_rays: StarDist rays (2D_versatile_he: 32).
        grid: Output subsampling of StarDist's heads (2D_versatile_he: 2).
        unet_n_depth: U-Net depth (2D_versatile_he: 3).
        unet_n_filter_base: Filters of the first U-Net level (2D_versatile_he: 32).
        net_conv_after_unet: Filters of the conv after the U-Net (2D_versatile_he: 128).
        epochs: Training epochs.
        steps_per_epoch: Batches per epoch.
        batch_size: Patches per batch.
        lr: Adam learning rate (StarDist's default, 3e-4).
        validation_fraction: Fraction of sources (images or slides) held out, at least one.
        optimize_nms: Optimise StarDist's probability/NMS thresholds on the held-out data
            (used by ``mask_mode="instances"``).
        use_gpu: False hides GPUs from TensorFlow; True requires one; None: auto.
        seed: Seed of sampling, augmentation and initial weights.
        keep_checkpoints: Keep ``weights_last.h5``/``weights_now.h5`` besides ``weights_best.h5``.
        overwrite: Replace an existing model folder.
    """

    storage_path: str = arg("runs/teacher", "parent of the model folder", aliases=["out_dir"])
    run_name: str = arg("demo_teacher", "model folder name: STORAGE/RUN_NAME", aliases=["name"])
    data: tuple[str, ...] = arg((), "folders: images/ + masks/, or 'Tissue Images/' + Annotations/")
    data_magnification: float = arg(40.0, "magnification of --data images (MoNuSeg 2018, TNBC: 40)")
    demo_slides: int = arg(4, "synthetic slides to train on (0: none); one in four is held out")
    demo_seed: int = arg(0, "seed of the demo slides (tests hold out other seeds)")
    demo_slide_size: int = arg(2048, "width and height of each demo slide in pixels")
    demo_dir: str | None = arg(None, "where demo slides are written; default STORAGE/demo_slides")
    magnification: float = arg(20.0, "of the tiles (RCKD: 20); stored as teacher_mpp = 10 / it")
    normalization: Literal["joint", "per_channel"] = arg("joint", "percentiles 1, 99.8; stored too")
    tile_size: int = arg(512, "side of the tiles cut from demo slides")
    patch_size: int = arg(128, "StarDist's random training patch side (multiple of grid*2**depth)")
    n_rays: int = arg(32, "StarDist rays (2D_versatile_he: 32)")
    grid: int = arg(2, "output subsampling of the heads (2D_versatile_he: 2)")
    unet_n_depth: int = arg(3, "U-Net depth (2D_versatile_he: 3)")
    unet_n_filter_base: int = arg(16, "filters of the first U-Net level (2D_versatile_he: 32)")
    net_conv_after_unet: int = arg(64, "filters of the conv after the U-Net (2D_versatile_he: 128)")
    epochs: int = arg(20, "training epochs")
    steps_per_epoch: int = arg(50, "batches per epoch")
    batch_size: int = arg(8, "patches per batch")
    lr: float = arg(3e-4, "Adam learning rate (StarDist's default)", aliases=["learning_rate"])
    validation_fraction: float = arg(0.25, "share of slides or images held out, at least one")
    optimize_nms: bool = arg(True, "tune StarDist's probability/NMS thresholds on held-out data")
    use_gpu: bool | None = arg(None, "train on a GPU (then required); no: hide GPUs; auto: if any")
    keep_checkpoints: bool = arg(False, "also keep weights_last.h5 and weights_now.h5")
    overwrite: bool = arg(False, "replace an existing model folder")
    command: list[str] = field(default_factory=list, repr=False, metadata={"cli": False})
    device: str | None = arg(None, "deprecated", hidden=True)

    def __post_init__(self) -> None:
        take_legacy_device(self, self.device)
        self.device = None
        super().__post_init__()
        self.data = tuple(str(d) for d in self.data)
        positive = ("tile_size", "patch_size", "n_rays", "grid", "unet_n_depth", "unet_n_filter_base",
                    "net_conv_after_unet", "epochs", "steps_per_epoch", "batch_size", "demo_slide_size")  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise TeacherError(
                    f"TeacherTrainingConfig.{name}={value!r}: must be a positive integer"
                )
        if self.patch_size % (self.grid * 2**self.unet_n_depth):
            raise TeacherError(
                f"TeacherTrainingConfig.patch_size={self.patch_size}: must be a multiple of "
                f"grid * 2**unet_n_depth = {self.grid * 2**self.unet_n_depth}"
            )
        if self.patch_size > self.tile_size:
            raise TeacherError(
                f"TeacherTrainingConfig.patch_size={self.patch_size}: must be at most tile_size={self.tile_size}"
            )
        if not isinstance(self.demo_slides, int) or self.demo_slides < 0:
            raise TeacherError(
                f"TeacherTrainingConfig.demo_slides={self.demo_slides!r}: must be an integer >= 0"
            )
        if self.demo_slides == 0 and not self.data:
            raise TeacherError(
                "TeacherTrainingConfig: no training data; give data folders or demo_slides > 0"
            )
        if self.demo_slides == 1 and not self.data:
            raise TeacherError(
                "TeacherTrainingConfig.demo_slides=1: need at least 2 sources (one is held out for validation)"
            )
        if self.normalization not in ("joint", "per_channel"):
            raise TeacherError(
                f"TeacherTrainingConfig.normalization={self.normalization!r}: allowed: joint, per_channel"
            )
        for name in ("magnification", "data_magnification", "lr"):
            if not getattr(self, name) > 0:
                raise TeacherError(
                    f"TeacherTrainingConfig.{name}={getattr(self, name)!r}: must be positive"
                )
        if not 0 < self.validation_fraction < 1:
            raise TeacherError(
                f"TeacherTrainingConfig.validation_fraction={self.validation_fraction!r}: must be in (0, 1)"
            )


@dataclass
class TeacherTrainingResult:
    """What training made.

    Attributes:
        model_dir: The StarDist model folder (config, thresholds, weights, defaults).
        alpha: Default alpha chosen on the held-out data.
        validation_iou: Pooled IoU of ``probability >= alpha`` per alpha on the held-out data.
        validation_iou_instances: Pooled IoU of ``predict_instances`` labels > 0.
        seconds: Wall time of training alone.
        num_train: Training images; ``num_validation``: held-out images.
    """

    model_dir: Path
    alpha: float
    validation_iou: dict[float, float]
    validation_iou_instances: float
    seconds: float
    num_train: int
    num_validation: int


# -- training -------------------------------------------------------------------------------
def _split(
    items: list[InstanceImage], fraction: float, seed: int
) -> tuple[list[InstanceImage], list[InstanceImage]]:
    """Hold out whole sources (slides or images), at least one.

    Tiles of one slide never sit on both sides of the split.
    """
    sources = sorted({item.source for item in items})
    rng = np.random.default_rng(seed)
    if len(sources) >= 2:
        n_val = min(len(sources) - 1, max(1, round(fraction * len(sources))))
        held = set(rng.permutation(sources)[:n_val].tolist())
        train = [i for i in items if i.source not in held]
        val = [i for i in items if i.source in held]
    else:
        order = rng.permutation(len(items))
        n_val = max(1, round(fraction * len(items)))
        val = [items[i] for i in order[:n_val]]
        train = [items[i] for i in order[n_val:]]
    if not train or not val:
        raise TeacherError(
            f"cannot split {len(items)} training images into train and validation; give more data"
        )
    return train, val


def _augmenter(seed: int):
    """Flips, right-angle rotations and a mild per-channel stain change (on normalised input)."""
    rng = np.random.default_rng(seed)

    def augment(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = int(rng.integers(4))
        x, y = np.rot90(x, k, axes=(0, 1)), np.rot90(y, k, axes=(0, 1))
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[:, ::-1]
        scale = rng.uniform(0.85, 1.15, size=(1, 1, 3)).astype(np.float32)
        shift = rng.uniform(-0.08, 0.08, size=(1, 1, 3)).astype(np.float32)
        return np.ascontiguousarray(x * scale + shift), np.ascontiguousarray(y)

    return augment


def _set_device(use_gpu: bool | None):
    from histokd.teachers.stardist_teacher import configure_tensorflow

    tf = configure_tensorflow()
    gpus = tf.config.list_physical_devices("GPU")
    if use_gpu is False and gpus:
        tf.config.set_visible_devices([], "GPU")
    if use_gpu and not gpus:
        raise TeacherError(
            "use_gpu=True but TensorFlow sees no GPU (install histokd[tf-gpu] on a CUDA machine)"
        )
    return tf


def train_teacher(config: TeacherTrainingConfig) -> TeacherTrainingResult:
    """Train a StarDist2D teacher and write a complete model folder.

    The folder loads with ``build_teacher(<folder>)`` (or ``"demo"`` once copied to
    ``histokd/assets/demo_teacher``) and holds ``config.json``, ``thresholds.json``,
    ``weights_best.h5`` and ``histokd_teacher.json`` (default alpha, validation IoU per alpha,
    the training settings and the command that made it).

    Raises:
        TeacherError: Bad data, or the model folder exists and ``overwrite`` is False.
    """
    import torch

    from histokd.teachers.stardist_base import normalize_percentiles
    from histokd.teachers.stardist_teacher import StarDistTeacher

    out_dir = Path(config.storage_path)
    model_dir = out_dir / config.run_name
    # the job's own log (logs/driver.log) may already be there: only a model counts
    existing = [p for p in model_dir.iterdir() if p.name != "logs"] if model_dir.is_dir() else []
    if existing:
        if not config.overwrite:
            raise TeacherError(
                f"{model_dir}: model folder exists; pass overwrite=True (--overwrite) to replace it"
            )
        for path in existing:
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    items: list[InstanceImage] = []
    for folder in config.data:
        items += load_instance_folder(folder, config.data_magnification, config.magnification)
    if config.demo_slides:
        from histokd.demos.synthetic import make_demo_slides

        demo_dir = Path(config.demo_dir) if config.demo_dir else out_dir / "demo_slides"
        slides = make_demo_slides(
            demo_dir, n=config.demo_slides, seed=config.demo_seed,
            width=config.demo_slide_size, height=config.demo_slide_size,
        )  # fmt: skip
        items += demo_slide_images(slides, config.magnification, config.tile_size)
    from stardist import fill_label_holes

    for item in items:
        item.labels = fill_label_holes(item.labels)
    train, val = _split(items, config.validation_fraction, config.seed)
    log.info("teacher training: %d train and %d validation images", len(train), len(val))

    tf = _set_device(config.use_gpu)
    import keras

    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    from stardist.models import Config2D, StarDist2D

    conf = Config2D(
        n_rays=config.n_rays,
        grid=(config.grid, config.grid),
        n_channel_in=3,
        unet_n_depth=config.unet_n_depth,
        unet_n_filter_base=config.unet_n_filter_base,
        net_conv_after_unet=config.net_conv_after_unet,
        train_patch_size=(config.patch_size, config.patch_size),
        train_batch_size=config.batch_size,
        train_epochs=config.epochs,
        train_steps_per_epoch=config.steps_per_epoch,
        train_learning_rate=config.lr,
        train_tensorboard=False,  # tensorboard is not installed
        use_gpu=False,  # gputools (OpenCL) data generation, not TensorFlow's device
    )
    model = StarDist2D(conf, name=config.run_name, basedir=str(out_dir))
    per_channel = config.normalization == "per_channel"

    def normalize(image: np.ndarray) -> np.ndarray:  # as the teacher will: stardist_base
        return normalize_percentiles(torch.from_numpy(image[None]), per_channel=per_channel)[
            0
        ].numpy()

    x_train = [normalize(i.image) for i in train]
    x_val = [normalize(i.image) for i in val]
    started = time.monotonic()
    model.train(
        x_train, [i.labels for i in train], validation_data=(x_val, [i.labels for i in val]),
        augmenter=_augmenter(config.seed), seed=config.seed,
    )  # fmt: skip
    seconds = time.monotonic() - started
    if config.optimize_nms:
        # NMS at every candidate threshold is the slow part: a few held-out tiles suffice.
        few = slice(0, NMS_TILES)
        with contextlib.redirect_stderr(io.StringIO()):  # tqdm bars
            model.optimize_thresholds(
                x_val[few], [i.labels for i in val][few], nms_threshs=[0.3, 0.4, 0.5],
                predict_kwargs={"show_tile_progress": False}, optimize_kwargs={"verbose": False, "maxiter": 12},
            )  # fmt: skip
    else:  # a complete folder all the same: StarDist's default thresholds
        thresholds = {"prob": float(model.thresholds.prob), "nms": float(model.thresholds.nms)}
        (model_dir / "thresholds.json").write_text(json.dumps(thresholds))

    teacher_mpp = round(10.0 / config.magnification, 4)  # the pixel size it was trained at
    teacher = StarDistTeacher(model, source=str(model_dir), normalization=config.normalization)
    val_images = (
        np.stack([i.image for i in val]) if len({i.image.shape for i in val}) == 1 else None
    )
    truth = [i.labels > 0 for i in val]
    if val_images is not None:
        probability = list(teacher.probability(val_images))
        instances = list(teacher.instance_labels(val_images))
    else:
        probability = [teacher.probability(i.image[None])[0] for i in val]
        instances = [teacher.instance_labels(i.image[None])[0] for i in val]
    flat_prob = np.concatenate([p.ravel() for p in probability])
    flat_truth = np.concatenate([t.ravel() for t in truth])
    ious = iou_by_alpha(flat_prob, flat_truth, ALPHA_CANDIDATES)
    iou_instances = binary_iou(np.concatenate([(i > 0).ravel() for i in instances]), flat_truth)
    alpha = max(ious, key=lambda a: (round(ious[a], 3), a))  # best IoU; ties: the larger alpha

    if not config.keep_checkpoints:
        for extra in ("weights_last.h5", "weights_now.h5"):
            (model_dir / extra).unlink(missing_ok=True)
    import stardist
    import tensorflow

    from histokd.demos.synthetic import GENERATOR_VERSION

    defaults = {
        "alpha": alpha,
        "mask_mode": "probability",
        "normalization": config.normalization,
        "percentiles": list(teacher.percentiles),
        "teacher_mpp": teacher_mpp,
        "chosen_by": "best pooled IoU of probability >= alpha against the true nuclei of the held-out data",
        "validation_iou_by_alpha": {f"{a:g}": round(v, 4) for a, v in ious.items()},
        "validation_iou_instances": round(iou_instances, 4),
        "num_train_images": len(train),
        "num_validation_images": len(val),
        "validation_sources": sorted({i.source for i in val}),
        "train_seconds": round(seconds, 1),
        "training": {k: v for k, v in asdict(config).items() if k != "command"},
        "command": config.command or sys.argv,
        "versions": {
            "stardist": stardist.__version__,
            "tensorflow": tensorflow.__version__,
            "demo_slide_generator": GENERATOR_VERSION,
        },
    }
    (model_dir / DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2, default=str) + "\n")
    log.info(
        "teacher %s: alpha=%g, validation IoU %s",
        model_dir,
        alpha,
        defaults["validation_iou_by_alpha"],
    )
    return TeacherTrainingResult(
        model_dir, alpha, ious, iou_instances, seconds, len(train), len(val)
    )
