"""Fine-tuning settings: the paper's defaults, clear errors, and the jobs' command lines."""

import importlib.util
from pathlib import Path

import pytest
import yaml

from histokd.finetune.config import FinetuneConfig

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_rckds(tmp_path):
    c = FinetuneConfig(storage_path=str(tmp_path))
    assert (c.input_size, c.lr, c.positional_encoding) == (384, 1e-4, "frozen")  # Sec. 3.1
    assert (c.batch_size, c.epochs, c.patience) == (64, 200, 20)
    assert (c.focal_alpha, c.focal_gamma) == (0.25, 2.0)  # Eq. 5
    assert (c.num_splits, c.split_ratios) == (5, [0.6, 0.2, 0.2])  # Algorithm 2, Sec. 2.1.2
    assert c.init_name == "Random Weight"
    assert c.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"backbone": "vit_b"}, "backbone='vit_b': unknown; allowed: csat"),
        ({"init": "/no/such.pth"}, "init='/no/such.pth': no such file"),
        (
            {"positional_encoding": "learned"},
            "positional_encoding='learned': allowed: frozen, trained",
        ),
        ({"split_ratios": [0.6, 0.0, 0.4]}, "split_ratios=.*train, val > 0"),
        ({"input_size": 16}, "input_size=16: must be at least 32"),
        ({"lr": 0}, "lr=0: must be positive"),
        ({"run_name": "a/b"}, "run_name='a/b'"),
        ({"data": "/no/such/folder"}, "data='/no/such/folder': no such folder"),
    ],
)
def test_bad_values_name_field_value_and_allowed(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(storage_path=str(tmp_path), **overrides)


def test_init_labels(tmp_path, backbone_file):
    assert FinetuneConfig(storage_path=str(tmp_path), init=str(backbone_file)).init_name == "RCKD"
    timm_init = FinetuneConfig(
        storage_path=str(tmp_path), init=f"timm:{backbone_file}", init_label="SPT on ImageNet"
    )
    assert timm_init.init == f"timm:{backbone_file}" and timm_init.init_name == "SPT on ImageNet"


def _job(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("job", ["finetune", "tune_finetune", "compare_pretraining"])
def test_jobs_print_the_resolved_config_with_the_demo_preset(job, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _job(job).main(["--storage-path", str(tmp_path), "--print-config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    config = yaml.safe_load(
        printed[printed.index("\n") + 1 :]
    )  # after the "preset 'demo': ..." line
    assert printed.startswith("preset 'demo'") and config["storage_path"] == str(tmp_path)
    job_config = config.get("finetune", config)  # a search holds the fine-tuning's config
    assert job_config["input_size"] == 96 and job_config["storage_path"] == str(tmp_path)


def test_job_flag_errors_name_the_field(tmp_path, capsys):
    with pytest.raises(SystemExit, match="lr=-1.0: must be positive"):
        _job("finetune").main(["--storage-path", str(tmp_path), "--lr", "-1"])
    with pytest.raises(SystemExit) as exit_info:
        _job("tune_finetune").main(["--storage-path", str(tmp_path), "--scheduler", "pbt"])
    assert (
        exit_info.value.code == 2
        and "--scheduler: invalid choice: 'pbt'" in capsys.readouterr().err
    )


def test_augmentation_and_stain_flags(tmp_path):
    from histokd.cli import parse_config
    from histokd.finetune.config import AUGMENT_DEFAULT

    c = FinetuneConfig(storage_path=str(tmp_path))
    assert c.augment == list(AUGMENT_DEFAULT) and "hed" not in c.augment  # HED is opt-in
    assert (c.augment_device, c.hed_sigma, c.stain_norm, c.stain_reference) == (
        "auto",
        0.05,
        "none",
        None,
    )
    assert FinetuneConfig(storage_path=str(tmp_path), augment=False).augment == []  # the old switch
    tile = REPO.parent / "shared" / "testdata" / "tiles" / "high-nuclei-score-level0.png"
    c = parse_config(FinetuneConfig, ["--storage-path", str(tmp_path), "--augment", "flip", "hed",
                                      "--hed-sigma", "0.1", "--augment-device", "device",
                                      "--stain-norm", "macenko", "--stain-reference", str(tile)])  # fmt: skip
    assert (c.augment, c.hed_sigma, c.augment_device) == (["flip", "hed"], 0.1, "device")
    assert (c.stain_norm, c.stain_reference) == ("macenko", str(tile))
    assert (
        parse_config(FinetuneConfig, ["--storage-path", str(tmp_path), "--augment", "none"]).augment
        == []
    )
    bad = [
        ({"augment": ["flip", "blur"]}, r"augment=\['flip', 'blur'\]: unknown augmentation 'blur'; allowed: flip"),
        ({"hed_sigma": 1.5}, r"hed_sigma=1.5: must be >= 0 and < 1"),
        ({"hue_jitter": 0.6}, r"hue_jitter=0.6: must be >= 0 and <= 0.5"),
        ({"augment_device": "gpu"}, r"augment_device='gpu': allowed: auto, cpu, device"),
        ({"stain_norm": "reinhard"}, r"stain_norm='reinhard': allowed: none, macenko"),
        ({"stain_reference": str(tile)}, r"stain_reference=.* is for stain_norm='macenko', not 'none'"),
        ({"stain_norm": "macenko", "stain_reference": "/no/tile.png"}, r"stain_reference='/no/tile.png': no such image file"),
    ]  # fmt: skip
    for overrides, message in bad:
        with pytest.raises(ValueError, match=message):
            FinetuneConfig(storage_path=str(tmp_path), **overrides)
