"""Reading histokd's backbone files through timm's own pretrained loader.

A backbone file (`histokd.models.save_backbone`) is a plain state dict of tensors (``torch.save``
or safetensors) keyed as in ``timm.create_model(name)``, without the classifier head: the format
timm's ``load_state_dict`` reads with ``weights_only=True``. So the file loads with

    timm.create_model("histokd_csat", pretrained=True, pretrained_cfg_overlay=dict(file=path))

timm loads strictly when the model has the pretrained config's number of classes (1000 by
default), and the file has no head: `keep_head_init`, the ``pretrained_filter_fn`` of histokd's
timm models, lets the head keep its initialisation and leaves every other key strict.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["keep_head_init", "rckd_cfg"]

_logger = logging.getLogger(__name__)


def keep_head_init(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module, head_prefix: str
) -> dict[str, torch.Tensor]:
    """Add the model's own head weights to a state dict that has none (a backbone file).

    Args:
        state_dict: The weights timm read from the file.
        model: The model they load into.
        head_prefix: Where the classifier head's keys start (``"head."``, ``"fc."``).

    Returns:
        ``state_dict`` with the model's head weights where it has no head key at all;
        otherwise ``state_dict`` unchanged (a checkpoint with a head loads as timm loads it).
    """
    if any(k.startswith(head_prefix) for k in state_dict):
        return dict(state_dict)
    head = {k: v for k, v in model.state_dict().items() if k.startswith(head_prefix)}
    if head:
        _logger.info(
            "a backbone file without a head: %s* (%d tensors) keeps its initialisation",
            head_prefix,
            len(head),
        )
    return {**state_dict, **head}


def rckd_cfg(first_conv: str, classifier: str, **kwargs) -> dict:
    """The ``pretrained_cfg`` of histokd's timm models: what RCKD pretraining feeds the student
    (Sec. 3.1): 512 px patches resized bilinearly, no crop, ImageNet mean and std. Task models
    normalise their input with it (`histokd.models.task_models.InputNormalization`)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return {"url": "", "num_classes": 1000, "input_size": (3, 512, 512), "pool_size": (16, 16),
            "crop_pct": 1.0, "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": first_conv, "classifier": classifier,
            **kwargs}  # fmt: skip
