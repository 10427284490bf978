"""Gradient accumulation over single images (DiPalma Sec. 3.5) and model files."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from histokd.resdist.model import create_resdist_model
from histokd.resdist.training import (
    GradientAccumulator,
    feature_channels,
    load_model_file,
    save_model_file,
)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _loss(model: nn.Module, image: torch.Tensor, label: int) -> torch.Tensor:
    return nn.functional.cross_entropy(model(image[None])[1], torch.tensor([label]))


def test_accumulated_gradients_equal_the_summed_loss():
    torch.manual_seed(0)
    model = create_resdist_model(num_classes=3)
    images = [
        torch.randn(3, 48, 64),
        torch.randn(3, 80, 40),
        torch.randn(3, 33, 71),
        torch.randn(3, 64, 64),
    ]
    labels = [0, 2, 1, 2]
    k = len(images)
    # one graph of the summed loss (mean over the k images)
    reference = copy.deepcopy(model)
    total = sum(_loss(reference, x, y) for x, y in zip(images, labels, strict=True)) / k
    total.backward()
    expected = _grads(reference)
    # one backward pass per image, the optimizer step after k of them
    captured = {}

    class Capture(torch.optim.SGD):
        def step(self, closure=None):  # record the gradient the step sees, then step
            captured["grads"] = _grads(model)
            return super().step(closure)

    accumulator = GradientAccumulator(Capture(model.parameters(), lr=0.0), steps=k)
    for x, y in zip(images, labels, strict=True):
        assert accumulator.pending < k
        accumulator.backward(_loss(model, x, y))
    assert accumulator.num_steps == 1 and accumulator.pending == 0
    for got, want in zip(captured["grads"], expected, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_groupnorm_makes_accumulation_equal_a_real_batch():
    torch.manual_seed(1)
    model = create_resdist_model(num_classes=3)
    batch = torch.randn(4, 3, 64, 64)
    labels = torch.tensor([0, 1, 2, 1])
    reference = copy.deepcopy(model)
    nn.functional.cross_entropy(reference(batch)[1], labels).backward()
    for x, y in zip(batch, labels.tolist(), strict=True):
        (_loss(model, x, y) / 4).backward()
    for got, want in zip(_grads(model), _grads(reference), strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    # with BatchNorm the batch's statistics couple the images: the two differ
    bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    bn(batch)
    bn_ref = copy.deepcopy(bn)
    nn.functional.cross_entropy(bn_ref(batch), labels).backward()
    for x, y in zip(batch, labels.tolist(), strict=True):
        (nn.functional.cross_entropy(bn(x[None]), torch.tensor([y])) / 4).backward()
    conv_grad, conv_ref = bn[0].weight.grad, bn_ref[0].weight.grad
    assert not torch.allclose(conv_grad, conv_ref, rtol=1e-3, atol=1e-5)


def test_short_last_group_is_rescaled_to_its_mean():
    weight = nn.Parameter(torch.zeros(1))
    seen = []

    class Capture(torch.optim.SGD):
        def step(self, closure=None):
            seen.append(float(weight.grad))
            return super().step(closure)

    accumulator = GradientAccumulator(Capture([weight], lr=0.0), steps=4)
    for value in (1.0, 2.0, 3.0, 4.0, 10.0, 20.0):  # loss = value * w: gradient = value
        accumulator.backward(weight * value)
    assert accumulator.pending == 2
    assert accumulator.step()
    assert not accumulator.step()  # nothing pending
    assert seen == [pytest.approx(2.5), pytest.approx(15.0)]  # (1+2+3+4)/4 and (10+20)/2
    assert accumulator.num_steps == 2


def test_bad_steps():
    with pytest.raises(ValueError, match="accumulation steps"):
        GradientAccumulator(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), steps=0)


def test_model_file_round_trip(tmp_path):
    torch.manual_seed(0)
    for arch, hint in (("resdist_resnet", None), ("resnet18", 256)):
        model = create_resdist_model(arch, num_classes=3, hint_channels=hint).eval()
        meta = {"arch": arch, "num_classes": 3, "hint_channels": hint, "magnification": 2.5,
                "stats": ([0.5] * 3, [0.2] * 3), "method": "KD"}  # fmt: skip
        path = save_model_file(tmp_path / f"{arch}.pt", model, meta)
        loaded, loaded_meta = load_model_file(path)
        assert loaded_meta["method"] == "KD" and loaded_meta["magnification"] == 2.5
        x = torch.randn(1, 3, 64, 64)
        assert torch.allclose(loaded(x)[1], model(x)[1], atol=1e-6)
        assert feature_channels(loaded) == 256
    with pytest.raises(ValueError, match="stats"):
        save_model_file(
            tmp_path / "bad.pt", model, {"arch": "resnet18", "num_classes": 3, "magnification": 1.0}
        )
    with pytest.raises(FileNotFoundError):
        load_model_file(tmp_path / "missing.pt")
