"""Metrics, bootstrap intervals, GFLOPs, Tables 5-8 and Fig. 3 as DiPalma Sec. 4.5 reports them."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from histokd.metrics import BootstrapInterval, accuracy
from histokd.resdist.evaluation import (
    METRICS,
    ModelEvaluation,
    forward_gflops,
    markdown_table,
    metric_intervals,
    ovr_accuracy,
    write_chart,
    write_tables,
)
from histokd.resdist.model import create_resdist_model


def test_one_vs_rest_accuracy_by_hand():
    # rows: true class, columns: predicted; 10 images, 7 right
    confusion = np.array([[3, 1, 0], [0, 2, 1], [1, 0, 2]])
    # class 0: TP 3, TN 2+1+0+2 = 5 -> 8/10; class 1: TP 2, TN 3+0+1+2 = 6 -> 8/10; class 2: TP 2, TN 3+1+0+2 = 6 -> 8/10
    assert float(ovr_accuracy(confusion)) == pytest.approx(0.8)
    # in general 1 - 2 (1 - top-1) / C
    rng = np.random.default_rng(0)
    for _ in range(20):
        c = int(rng.integers(2, 6))
        m = rng.integers(0, 20, size=(c, c))
        assert float(ovr_accuracy(m)) == pytest.approx(1 - 2 * (1 - float(accuracy(m))) / c)
    batch = rng.integers(0, 9, size=(7, 3, 3))
    assert ovr_accuracy(batch).shape == (7,)


def _predictions(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 3, n)
    wrong = rng.random(n) < 0.25
    predictions = np.where(wrong, (targets + rng.integers(1, 3, n)) % 3, targets)
    return targets, predictions


def test_intervals_contain_the_estimate_and_narrow_as_the_test_set_grows():
    widths = {}
    for n in (40, 160, 640):
        targets, predictions = _predictions(n)
        intervals = metric_intervals(targets, predictions, 3, n_resamples=10_000, seed=1)
        assert set(intervals) == set(METRICS)
        for name, iv in intervals.items():
            assert iv.low <= iv.estimate <= iv.high, name
            assert iv.n_resamples == 10_000 and iv.confidence == 0.95
        widths[n] = {name: iv.high - iv.low for name, iv in intervals.items()}
        assert intervals["top1_accuracy"].estimate == pytest.approx(
            float(np.mean(targets == predictions))
        )
    for name in METRICS:
        assert widths[160][name] < widths[40][name] and widths[640][name] < widths[160][name], name
        # the width falls about as 1 / sqrt(n): four times the images, about half the width
        assert 0.35 < widths[640][name] / widths[160][name] < 0.65, name


def test_intervals_are_seeded():
    targets, predictions = _predictions(50)
    a = metric_intervals(targets, predictions, 3, n_resamples=2000, seed=4)["f1"]
    b = metric_intervals(targets, predictions, 3, n_resamples=2000, seed=4)["f1"]
    assert (a.low, a.high) == (b.low, b.high)
    with pytest.raises(ValueError, match="50 targets, 49 predictions"):
        metric_intervals(targets, predictions[:-1], 3)


def test_gflops_of_a_convolution_by_hand():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    # conv: 2 x (8 x 3 x 9) x (20 x 30) multiply-adds; linear: 2 x 8 x 2 (+ nothing for the bias)
    expected = (2 * 8 * 3 * 9 * 20 * 30 + 2 * 8 * 2) / 1e9
    assert forward_gflops(model, 20, 30) == pytest.approx(expected)


def test_gflops_fall_with_the_square_of_the_magnification():
    model = create_resdist_model(num_classes=3)
    at_10x = forward_gflops(model, 1024, 768)
    at_2_5x = forward_gflops(model, 256, 192)
    at_0_625x = forward_gflops(model, 64, 48)
    # the meta-device count equals histokd's real-forward MAC count, doubled
    from histokd.models.profile import macs_full

    assert at_10x == pytest.approx(2 * macs_full(model, (1024, 768)) / 1e9, rel=1e-9)
    assert 7.5 < at_10x < 8.0  # about 1.3 GMAC per 512 x 512 pixels
    assert 15.0 < at_10x / at_2_5x < 16.5
    assert 14.0 < at_2_5x / at_0_625x < 17.0
    # counted on the meta device: the weights are untouched and still on the CPU
    assert (
        next(model.parameters()).device.type == "cpu"
        and torch.isfinite(next(model.parameters())).all()
    )


def _evaluation(method: str, mag: float, accuracy: float) -> ModelEvaluation:
    metrics = {
        name: BootstrapInterval(estimate=accuracy - 0.01 * i, low=accuracy - 0.05 - 0.01 * i, high=accuracy + 0.04 - 0.01 * i,
                                confidence=0.95, n_resamples=10_000, method="percentile")
        for i, name in enumerate(METRICS)
    }  # fmt: skip
    gflops = 2.0 * (mag / 10) ** 2
    return ModelEvaluation(
        method,
        mag,
        f"{method}-{mag:g}x",
        f"/runs/{method}/model.pt",
        40,
        metrics,
        gflops,
        gflops * 1.1,
        (100, 120),
    )


EVALUATIONS = [
    _evaluation("teacher", 10.0, 0.87),
    _evaluation("baseline", 1.25, 0.79),
    _evaluation("KD", 1.25, 0.81),
    _evaluation("KD (AD)", 1.25, 0.83),
    _evaluation("baseline", 0.625, 0.70),
    _evaluation("KD", 0.625, 0.70),
]


def test_markdown_layout_as_in_the_paper():
    text = markdown_table(EVALUATIONS, "celiac disease")
    lines = text.splitlines()
    assert "## Teacher (Table 5)" in text and "| Accuracy | 87.00 (82.00–91.00) |" in text
    header = next(line for line in lines if line.startswith("| | baseline"))
    assert header == "| | baseline | KD | KD (AD) |"
    # magnifications from low to high, with their pixel size
    assert text.index("mag = 0.625x (16 µm/pixel)") < text.index("mag = 1.25x (8 µm/pixel)")
    block = lines[lines.index(next(line for line in lines if "mag = 1.25x" in line)) + 1]
    assert (
        block
        == "| Accuracy | 79.00 (74.00–83.00) | 81.00 (76.00–85.00) | **83.00 (78.00–87.00)** |"
    )
    # a tie marks nothing; a missing method shows a dash
    tied = lines[lines.index(next(line for line in lines if "mag = 0.625x" in line)) + 1]
    assert tied == "| Accuracy | 70.00 (65.00–74.00) | 70.00 (65.00–74.00) | - |"
    assert "| GFLOPs | 0.0312 | 0.0312 | 0.0312 |" in text


def test_files(tmp_path):
    files = write_tables(EVALUATIONS, tmp_path, "demo")
    rows = list(csv.DictReader(open(files["csv"])))
    assert len(rows) == len(EVALUATIONS) * len(METRICS)
    first = rows[0]
    assert (
        first["method"] == "teacher"
        and float(first["magnification"]) == 10.0
        and float(first["um_per_pixel"]) == 1.0
    )
    assert float(first["ci_low"]) <= float(first["estimate"]) <= float(first["ci_high"])
    chart = write_chart(EVALUATIONS, tmp_path / "chart.png", "demo")
    with Image.open(chart) as image:
        assert image.size == (900, 552)
