"""RCKD pretraining: config, the per-worker loop, the driver."""

from histokd.pretrain.config import DEMO_PRESET, PretrainConfig

__all__ = ["DEMO_PRESET", "PretrainConfig"]
