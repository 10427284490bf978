"""Early stopping on the validation loss (RCKD Sec. 3.1: patience 20)."""

import math

import pytest

from histokd.finetune.early_stopping import EarlyStopping


def _run(losses, patience, min_delta=0.0):
    stopper = EarlyStopping(patience=patience, min_delta=min_delta)
    for epoch, loss in enumerate(losses, start=1):
        stopper.step(epoch, loss)
        if stopper.should_stop:
            return stopper, epoch
    return stopper, None


def test_stops_patience_epochs_after_the_best():
    losses = [1.0, 0.8, 0.6, 0.7, 0.65, 0.61, 0.9, 0.5, 0.4]
    stopper, stopped = _run(losses, patience=3)
    assert (stopper.best_epoch, stopper.best_loss, stopped) == (3, 0.6, 6)


def test_rckd_patience_on_a_long_plateau():
    losses = [1.0 - 0.01 * e for e in range(30)] + [0.8] * 100  # best at epoch 30
    stopper, stopped = _run(losses, patience=20)
    assert (stopper.best_epoch, stopped) == (30, 50)


def test_equal_loss_is_not_lower_and_min_delta():
    assert _run([1.0, 1.0, 1.0], patience=2)[1] == 3
    stopper, stopped = _run([1.0, 0.95, 0.9, 0.85], patience=2, min_delta=0.1)
    assert (stopper.best_epoch, stopped) == (1, 3)


def test_nan_never_improves_and_state_round_trips():
    stopper = EarlyStopping(patience=5)
    stopper.step(1, 0.5)
    assert not stopper.step(2, math.nan)
    restored = EarlyStopping(patience=5)
    restored.load_state_dict(stopper.state_dict())
    assert restored == stopper and restored.bad_epochs == 1


def test_bad_patience():
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0)
