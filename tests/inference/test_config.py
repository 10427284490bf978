"""The job's settings: flags parse into the config; bad values name the field and what is allowed."""

from __future__ import annotations

import pytest

from histokd.cli import parse_config
from histokd.inference import PredictConfig


def test_flags_parse(tmp_path, classification_model_file):
    config = parse_config(PredictConfig, [
        "--model", str(classification_model_file), "--slides", "a.svs", "b/", "--magnification", "20", "--patch-size", "512",
        "--overlap", "auto", "--tissue-hue-range", "0", "360", "--class-names", "x", "y", "z", "--storage-path", str(tmp_path),
        "--no-overwrite", "--num-gpus", "0.5",
    ])  # fmt: skip
    assert (
        config.slides == ["a.svs", "b/"]
        and config.magnification == 20.0
        and config.patch_size == 512
    )
    assert config.overlap is None and config.tissue_filter().hue_range == (0.0, 360.0)
    assert config.class_names == ["x", "y", "z"] and config.gpus_per_worker == 0.5
    assert config.run_dir == str(tmp_path / "predict")
    assert config.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("overlap", 1.0, r"overlap=1.0: must be in \[0, 1\) or None \(auto\)"),
        ("blend", "gauss", r"blend='gauss': allowed: cosine, linear, none"),
        ("magnification", 0, r"magnification=0: must be positive"),
        ("patch_size", 12.5, r"patch_size=12.5: must be a positive integer or None"),
        ("min_tissue_fraction", 1.5, r"min_tissue_fraction=1.5: must be in \[0, 1\]"),
        ("tissue_hue_range", [10.0], r"tissue_hue_range=\[10.0\]: give two hues"),
        (
            "tissue_hue_range",
            [10.0, 400.0],
            r"tissue_hue_range=\[10.0, 400.0\]: .*within \[0, 360\]",
        ),
        (
            "gpus_per_worker",
            1.5,
            r"gpus_per_worker=1.5: the GPU share of an actor must be in \(0, 1\]",
        ),
        ("batch_size", 0, r"batch_size=0: must be a positive integer"),
        ("run_name", "a/b", r"run_name='a/b': must be 1-128 characters of letters, digits"),
        ("model", "/nope/best_model.pt", r"model='/nope/best_model.pt': no such file or folder"),
        ("output_magnification", -1, r"output_magnification=-1: must be positive"),
        ("stain_norm", "reinhard", r"stain_norm='reinhard': allowed: model, none, macenko"),
        (
            "stain_reference",
            "/x.png",
            r"stain_reference='/x.png' is for stain_norm='macenko', not 'model'",
        ),
    ],
)
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        PredictConfig(**{field: value})


def test_mpp_and_assume_mpp_convert_to_magnifications():
    config = parse_config(PredictConfig, ["--mpp", "0.25", "--assume-mpp", "0.5"])
    assert (config.mpp, config.magnification) == (0.25, 40.0)
    assert (config.assume_mpp, config.base_magnification) == (0.5, 20.0)
    config = parse_config(PredictConfig, ["--base-magnification", "40"])
    assert (config.magnification, config.assume_mpp, config.base_magnification) == (None, 0.25, 40)
    with pytest.raises(
        ValueError, match="mpp=0.25 and magnification=20.0 disagree: 20x is 0.5 um/px"
    ):
        PredictConfig(mpp=0.25, magnification=20.0)
