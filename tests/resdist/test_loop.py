"""Gradient accumulation over single images (DiPalma Sec. 3.5) and the loader of the loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from histokd.resdist.loop import GradientAccumulator
from histokd.resdist.model import create_resdist_model


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _loss(model: nn.Module, image: torch.Tensor, label: int) -> torch.Tensor:
    return nn.functional.cross_entropy(model(image[None]), torch.tensor([label]))


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
    nn.functional.cross_entropy(reference(batch), labels).backward()
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


def test_loader_processes_give_the_same_items(tmp_path):
    import numpy as np
    from PIL import Image

    from histokd.resdist.dataset import RegionImages
    from histokd.resdist.loop import _items

    path = tmp_path / "r.png"
    Image.fromarray((np.random.default_rng(0).random((16, 24, 3)) * 255).astype(np.uint8)).save(
        path
    )
    items = [
        {"region_id": f"r{i}", "label": 2 - 2 * i, "paths": {"10x": str(path)}} for i in (0, 1)
    ]
    dataset = RegionImages(items, ["10x"], {"10x": ([0.5] * 3, [0.25] * 3)}, augment=True, seed=1, cache=False)  # fmt: skip
    dataset.set_epoch(2)
    direct = [dataset[i] for i in (1, 0)]
    loaded = list(_items(dataset, [1, 0], workers=1))
    assert [x["index"] for x in loaded] == [1, 0] and [x["label"] for x in loaded] == [0, 2]
    for a, b in zip(direct, loaded, strict=True):  # the epoch's augmentation, in the worker too
        assert torch.equal(a["images"][0], b["images"][0])
