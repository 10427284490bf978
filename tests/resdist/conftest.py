"""Resolution-distillation fixtures: a tiny demo data table with its region images."""

from __future__ import annotations

from pathlib import Path

import pytest

import histokd  # noqa: F401  (its import hook lets the test modules import timm beside a CPU torch)

MAGNIFICATIONS = [10.0, 2.5, 1.25]


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> dict:
    """Six 1024-px synthetic slides and two auxiliary ones: the demo's data table and region set.

    Returns ``{"table": data.csv, "storage": folder, "region_set": RegionSet, "config": DemoConfig,
    "summary": regions per split and class, "magnifications": those with images}``.
    """
    from histokd.demos.resdist import DemoConfig, make_demo_data
    from histokd.resdist.config import SupervisedConfig
    from histokd.resdist.job import prepare_region_set

    root = tmp_path_factory.mktemp("resdist_demo")
    config = DemoConfig(
        storage_path=str(root / "runs"), demo_dir=str(root / "slides"), labelled_slides=6, aux_slides=2, val_slides=1,
        test_slides=2, slide_size=1024, student_magnifications=[2.5, 1.25], teacher_epochs=1, epochs=1,
        finetune_epochs=1, accumulation_steps=2, bootstrap_resamples=200, min_purity=0.0,
    )  # fmt: skip
    table, summary = make_demo_data(config)
    supervised = SupervisedConfig(
        data=str(table), storage_path=config.storage_path, magnifications=MAGNIFICATIONS, min_region_area_um2=5000.0,
        run_name="teacher", epochs=1, accumulation_steps=2, num_workers=0,
    )  # fmt: skip
    region_set = prepare_region_set(supervised)
    return {
        "table": Path(table), "storage": Path(config.storage_path), "region_set": region_set, "config": config,
        "summary": summary, "magnifications": MAGNIFICATIONS,
    }  # fmt: skip
