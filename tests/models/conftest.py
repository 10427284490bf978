"""Model tests: torchvision (imported by timm) must be fixed up before any test module imports timm."""

from __future__ import annotations

import pytest
import torch

from histokd.compat import ensure_torchvision

ensure_torchvision()


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Same random weights and inputs on every run."""
    torch.manual_seed(0)
