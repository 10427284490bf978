"""Positional encoding generator (PEG) and the switch that freezes it.

Paper: `Conditional Positional Encodings for Vision Transformers` (Chu et al., ICLR 2023).
A PEG computes a positional encoding from each token's 3x3 neighbourhood with a depthwise
convolution, so a model that uses it runs at any input resolution.

CSAT (RCKD, Kim et al. 2023, Sec. 2.3) uses PEGs in its Transformer blocks and in every SAT
module. RCKD Sec. 3.1 fine-tunes with the positional encodings frozen ("PE" in Fig. 5);
`set_positional_encoding_trainable` is that switch.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PositionalEncodingGenerator", "set_positional_encoding_trainable"]


class PositionalEncodingGenerator(nn.Module):
    """Conditional positional encoding: ``x + DWConv3x3(x)`` (CPVT Eq. 5).

    Args:
        dim: Number of channels.
        kernel_size: Size of the depthwise convolution window.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 3,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.proj = nn.Conv2d(
            dim,
            dim,
            kernel_size,
            padding=kernel_size // 2,
            groups=dim,
            bias=True,
            device=device,
            dtype=dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Add the positional encoding to an NCHW feature map."""
        return x + self.proj(x)


def set_positional_encoding_trainable(model: nn.Module, trainable: bool) -> int:
    """Freeze or unfreeze every positional encoding generator in ``model``.

    Freezing also drops any gradient the PEGs already hold, so an optimizer step taken after
    this call leaves them unchanged (PyTorch optimizers skip parameters whose ``grad`` is None,
    weight decay included).

    Args:
        model: Any module; all `PositionalEncodingGenerator` submodules are switched.
        trainable: True to train the positional encodings, False to freeze them
            (RCKD Sec. 3.1: frozen was best).

    Returns:
        Number of parameter elements switched (5,580 for CSAT).
    """
    count = 0
    for module in model.modules():
        if not isinstance(module, PositionalEncodingGenerator):
            continue
        for param in module.parameters():
            param.requires_grad_(trainable)
            if not trainable:
                param.grad = None
            count += param.numel()
    return count
