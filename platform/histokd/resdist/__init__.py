"""Resolution-based distillation (DiPalma et al., Artificial Intelligence in Medicine 2021).

A teacher trained at high magnification (10x) teaches a student of the same GroupNorm ResNet
that sees the same tissue regions at an n-times lower magnification, by a soft loss on the
logits and a pixel loss on the last feature maps (Eqs. 1-3), on labelled or unlabelled
(auxiliary) regions, optionally followed by fine-tuning the student's last layer.

Modules, in the order data flows through them:

* :mod:`~histokd.resdist.regions`: tissue regions (tissueloc-style boxes) and their images at
  each magnification, Lanczos-downsampled from the original;
* :mod:`~histokd.resdist.region_set`: a data table in, region images and their table out;
* :mod:`~histokd.resdist.dataset`: single variable-size images with paired augmentation;
* :mod:`~histokd.resdist.model`: the GroupNorm ResNet (and any zoo model as student);
* :mod:`~histokd.resdist.training`: gradient accumulation, model files;
* :mod:`~histokd.resdist.loop`: the Ray Train worker loop of every phase;
* :mod:`~histokd.resdist.job`: the teacher / baseline and distillation drivers;
* :mod:`~histokd.resdist.evaluation` and :mod:`~histokd.resdist.report`: metrics with bootstrap
  intervals, GFLOPs, the Tables 5-8 and Fig. 3 outputs;
* :mod:`~histokd.resdist.search`: Ray Tune over magnification and temperature;
* :mod:`~histokd.resdist.demo`: the offline demo.

The loss is :mod:`histokd.losses.resolution_kd`.
"""

from histokd.compat import ensure_torchvision

ensure_torchvision()  # before timm is imported by the model module

from histokd.resdist.config import DistillConfig, EvaluateConfig, ResdistConfig, SupervisedConfig  # noqa: E402
from histokd.resdist.model import (  # noqa: E402
    DistillationNet,
    ResolutionResNet,
    create_resdist_model,
    replace_batchnorm,
)
from histokd.resdist.region_set import RegionSet, build_region_set  # noqa: E402
from histokd.resdist.regions import (  # noqa: E402
    RegionFinder,
    TissueRegion,
    find_tissue_regions,
    read_region_magnifications,
)
from histokd.resdist.training import GradientAccumulator, load_model_file, save_model_file  # noqa: E402

__all__ = [
    "DistillConfig",
    "DistillationNet",
    "EvaluateConfig",
    "GradientAccumulator",
    "RegionFinder",
    "RegionSet",
    "ResdistConfig",
    "ResolutionResNet",
    "SupervisedConfig",
    "TissueRegion",
    "build_region_set",
    "create_resdist_model",
    "find_tissue_regions",
    "load_model_file",
    "read_region_magnifications",
    "replace_batchnorm",
    "save_model_file",
]
