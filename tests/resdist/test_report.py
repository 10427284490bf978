"""Tables 5-8 and Fig. 3 from evaluations."""

from __future__ import annotations

import csv

from histokd.metrics import BootstrapInterval
from histokd.resdist.evaluation import METRICS, ModelEvaluation
from histokd.resdist.report import markdown_table, write_chart, write_tables


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
    from PIL import Image

    with Image.open(chart) as image:
        assert image.size == (900, 552)
