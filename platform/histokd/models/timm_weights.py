"""Initial weights of a backbone: histokd's backbone files in timm, and every job's ``--init``.

A backbone file (`histokd.models.save_backbone`) is a plain state dict of tensors (``torch.save``
or safetensors) keyed as in ``timm.create_model(name)``, without the classifier head: the format
timm's ``load_state_dict`` reads with ``weights_only=True``. So the file loads with

    timm.create_model("histokd_csat", pretrained=True, pretrained_cfg_overlay=dict(file=path))

timm loads strictly when the model has the pretrained config's number of classes (1000 by
default), and the file has no head: `keep_head_init`, the ``pretrained_filter_fn`` of histokd's
timm models, lets the head keep its initialisation and leaves every other key strict.

Every job's ``--init`` has one grammar (`parse_init`): ``random``; ``imagenet``, timm's default
ImageNet weights of the backbone (RCKD Sec. 2.2.1 starts the student from them, after USI) from
the Hugging Face Hub; a weights file (a backbone file, a timm or Hub checkpoint with or without
its head, ``.safetensors``; ``timm:FILE`` too); or ``hf-hub:ORG/NAME``, any timm Hub checkpoint of
the backbone. The configs check it before any Ray work (`check_init`: an offline machine without
the weights in its Hugging Face cache fails there, saying how to fetch them), and
`histokd.models.create_backbone` loads it strictly (`read_init_weights`). The Hub checkpoint is
the file timm's own ``pretrained=True`` loads, but looked up in the cache before any network
call, and loaded with every backbone key checked: timm loads a ``features_only`` model
non-strictly, and its Hub lookup retries for 23 s on a machine without network.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "IMAGENET_SOURCES",
    "INIT_CHOICES",
    "InitSource",
    "check_init",
    "init_kind",
    "init_weights_file",
    "keep_head_init",
    "parse_init",
    "rckd_cfg",
    "read_init_weights",
]

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


# --- initial weights: one grammar for every job's ``--init`` -----------------------------------

#: What ``--init`` takes, for the jobs' help and errors.
INIT_CHOICES = (
    "random, imagenet, a weights file (a histokd backbone file, a timm or Hub checkpoint, "
    ".safetensors) or hf-hub:ORG/NAME"
)

#: Backbones that take another timm model's ImageNet weights for the layers they share, and the
#: key part of their own layers, which keep their initialisation (RCKD Table 6: the SAT modules).
IMAGENET_SOURCES: dict[str, tuple[str, str]] = {"resnet18_sat": ("resnet18", ".se.")}

#: Hub checkpoint file names, in the order timm's own Hub loader tries them.
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class InitSource:
    """Where a backbone's initial weights come from (`parse_init`).

    Attributes:
        kind: ``random``, ``imagenet``, ``file`` or ``hf-hub``.
        value: The canonical ``--init`` value (a file as an absolute path).
        backbone: The histokd backbone the weights are for.
        path: The weights file (``file`` only).
        hub_id: ``ORG/NAME[@REVISION]`` on the Hugging Face Hub (``imagenet``, ``hf-hub``).
        hub_file: The Hub checkpoint file, when the model's timm config names one.
        own_keys: Backbone keys containing this part may be missing from the weights (layers of
            the backbone that the source model lacks).
    """

    kind: str
    value: str
    backbone: str
    path: str | None = None
    hub_id: str | None = None
    hub_file: str | None = None
    own_keys: str | None = None


def init_kind(init: str | None) -> str:
    """``random``, ``imagenet``, ``hf-hub``, ``timm`` (``timm:FILE``) or ``backbone_file``."""
    if init in (None, "", "random"):
        return "random"
    if init == "imagenet":
        return "imagenet"
    if init.startswith("hf-hub:"):
        return "hf-hub"
    return "timm" if init.startswith("timm:") else "backbone_file"


def parse_init(init: str | None, backbone: str, field: str = "init") -> InitSource:
    """Read an ``--init`` value for ``backbone``, without touching the network.

    Args:
        init: ``random`` (or None), ``imagenet`` (timm's default ImageNet weights of the backbone,
            from the Hugging Face Hub), a weights file (``timm:FILE`` too), or ``hf-hub:ORG/NAME``.
        backbone: One of `histokd.models.BACKBONES`.
        field: The config field, for errors.

    Raises:
        ValueError: No such file, a malformed Hub name, or ImageNet weights for a backbone that
            has none (CSAT).
    """
    import timm.models

    from histokd.models.factory import timm_name

    kind = init_kind(init)
    if kind == "random":
        return InitSource("random", "random", backbone)
    if kind in ("timm", "backbone_file"):
        path = init[len("timm:") :] if kind == "timm" else init
        path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isfile(path):
            raise ValueError(f"{field}={init!r}: no such file {path!r}; allowed: {INIT_CHOICES}")
        return InitSource("file", f"timm:{path}" if kind == "timm" else path, backbone, path=path)
    if kind == "hf-hub":
        hub_id = init[len("hf-hub:") :]
        if not re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", hub_id):
            raise ValueError(
                f"{field}={init!r}: expected hf-hub:ORG/NAME[@REVISION], e.g. hf-hub:timm/resnet18.a1_in1k"
            )
        own = IMAGENET_SOURCES.get(backbone, (None, None))[1]
        return InitSource("hf-hub", init, backbone, hub_id=hub_id, own_keys=own)
    source, own = IMAGENET_SOURCES.get(backbone, (timm_name(backbone), None))
    cfg = timm.models.get_pretrained_cfg(source)
    if cfg is None or not cfg.hf_hub_id:
        model = "CSAT" if backbone.startswith("csat") else backbone
        raise ValueError(
            f"{field}='imagenet': {model} has no ImageNet weights (backbone={backbone!r}); it stays "
            f"random unless a file is given: --init random or --init FILE"
        )
    return InitSource(
        "imagenet", "imagenet", backbone, hub_id=cfg.hf_hub_id, hub_file=cfg.hf_hub_filename,
        own_keys=own,
    )  # fmt: skip


def _hub_offline_reason() -> str | None:
    """Why the Hub cannot be reached, or None when it may be: ``HF_HUB_OFFLINE``, or a Hub host
    name that does not resolve (checked at once rather than after the Hub client's 23 s of
    retries; not behind a proxy, which resolves names itself)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE=1"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"no network: {host} does not resolve"
    return None


def _offline_error(source: InitSource, reason: str) -> ValueError:
    from huggingface_hub import constants

    repo = source.hub_id.split("@")[0]
    what = (
        f"the ImageNet weights of {source.backbone}" if source.kind == "imagenet" else "its weights"
    )
    return ValueError(
        f"init={source.value!r}: {what} ({repo} on the Hugging Face Hub) are not in the cache "
        f"{constants.HF_HUB_CACHE} and the Hub cannot be reached ({reason}); fetch them ahead of "
        f"time on a machine with internet: `hf download {repo}` (`huggingface-cli download` "
        f"before huggingface_hub 1.0) or `python -c "
        f"\"import timm; timm.create_model('hf-hub:{repo}', pretrained=True)\"`, then copy "
        f"~/.cache/huggingface here (or point HF_HUB_CACHE at the copy); or pass the weights "
        f"file with --init FILE"
    )


def _hub_download(source: InitSource, names: tuple[str, ...]) -> str | None:
    """The first of ``names`` that the Hub repo has, from the cache without a network call (an
    offline worker node needs no more), else downloaded; None when the repo has none of them.

    Raises:
        ValueError: Not cached and the Hub cannot be reached, or no such repo.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    from timm.models._hub import hf_split

    repo, revision = hf_split(source.hub_id)
    for name in names:
        try:
            return hf_hub_download(repo, name, revision=revision, local_files_only=True)
        except LocalEntryNotFoundError:
            pass
    reason = _hub_offline_reason()
    if reason is not None:
        raise _offline_error(source, reason)
    for name in names:
        try:
            return hf_hub_download(repo, name, revision=revision)
        except LocalEntryNotFoundError as exc:  # no answer from the Hub (a subclass: first)
            raise _offline_error(source, str(exc).strip().splitlines()[-1][:160]) from exc
        except EntryNotFoundError:
            continue
        except OSError as exc:  # no such repo or revision, no access
            message = str(exc).strip().splitlines()[0][:200]
            raise ValueError(f"init={source.value!r}: {source.hub_id}: {message}") from exc
    return None


def init_weights_file(source: InitSource) -> str | None:
    """The file that holds ``source``'s weights: the given file, or the Hub checkpoint in the
    Hugging Face cache (downloaded first if it is not there); None for random weights.

    The Hub file is found as timm's own Hub loader (``pretrained=True``) finds it: the timm
    config's file name, else ``model.safetensors``, else ``pytorch_model.bin``. A ``hf-hub:``
    checkpoint whose timm ``config.json`` names another architecture is refused.

    Raises:
        ValueError: Not cached and the Hub cannot be reached (the message says how to fetch the
            weights ahead of time), no such repo, or a checkpoint of another architecture.
    """
    if source.kind == "random":
        return None
    if source.kind == "file":
        return source.path
    if source.kind == "hf-hub":
        _check_hub_architecture(source)
    names = (source.hub_file,) if source.hub_file else _HUB_FILES
    path = _hub_download(source, names)
    if path is None:
        raise ValueError(f"init={source.value!r}: {source.hub_id} has none of {', '.join(names)}")
    return path


def _check_hub_architecture(source: InitSource) -> None:
    """A timm Hub repo's ``config.json`` names its architecture: it must be the backbone's."""
    from histokd.models.factory import timm_name

    path = _hub_download(source, ("config.json",))
    if path is None:
        return
    try:
        architecture = json.loads(open(path).read()).get("architecture")
    except (OSError, ValueError, AttributeError):
        return
    allowed = {timm_name(source.backbone), IMAGENET_SOURCES.get(source.backbone, ("",))[0]}
    if architecture and architecture.split(".")[0] not in allowed:
        raise ValueError(
            f"init={source.value!r}: {source.hub_id} holds {architecture} weights; "
            f"backbone={source.backbone!r} needs {timm_name(source.backbone)}'s"
        )


def check_init(init: str | None, backbone: str, field: str = "init") -> str:
    """Check an ``--init`` value before any Ray work and return its canonical form.

    The file must exist; Hub weights must be in the Hugging Face cache or downloadable now (so
    an offline machine fails here, in one line, not in every training worker).

    Raises:
        ValueError: One line naming the field, the value and what is allowed or how to fix it.
    """
    source = parse_init(init, backbone, field)
    init_weights_file(source)
    return source.value


def read_init_weights(source: InitSource) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of ``source`` as a timm-named state dict, and the file they came from.

    Read with timm's own reader: ``.safetensors`` or ``torch.load(weights_only=True)``, a
    training checkpoint's ``state_dict``/``model`` entry (EMA weights first), DDP and
    ``torch.compile`` prefixes removed.

    Raises:
        ValueError: The file is not a weights file.
    """
    from timm.models import load_state_dict

    path = init_weights_file(source)
    try:
        state = load_state_dict(path)
    except Exception as exc:  # pickle, zip, safetensors header: each library its own error
        message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"init={source.value!r}: {path} is not a weights file ({message})"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"init={source.value!r}: {path} holds no state dict of tensors")
    return state, path
