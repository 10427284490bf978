"""Parameters and multiply-accumulates (MACs) of the backbones, in two protocols.

* ``paper``: what RCKD (Kim et al. 2023) reports in Tables 3, 4 and 6, THOP's count. THOP
  (ultralytics-thop, ``thop.profile_origin``: the per-leaf-module traversal of the original
  THOP) counts the modules it has rules for: convolutions, linear layers, norms and pools.
  Products that run as functions inside a module's ``forward`` are not counted: the attention
  matmuls (``scaled_dot_product_attention``), the interpolation of the SAT module, GRN.
  CSAT: 1.08 GMAC at 384x384; ResNet18: 5.36 (the paper prints 5.35).
* ``full``: ``torch.utils.flop_counter``: every convolution and matrix product, attention
  included (its CPU fused kernel is registered below, which flop_counter lacks). Norms and
  element-wise operations are not MACs and are not counted. CSAT: 1.43 GMAC at 384.

Both count one forward pass of one image. The table that ``jobs/profile_models.py`` writes is
RCKD Table 6 (parameters with a 1000-class head) with Table 3's backbone-only parameters and
GMAC at each input size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import thop
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from histokd.models.factory import BACKBONES, create_backbone, timm_name

__all__ = [
    "ProfileConfig",
    "ProfileRow",
    "count_params",
    "format_table",
    "macs_full",
    "macs_paper",
    "profile_backbones",
    "run_profile",
]


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU fused attention kernel: Q K^T and A V, as for the CUDA kernels."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _image(input_size: int | tuple[int, int], in_chans: int, model: nn.Module) -> torch.Tensor:
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return torch.randn(1, in_chans, h, w, device=device)


def macs_paper(model: nn.Module, input_size: int | tuple[int, int], in_chans: int = 3) -> int:
    """MACs of one forward pass on one image, counted as RCKD counts them (THOP).

    Args:
        model: Any module taking a ``1 x in_chans x H x W`` tensor.
        input_size: Side, or (height, width), of the image.
        in_chans: Input channels.
    """
    logging.getLogger("thop").setLevel(logging.ERROR)
    macs, _ = thop.profile_origin(model, (_image(input_size, in_chans, model),), verbose=False)
    return int(macs)


def macs_full(model: nn.Module, input_size: int | tuple[int, int], in_chans: int = 3) -> int:
    """MACs of every convolution and matrix product, attention included (flop_counter)."""
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=_FLOP_FORMULAS) as counter:
            with torch.no_grad():
                model(_image(input_size, in_chans, model))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2  # flop_counter counts a multiply-add as 2 FLOPs


@dataclass(frozen=True)
class ProfileRow:
    """One backbone at one input size.

    Attributes:
        backbone: Model name.
        input_size: Side of the square input image.
        params: Parameters with the ``num_classes`` head (RCKD Table 6).
        params_backbone: Parameters of the feature extractor alone (RCKD Table 3's "Params").
        gmac_paper: GMAC, THOP protocol (RCKD's).
        gmac_full: GMAC, flop_counter protocol (attention included).
    """

    backbone: str
    input_size: int
    params: int
    params_backbone: int
    gmac_paper: float
    gmac_full: float


def profile_backbones(
    backbones: Sequence[str] = BACKBONES,
    input_sizes: Sequence[int] = (224, 384),
    num_classes: int = 1000,
) -> list[ProfileRow]:
    """Count parameters and MACs of each backbone at each input size."""
    rows = []
    for name in backbones:
        model = timm.create_model(timm_name(name), num_classes=num_classes)
        params = count_params(model)
        params_backbone = count_params(create_backbone(name))
        for size in input_sizes:
            rows.append(
                ProfileRow(
                    backbone=name,
                    input_size=size,
                    params=params,
                    params_backbone=params_backbone,
                    gmac_paper=macs_paper(model, size) / 1e9,
                    gmac_full=macs_full(model, size) / 1e9,
                )
            )
    return rows


def format_table(rows: Sequence[ProfileRow]) -> str:
    """A markdown table in the layout of RCKD Table 6 plus Table 3's columns."""
    lines = [
        "| backbone | input | params (1000-class head) | params (backbone) | GMAC (paper, THOP) "
        "| GMAC (full, flop_counter) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.backbone} | {r.input_size} | {r.params:,} | {r.params_backbone:,} "
            f"| {r.gmac_paper:.3f} | {r.gmac_full:.3f} |"
        )
    return "\n".join(lines)


@dataclass
class ProfileConfig:
    """What ``jobs/profile_models.py`` profiles and where it writes.

    Attributes:
        output_dir: Folder for ``profile.json`` and ``profile.md``.
        backbones: Names from `histokd.models.BACKBONES`.
        input_sizes: Square input sides (RCKD reports GMAC at 384, the fine-tuning size).
        num_classes: Classes of the head counted in ``params`` (RCKD Table 6: ImageNet, 1000).
    """

    output_dir: Path
    backbones: tuple[str, ...] = BACKBONES
    input_sizes: tuple[int, ...] = (224, 384, 512)  # RCKD Sec. 3.1: 384; 512: pretraining tiles
    num_classes: int = 1000  # RCKD Table 6: ImageNet head

    def __post_init__(self) -> None:
        """Normalise the field types and reject a bad value, naming the field."""
        self.output_dir = Path(self.output_dir)
        self.backbones = tuple(self.backbones)
        self.input_sizes = tuple(int(s) for s in self.input_sizes)
        unknown = [b for b in self.backbones if b not in BACKBONES]
        if not self.backbones or unknown:
            raise ValueError(
                f"ProfileConfig.backbones: {unknown or 'empty'} not in {', '.join(BACKBONES)}"
            )
        bad = [s for s in self.input_sizes if s < 32 or s % 32]
        if not self.input_sizes or bad:
            raise ValueError(
                f"ProfileConfig.input_sizes: {bad or 'empty'}; sides must be multiples of 32, >= 32"
            )
        if self.num_classes < 1:
            raise ValueError(f"ProfileConfig.num_classes: {self.num_classes}; must be >= 1")


def run_profile(config: ProfileConfig) -> list[ProfileRow]:
    """Profile, then write ``profile.json`` (rows and config) and ``profile.md`` (the table)."""
    rows = profile_backbones(config.backbones, config.input_sizes, config.num_classes)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    resolved = {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }
    resolved["output_dir"] = str(config.output_dir)
    payload = {"config": resolved, "rows": [dataclasses.asdict(r) for r in rows]}
    (config.output_dir / "profile.json").write_text(json.dumps(payload, indent=2) + "\n")
    (config.output_dir / "profile.md").write_text(format_table(rows) + "\n")
    return rows
