"""One factory over timm for every backbone histokd trains, and its backbone files.

histokd names its backbones as in RCKD (`BACKBONES`: ``csat``, ``resnet18_sat``, ...). timm
knows histokd's own models under a ``histokd_`` prefix (`timm_name`: ``histokd_csat``,
``histokd_csat_nosat``, ``histokd_resnet18_sat``), apart from timm's unrelated ``csatv2``; the
others (``resnet18``, ...) are timm's models under their timm names.

A backbone is ``timm.create_model(timm_name(name), features_only=True, feature_cls="getter")``: timm's
``FeatureGetterNet``, which wraps the unchanged timm model (head pruned) under ``model.`` and
returns the stage outputs of ``forward_intermediates`` as a list, strides 2 or 4 up to 32.
It has ``feature_info.channels()`` and ``feature_info.reduction()``.

Backbone files hold the state dict with the keys of ``timm.create_model(timm_name(name))`` (no
``model.`` prefix, no classifier): a plain dict of tensors that timm reads with
``weights_only=True`` (or safetensors). The file names no model, so files written before the
timm names changed load unchanged. The same file loads

* into any histokd task model, strictly (`load_backbone_file`, ``backbone_file=``), and
* through timm itself: ``timm.create_model("histokd_csat", pretrained=True,
  pretrained_cfg_overlay=dict(file=path))``, with ``features_only=True`` or ``num_classes=k``.
  For histokd's models the head keeps its initialisation and every other key is strict
  (`histokd.models.timm_weights`); timm's own models (``resnet18``, ...) need ``num_classes``
  or ``features_only`` and then load non-strictly, so prefer ``backbone_file=``, which fails
  on a missing key.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch
from timm.models import load_state_dict as timm_load_state_dict
from timm.models._features import FeatureGetterNet
from torch import nn

import histokd.models.csat  # noqa: F401  (registers histokd_csat, histokd_csat_nosat)
import histokd.models.resnet_sat  # noqa: F401  (registers histokd_resnet18_sat)

__all__ = [
    "BACKBONES",
    "TIMM_NAMES",
    "backbone_state_dict",
    "create_backbone",
    "load_backbone_file",
    "load_init",
    "load_backbone_state_dict",
    "save_backbone",
    "timm_name",
]

_logger = logging.getLogger(__name__)

#: Backbones of RCKD (Tables 3, 4 and 6) that every histokd job accepts.
BACKBONES: tuple[str, ...] = (
    "csat",
    "csat_nosat",
    "resnet18",
    "resnet18_sat",
    "efficientnet_b0",
    "convnextv2_atto",
)

#: histokd's name -> timm's, for histokd's own models (the others keep their timm names).
TIMM_NAMES: dict[str, str] = {
    "csat": "histokd_csat",
    "csat_nosat": "histokd_csat_nosat",
    "resnet18_sat": "histokd_resnet18_sat",
}

_PREFIX = "model."


def timm_name(name: str) -> str:
    """The name under which timm knows backbone ``name`` (``csat`` -> ``histokd_csat``)."""
    return TIMM_NAMES.get(name, name)


def create_backbone(
    name: str,
    *,
    out_indices: Sequence[int] | None = None,
    backbone_file: str | os.PathLike | None = None,
    init: str | None = None,
    **kwargs,
) -> FeatureGetterNet:
    """Build a multi-scale feature extractor.

    Args:
        name: One of `BACKBONES`.
        out_indices: Feature levels to return (default: all; 4 levels for csat and
            convnextv2_atto, strides 4-32; 5 for the others, strides 2-32).
        backbone_file: Optional backbone file (see `save_backbone`) to load strictly.
        init: Initial weights, as every job's ``--init`` gives them (`load_init`): ``random``
            (or None), ``imagenet``, a weights file or ``hf-hub:ORG/NAME``.
        **kwargs: Passed to ``timm.create_model`` (``drop_path_rate``, ``pretrained``,
            ``pretrained_cfg_overlay``, ...).

    Returns:
        The backbone; calling it on NCHW images returns one NCHW tensor per level.

    Raises:
        ValueError: ``name`` is not a known backbone, or ``init`` cannot be loaded.
    """
    if name not in BACKBONES:
        raise ValueError(f"backbone name {name!r} is not one of {', '.join(BACKBONES)}")
    if out_indices is not None:
        kwargs["out_indices"] = tuple(out_indices)
    backbone = timm.create_model(
        timm_name(name), features_only=True, feature_cls="getter", **kwargs
    )
    backbone.backbone_name = name
    if backbone_file is not None:
        load_backbone_file(backbone, backbone_file)
    if init is not None:
        load_init(backbone, init)
    return backbone


def load_init(backbone: nn.Module, init: str | None) -> str | None:
    """Load ``--init`` weights into a backbone from `create_backbone`, every key checked.

    Args:
        backbone: The backbone.
        init: ``random`` (or None: nothing to load), ``imagenet``, a weights file or
            ``hf-hub:ORG/NAME`` (`histokd.models.timm_weights.parse_init`).

    Returns:
        The file the weights came from (a Hub checkpoint in the Hugging Face cache), or None.

    Raises:
        ValueError: The weights cannot be had, or do not fit the backbone (naming the first
            missing and unexpected keys, and the file).
    """
    from histokd.models.timm_weights import parse_init, read_init_weights

    _check_backbone(backbone)
    source = parse_init(init, backbone.backbone_name)
    if source.kind == "random":
        return None
    state, path = read_init_weights(source)
    where = path if source.kind == "file" else f"{path} (init={source.value!r})"
    load_backbone_state_dict(backbone, state, source=where, own_keys=source.own_keys)
    _logger.info("%s backbone initialised from %s", backbone.backbone_name, where)
    return path


def _check_backbone(backbone: nn.Module) -> None:
    if not isinstance(backbone, FeatureGetterNet):
        raise TypeError(
            f"backbone is a {type(backbone).__name__}; expected the FeatureGetterNet that "
            "create_backbone returns"
        )


def backbone_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's state dict with timm's key names (``stem.0.weight``, ``layer1.0...``)."""
    _check_backbone(backbone)
    return {k[len(_PREFIX) :]: v for k, v in backbone.state_dict().items()}


def _first(keys: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_backbone_state_dict(
    backbone: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "state dict",
    own_keys: str | None = None,
) -> None:
    """Load timm-named backbone weights strictly.

    Keys the backbone does not have (a timm classifier, a pruned head or stage) are ignored
    unless a key is missing too; a key it needs but ``state_dict`` lacks, or a shape that
    differs, is an error that names the first missing and unexpected keys and ``source``.

    Args:
        backbone: A backbone from `create_backbone`.
        state_dict: Weights keyed as in ``timm.create_model(timm_name(name))``.
        source: What the weights are, for error messages (e.g. the file path).
        own_keys: Backbone keys containing this may be missing: layers of the backbone that
            the source model lacks (``.se.``: the SAT modules of ``resnet18_sat`` under
            resnet18's weights) keep their initialisation.

    Raises:
        ValueError: A required key is missing or a shape differs.
    """
    _check_backbone(backbone)
    name = getattr(backbone, "backbone_name", "this backbone")
    expected = {k[len(_PREFIX) :]: v for k, v in backbone.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    kept = [k for k in missing if own_keys and own_keys in k]
    missing = [k for k in missing if k not in kept]
    if missing:
        unexpected = [k for k in state_dict if k not in expected]
        raise ValueError(
            f"{source}: {len(missing)} of {len(expected)} backbone keys are missing "
            f"({_first(missing)}); "
            + (
                f"the file has keys like {_first(unexpected)} that the {name} backbone lacks; "
                if unexpected
                else ""
            )
            + f"expected weights of {name} (a backbone file, a timm or Hub checkpoint)"
        )
    for key, value in expected.items():
        if key not in kept and state_dict[key].shape != value.shape:
            raise ValueError(
                f"{source}: {key!r} has shape {tuple(state_dict[key].shape)}; the {name} "
                f"backbone needs {tuple(value.shape)}"
            )
    ignored = [k for k in state_dict if k not in expected]
    if ignored:
        _logger.info(
            "%s: ignored %d keys the backbone lacks: %s", source, len(ignored), _first(ignored)
        )
    if kept:
        _logger.info(
            "%s: %d keys of %s keep their initialisation: %s", source, len(kept), name, _first(kept)
        )
    own = backbone.state_dict()
    backbone.load_state_dict(
        {_PREFIX + k: (own[_PREFIX + k] if k in kept else state_dict[k]) for k in expected},
        strict=True,
    )


def load_backbone_file(backbone: nn.Module, path: str | os.PathLike) -> None:
    """Load a backbone file (``.pth`` or ``.safetensors``) strictly into ``backbone``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file does not hold this backbone's weights.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone file {str(path)!r} does not exist")
    load_backbone_state_dict(backbone, timm_load_state_dict(str(path)), source=str(path))


def save_backbone(backbone: nn.Module, path: str | os.PathLike) -> Path:
    """Write the backbone's timm-named state dict to ``path``.

    A ``.safetensors`` suffix writes safetensors; anything else, ``torch.save``.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in backbone_state_dict(backbone).items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path
