"""Task models over every backbone: forward/backward at 224 and 512, backbone transfer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from histokd.models import BACKBONES, ClassificationModel, SegmentationModel, backbone_state_dict


def _check_all_grads(model: torch.nn.Module) -> None:
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:5]
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, bad[:5]


@pytest.mark.parametrize("size", [224, 512])
@pytest.mark.parametrize("name", BACKBONES)
def test_segmentation_forward_backward(name: str, size: int) -> None:
    model = SegmentationModel(name, num_classes=2)
    x = torch.randn(1, 3, size, size)
    logits = model(x)
    assert logits.shape == (1, 2, size, size)
    F.cross_entropy(logits, torch.randint(0, 2, (1, size, size))).backward()
    _check_all_grads(model)


@pytest.mark.parametrize("size", [200, 97])
def test_output_at_input_resolution_for_any_size(size: int) -> None:
    model = SegmentationModel("csat", num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 3, size, size)


def test_classification_logits_and_probabilities() -> None:
    model = ClassificationModel("csat", num_classes=4).eval()
    x = torch.randn(3, 3, 96, 96)
    logits = model(x)
    assert logits.shape == (3, 4)
    probs = model.predict_proba(x)
    assert torch.allclose(probs.sum(-1), torch.ones(3))
    assert torch.allclose(probs, logits.softmax(-1))
    # the head is the paper's: a linear layer on the pooled last stage
    assert model.head.fc.in_features == 176


@pytest.mark.parametrize("name", BACKBONES)
def test_pretrained_backbone_moves_to_a_classifier(tmp_path: Path, name: str) -> None:
    segmentation = SegmentationModel(name, num_classes=2)
    with torch.no_grad():  # make the weights distinguishable from a fresh initialisation
        for p in segmentation.backbone.parameters():
            p.add_(0.01)
    path = segmentation.save_backbone(tmp_path / "backbone.pth")
    saved = torch.load(path)
    assert not any(k.startswith(("decoder.", "head.", "backbone.", "model.")) for k in saved)
    classifier = ClassificationModel(name, num_classes=5, backbone_file=path)
    assert all(
        torch.equal(v, saved[k]) for k, v in backbone_state_dict(classifier.backbone).items()
    )
    assert classifier.backbone_state_dict().keys() == saved.keys()
    # and back into a new segmentation model for a downstream segmentation task
    downstream = SegmentationModel(name, num_classes=3, backbone_file=path)
    assert all(torch.equal(v, saved[k]) for k, v in downstream.backbone_state_dict().items())


def test_num_classes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="num_classes is 0"):
        SegmentationModel("csat", num_classes=0)
    with pytest.raises(ValueError, match="num_classes is 0"):
        ClassificationModel("csat", num_classes=0)


def test_task_models_own_their_input_normalisation():
    """uint8 or [0, 1] images in; the backbone's ImageNet mean and std applied inside, the same
    for both task models, and nothing of it in the state dict (model files are unchanged)."""
    torch.manual_seed(0)
    model = ClassificationModel("resnet18", num_classes=3).eval()
    white = model.normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    assert white[0, :, 0, 0].tolist() == pytest.approx(
        [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225], rel=1e-5
    )
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(model(images), model(images.float() / 255))
        by_hand = model.head(model.backbone(model.normalize(images))[-1])
        torch.testing.assert_close(model(images), by_hand)
    assert not any("input_norm" in k for k in model.state_dict())
    segmenter = SegmentationModel("resnet18", num_classes=2)
    torch.testing.assert_close(segmenter.input_norm.std, model.input_norm.std)
