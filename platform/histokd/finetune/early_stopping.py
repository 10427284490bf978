"""Early stopping on the validation loss (RCKD Sec. 3.1, Algorithm 2 line 14).

"We trained the models for a maximum of 200 epochs. However, we stopped training if the
validation loss did not decrease for more than 20 epochs." An epoch improves when its loss is
lower than the best so far by more than ``min_delta``; training stops after ``patience``
epochs in a row without improvement, so with the best epoch b it stops at epoch b + patience.
The best epoch's weights are the ones evaluated on the test split.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["EarlyStopping"]


@dataclass
class EarlyStopping:
    """Tracks the best validation loss and says when to stop.

    Args:
        patience: Epochs without a lower validation loss before stopping (RCKD: 20).
        min_delta: How much lower a loss must be to count as lower.

    Attributes:
        best_loss: Lowest validation loss so far.
        best_epoch: Epoch of ``best_loss`` (0 before any epoch).
        bad_epochs: Epochs since ``best_epoch``.
    """

    patience: int = 20  # RCKD Sec. 3.1
    min_delta: float = 0.0
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"patience={self.patience!r}: must be a positive integer (RCKD: 20)")
        if self.min_delta < 0:
            raise ValueError(f"min_delta={self.min_delta!r}: must be >= 0")

    def step(self, epoch: int, val_loss: float) -> bool:
        """Record an epoch's validation loss.

        Returns:
            True when this epoch is the new best (save its weights).
        """
        if math.isfinite(val_loss) and val_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_epoch, self.bad_epochs = float(val_loss), int(epoch), 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        """``patience`` epochs in a row without a lower validation loss."""
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        """The state, for a checkpoint."""
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's state."""
        for key, value in state.items():
            setattr(self, key, value)
