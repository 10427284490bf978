"""Backbones, decoders and task models.

Importing this package registers ``histokd_csat``, ``histokd_csat_nosat`` and
``histokd_resnet18_sat`` with timm, so ``timm.create_model("histokd_csat", features_only=True)``
works from then on. ``import histokd`` imports it as soon as timm is imported (histokd.compat).
Inside histokd the backbones keep RCKD's names (``csat``, ...; `BACKBONES`, `timm_name`).
"""

from histokd.compat import ensure_torchvision

ensure_torchvision()  # before anything imports timm (and with it torchvision)

from histokd.models.csat import Csat  # noqa: E402
from histokd.models.factory import (  # noqa: E402
    BACKBONES,
    TIMM_NAMES,
    backbone_state_dict,
    create_backbone,
    load_backbone_file,
    load_backbone_state_dict,
    load_init,
    save_backbone,
    timm_name,
)
from histokd.models.peg import (  # noqa: E402
    PositionalEncodingGenerator,
    set_positional_encoding_trainable,
)
from histokd.models.resnet_sat import histokd_resnet18_sat  # noqa: E402
from histokd.models.sat import SpatialAttentionTransformer  # noqa: E402
from histokd.models.task_models import (  # noqa: E402
    BackboneFeatures,
    ClassificationModel,
    InputNormalization,
    NormalizedModel,
    SegmentationModel,
)
from histokd.models.unet import DEFAULT_DECODER_CHANNELS, UNetDecoder  # noqa: E402

__all__ = [
    "BACKBONES",
    "BackboneFeatures",
    "DEFAULT_DECODER_CHANNELS",
    "TIMM_NAMES",
    "ClassificationModel",
    "InputNormalization",
    "NormalizedModel",
    "Csat",
    "PositionalEncodingGenerator",
    "SegmentationModel",
    "SpatialAttentionTransformer",
    "UNetDecoder",
    "backbone_state_dict",
    "create_backbone",
    "histokd_resnet18_sat",
    "load_backbone_file",
    "load_backbone_state_dict",
    "load_init",
    "save_backbone",
    "set_positional_encoding_trainable",
    "timm_name",
]
