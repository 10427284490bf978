"""Fine-tuned task models from the fine-tuning job's ``best_model.pt``, rebuilt from their config.

The fine-tuning job (`histokd.finetune.loop`) saves, for each split,
``{"model": state_dict, "best_epoch": int, "config": dict}``, where the config is the resolved
`FinetuneConfig` plus what the driver added (``num_classes``, ``class_names``, ...). That is
enough to rebuild the network: ``task``, ``backbone``, ``num_classes`` and ``input_size``.
What a slide needs besides is the magnification and the side in pixels the training images had
at that magnification. The fine-tuning job records both when it knows them (``--magnification``,
``--patch-size`` or the dataset's ``dataset.json``; the side also from the images themselves);
`TaskModelInfo.resolve` fills what a file lacks from the caller, and a value given there wins.
Resolution-distillation classifiers (`histokd.resdist`) are saved the same way, with ``resdist``
(how to rebuild the network) and the input ``mean`` and ``std`` of their training set.

Only plain tensors and Python values are read (``torch.load(..., weights_only=True)``), and the
network is built from its name with random weights before the state is loaded strictly, so
neither the backbone file the model was initialised from nor timm weights need to exist here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a model is built: the read tasks never need it
    import torch
    from torch import nn

__all__ = [
    "ModelFileError",
    "TaskModelInfo",
    "build_model",
    "describe_checkpoint",
    "find_best_model",
    "load_checkpoint",
    "load_task_model",
]

log = logging.getLogger(__name__)

BEST_MODEL_FILE = "best_model.pt"  # histokd.finetune.loop.BEST_MODEL_FILE
_TASKS = ("classification", "segmentation")


class ModelFileError(ValueError):
    """A model file that cannot be used, with the file and the reason in the message."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class TaskModelInfo:
    """What a fine-tuned model is and what its inputs must look like.

    Attributes:
        path: The model file.
        task: ``classification`` or ``segmentation``.
        backbone: Backbone name (one of `histokd.models.BACKBONES`).
        num_classes: Output classes.
        class_names: Name of each class, index order.
        input_size: Side of the square network input in pixels.
        magnification: Magnification of the training images; None where the file lacks it.
        patch_size: Side in pixels of a training image at ``magnification``, before it was
            resized to ``input_size``; None where the file lacks it.
        best_epoch: The epoch whose weights were kept.
        drop_rate: Dropout of the classifier (no effect at inference, kept for rebuilding).
        mean: Per-channel input mean in [0, 1] (None: ImageNet's).
        std: Per-channel input standard deviation (None: ImageNet's).
        resdist: A resolution-distillation network (`histokd.resdist.model`): its
            ``num_groups`` and ``hint_channels``; None for the fine-tuning job's models.
        stain_normalization: The stain normalisation the training images had
            (`histokd.stain.stain_normalization`'s record; ``--stain-norm`` of fine-tuning),
            which tiles get before the model too; None for none.
    """

    path: str
    task: str
    backbone: str
    num_classes: int
    class_names: tuple[str, ...]
    input_size: int
    magnification: float | None = None
    patch_size: int | None = None
    best_epoch: int | None = None
    drop_rate: float = 0.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resdist: dict[str, Any] | None = None
    stain_normalization: dict[str, Any] | None = None

    @property
    def read_magnification(self) -> float:
        """Magnification at which an ``input_size`` read covers one training image's field."""
        if self.magnification is None or self.patch_size is None:
            raise ModelFileError(
                self.path, "magnification and patch_size are unresolved; call resolve() first"
            )
        return self.magnification * self.input_size / self.patch_size

    def resolve(
        self,
        magnification: float | None = None,
        patch_size: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> TaskModelInfo:
        """Fill what the file lacks from the caller; a value given here wins over the file's.

        Args:
            magnification: Magnification of the training images.
            patch_size: Side of a training image at ``magnification``; default: the file's,
                else ``input_size`` (images used at their own size).
            class_names: One name per class.

        Raises:
            ModelFileError: The magnification is known from nowhere, or a value is invalid.
        """
        changes: dict[str, Any] = {}
        for name, given in (("magnification", magnification), ("patch_size", patch_size)):
            stored = getattr(self, name)
            if (
                given is not None
                and stored is not None
                and not math.isclose(float(given), float(stored))
            ):
                log.warning(
                    "%s: %s=%s given, the file says %s: using %s",
                    self.path,
                    name,
                    given,
                    stored,
                    given,
                )
            if given is not None:
                changes[name] = given
        if changes.get("magnification", self.magnification) is None:
            raise ModelFileError(
                self.path,
                "the file does not record the magnification the model was trained at; "
                "give it (e.g. --magnification 20)",
            )
        if changes.get("patch_size", self.patch_size) is None:
            changes["patch_size"] = self.input_size
            log.info(
                "%s: no patch_size recorded or given: training images taken as %d px",
                self.path,
                self.input_size,
            )
        if class_names:
            names = tuple(str(n) for n in class_names)
            if len(names) != self.num_classes:
                raise ModelFileError(
                    self.path,
                    f"class_names has {len(names)} names {list(names)} but the model has "
                    f"{self.num_classes} classes; give exactly {self.num_classes}",
                )
            changes["class_names"] = names
        info = dataclasses.replace(self, **changes)
        if not float(info.magnification) > 0:
            raise ModelFileError(
                self.path, f"magnification={info.magnification!r}: must be positive (e.g. 20)"
            )
        if (
            isinstance(info.patch_size, bool)
            or not isinstance(info.patch_size, int)
            or info.patch_size <= 0
        ):
            raise ModelFileError(
                self.path, f"patch_size={info.patch_size!r}: must be a positive integer"
            )
        return dataclasses.replace(info, magnification=float(info.magnification))

    def as_dict(self) -> dict[str, Any]:
        """Plain values, for JSON and MLflow."""
        out = dataclasses.asdict(self)
        out["class_names"] = list(self.class_names)
        return out


def _require(path: str, config: Mapping[str, Any], key: str, check, allowed: str) -> Any:
    value = config.get(key)
    if value is None or not check(value):
        raise ModelFileError(path, f"config[{key!r}]={value!r}: {allowed}")
    return value


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The raw ``{"model", "config", ...}`` dict of a fine-tuning model file (tensors on CPU).

    Raises:
        ModelFileError: The file is missing, not a torch file of plain values, or lacks
            ``model`` or ``config``.
    """
    import torch

    path = str(path)
    if not os.path.isfile(path):
        raise ModelFileError(
            path, "file not found; give a best_model.pt of the fine-tuning job or its run folder"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise ModelFileError(
            path, f"cannot be read as a torch file of plain values ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(payload, Mapping) or "model" not in payload or "config" not in payload:
        keys = sorted(payload) if isinstance(payload, Mapping) else type(payload).__name__
        raise ModelFileError(
            path, f"holds {keys}; a fine-tuning model file holds 'model' (state dict) and 'config'"
        )
    return dict(payload)


def describe_checkpoint(path: str, payload: Mapping[str, Any]) -> TaskModelInfo:
    """What a model file's config says about its model (magnification and patch size may be None).

    Raises:
        ModelFileError: A required entry is missing or invalid, naming it.
    """
    from histokd.models import BACKBONES

    config = payload["config"]
    if not isinstance(config, Mapping):
        raise ModelFileError(
            path, f"config is a {type(config).__name__}; expected the fine-tuning config dict"
        )
    task = _require(path, config, "task", lambda v: v in _TASKS, f"allowed: {', '.join(_TASKS)}")
    resdist = config.get("resdist")  # any timm name: histokd.resdist.model checks it
    backbone = _require(
        path,
        config,
        "backbone",
        lambda v: v in BACKBONES or (resdist and isinstance(v, str)),
        f"allowed: {', '.join(BACKBONES)}",
    )
    positive = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
    num_classes = _require(
        path,
        config,
        "num_classes",
        lambda v: positive(v) and v < 255,
        "must be an integer in [1, 254]",
    )
    input_size = _require(path, config, "input_size", positive, "must be a positive integer")
    names = config.get("class_names")
    if names is None:
        names = [f"class_{k}" for k in range(num_classes)]
    elif len(names) != num_classes:
        raise ModelFileError(
            path, f"config['class_names'] has {len(names)} names for {num_classes} classes"
        )
    magnification = config.get("magnification")
    patch_size = config.get("patch_size")
    return TaskModelInfo(
        path=path,
        task=task,
        backbone=backbone,
        num_classes=num_classes,
        class_names=tuple(str(n) for n in names),
        input_size=input_size,
        magnification=float(magnification) if magnification is not None else None,
        patch_size=int(patch_size) if patch_size is not None else None,
        best_epoch=payload.get("best_epoch"),
        drop_rate=float(config.get("drop_rate") or 0.0),
        mean=tuple(map(float, config["mean"])) if config.get("mean") else None,
        std=tuple(map(float, config["std"])) if config.get("std") else None,
        resdist=dict(resdist) if resdist else None,
        stain_normalization=_stain_record(path, config.get("stain_normalization")),
    )


def _stain_record(path: str, record: Any) -> dict[str, Any] | None:
    """The model file's stain normalisation, checked (None: none)."""
    if not record:
        return None
    try:  # histokd.stain.StainReference's shape, checked here without importing torch
        ok = record.get("method") == "macenko"
        ok = ok and [len(row) for row in record["stain_matrix"]] == [2, 2, 2]
        ok = ok and len(record["max_concentrations"]) == 2
        ok = ok and all(float(v) > 0 for v in record["max_concentrations"])
    except (AttributeError, KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ModelFileError(
            path, f"config['stain_normalization']={record!r}: allowed: a macenko record "
            "(method, stain_matrix 3 x 2, max_concentrations 2 positive numbers) or None",
        )  # fmt: skip
    return dict(record)


def build_model(
    info: TaskModelInfo,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    *,
    bare: bool = False,
) -> nn.Module:
    """The task model of ``info`` in eval mode, with ``state_dict`` loaded strictly. It takes
    images as they come (uint8 or [0, 1]) and normalises them itself; ``bare`` gives a
    resolution-distillation network without its input normalisation (resdist's own training
    and evaluation normalise their data).

    Raises:
        ModelFileError: The state does not fit the architecture the config names.
    """
    from histokd.models import ClassificationModel, NormalizedModel, SegmentationModel

    if info.resdist is not None:
        from histokd.resdist.model import create_resdist_model

        model: nn.Module = create_resdist_model(info.backbone, info.num_classes, **info.resdist)
    elif info.task == "classification":
        model = ClassificationModel(info.backbone, info.num_classes, drop_rate=info.drop_rate)
    else:
        model = SegmentationModel(info.backbone, info.num_classes)
    if state_dict is not None:
        state = {k.removeprefix("module."): v for k, v in state_dict.items()}  # a DDP-wrapped save
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelFileError(
                info.path,
                f"weights do not fit a {info.task} model with backbone {info.backbone!r} and "
                f"{info.num_classes} classes: {str(exc).splitlines()[0]}",
            ) from exc
    if info.resdist is not None and not bare:  # its training set's statistics, in the file
        model = NormalizedModel(model, info.mean, info.std)
    return model.eval()


def load_task_model(path: str | os.PathLike) -> tuple[nn.Module, TaskModelInfo]:
    """The fine-tuned model of a ``best_model.pt`` (or a fine-tuning run folder), on CPU, in eval mode.

    Args:
        path: A model file, or a fine-tuning run folder (`find_best_model` picks the split).

    Returns:
        The model and what the file says about it; the magnification and patch size may be
        None (see `TaskModelInfo.resolve`).

    Raises:
        ModelFileError: Missing or unusable file, with the reason.
    """
    path = find_best_model(path) if Path(path).is_dir() else Path(path)
    payload = load_checkpoint(path)
    info = describe_checkpoint(str(path), payload)
    return build_model(info, payload["model"]), info


def find_best_model(run_dir: str | os.PathLike) -> Path:
    """The ``best_model.pt`` of a fine-tuning run's split with the lowest validation loss.

    Looks at ``RUN/split_*/result.json`` (their ``best_model`` entries, else a
    ``best_model.pt`` in the split's folder, where Ray Train's local mode keeps it), then at
    any ``best_model.pt`` below the folder.

    Raises:
        ModelFileError: No model file is found.
    """
    run_dir = Path(run_dir)
    candidates: list[tuple[float, str, Path]] = []
    for result in sorted(run_dir.glob("split_*/result.json")):
        try:
            data = json.loads(result.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        model = data.get("best_model")
        if not (model and os.path.isfile(model)):  # local mode keeps it in the split's folder
            found = sorted(result.parent.rglob(BEST_MODEL_FILE))
            model = str(found[0]) if found else None
        if model:
            loss = data.get("best_val_loss")
            candidates.append(
                (float(loss) if loss is not None else math.inf, str(result), Path(model))
            )
    if candidates:
        return min(candidates)[2]
    found = sorted(run_dir.rglob(BEST_MODEL_FILE))
    if found:
        return found[0]
    raise ModelFileError(
        run_dir,
        f"no split_*/result.json with a best_model and no {BEST_MODEL_FILE} below this folder",
    )
