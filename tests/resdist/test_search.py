"""Ray Tune over the student's magnification and the temperature."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from histokd.resdist.config import DistillSearchConfig
from histokd.resdist.search import build_param_space


@pytest.fixture(scope="module")
def teacher_file(tiny_demo) -> str:
    """An untrained 10x teacher with the demo's classes (the search needs a model, not a good one)."""
    import torch

    from histokd.resdist.job import training_stats
    from histokd.resdist.model import create_resdist_model, save_model_file

    torch.manual_seed(0)
    region_set = tiny_demo["region_set"]
    mean, std = training_stats(region_set, ["train"], 10.0)
    meta = {"backbone": "resdist_resnet", "num_classes": 3, "magnification": 10.0, "method": "teacher",
            "class_names": list(region_set.class_names), "mean": mean, "std": std, "input_size": 64}  # fmt: skip
    return str(
        save_model_file(
            tiny_demo["storage"] / "search-teacher" / "model.pt",
            create_resdist_model(num_classes=3),
            meta,
        )
    )


def _config(tiny_demo, teacher_file, **extra) -> DistillSearchConfig:
    settings = dict(
        data=str(tiny_demo["table"]), storage_path=str(tiny_demo["storage"]), magnifications=tiny_demo["magnifications"],
        min_region_area_um2=5000.0, teacher=teacher_file, epochs=1, accumulation_steps=2, num_workers=1,
        searched_magnifications=[1.25], temperatures=[1.0, 4.0], score_splits=["test"],
    )  # fmt: skip
    settings.update(extra)
    return DistillSearchConfig(**settings)


def test_grid_over_magnification_and_temperature(tiny_demo, teacher_file):
    config = _config(tiny_demo, teacher_file, searched_magnifications=[2.5, 1.25])
    space = build_param_space(config)
    assert space["magnification"] == {"grid_search": [2.5, 1.25]}
    assert space["temperature"] == {"grid_search": [1.0, 4.0]}
    assert (
        config.distill_fields()["teacher"] == teacher_file
        and "temperatures" not in config.distill_fields()
    )
    with pytest.raises(ValueError, match="searched_magnifications"):
        _config(tiny_demo, teacher_file, searched_magnifications=[3.0])
    with pytest.raises(ValueError, match="score='auc'"):
        _config(tiny_demo, teacher_file, score="auc")
    with pytest.raises(ValueError, match="num_workers=0"):
        _config(tiny_demo, teacher_file, num_workers=0)


@pytest.mark.slow
def test_tune_runs_one_distillation_per_trial(tiny_demo, teacher_file, ray_cluster):
    from histokd.resdist.search import run_search

    config = _config(tiny_demo, teacher_file, run_name="t-search")
    rows = run_search(config)
    assert sorted(r["temperature"] for r in rows) == [1.0, 4.0]
    assert all(r["magnification"] == 1.25 for r in rows)
    assert rows[0]["top1_accuracy"] >= rows[-1]["top1_accuracy"]  # best first
    for row in rows:
        assert Path(row["model_path"]).is_file() and 0 <= row["top1_accuracy"] <= 1
    table = list(csv.DictReader(open(Path(config.run_dir) / "search.csv")))
    assert len(table) == 2


def test_single_magnification_and_temperature_are_refused(
    tiny_demo, teacher_file, capsys, monkeypatch
):
    from histokd.cli import parse_config
    from histokd.resdist.config import DistillConfig

    base = ["--data", str(tiny_demo["table"]), "--storage-path", str(tiny_demo["storage"]), "--teacher", teacher_file,
            "--magnifications", "10", "2.5", "--searched-magnifications", "2.5", "--temperatures", "1", "4"]  # fmt: skip
    # every trial takes both from the grid: a single value would be silently ignored
    with pytest.raises(
        SystemExit,
        match=r"magnification=5\.0: a search takes every trial's magnification .* --searched-magnifications",
    ):
        parse_config(DistillSearchConfig, [*base, "--magnification", "5"])
    with pytest.raises(
        SystemExit,
        match=r"temperature=2\.0: a search takes every trial's temperature .* --temperatures",
    ):
        parse_config(DistillSearchConfig, [*base, "--temperature", "2"])
    with pytest.raises(
        SystemExit, match=r"searched_magnifications=1\.25: not among magnifications"
    ):
        parse_config(DistillSearchConfig, [*base, "--searched-magnifications", "2.5", "1.25"])
    # without them: a grid whose magnifications lack DistillConfig's default 1.25x is fine, and
    # each trial's distillation gets the grid's values
    config = parse_config(DistillSearchConfig, base)
    assert (config.magnification, config.temperature) == (None, None)
    trials = [DistillConfig(**dict(config.distill_fields(), magnification=m, temperature=t))
              for m in build_param_space(config)["magnification"]["grid_search"]
              for t in build_param_space(config)["temperature"]["grid_search"]]  # fmt: skip
    assert [(c.magnification, c.temperature, c.teacher) for c in trials] == [
        (2.5, 1.0, teacher_file),
        (2.5, 4.0, teacher_file),
    ]
    monkeypatch.setenv(
        "COLUMNS", "1000"
    )  # one line per flag: no wrapping inside --searched-magnifications
    with pytest.raises(SystemExit):
        parse_config(DistillSearchConfig, ["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert (
        "--magnification MAGNIFICATION not used (giving it is an error): every trial's student magnification comes from --searched-magnifications"
        in help_text
    )
    assert (
        "--temperature TEMPERATURE not used (giving it is an error): every trial's temperature comes from --temperatures"
        in help_text
    )
