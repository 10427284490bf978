"""Job settings: the paper's defaults, and one clear error per bad value."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from histokd.cli import parse_config
from histokd.resdist.config import DemoConfig, DistillConfig, EvaluateConfig, SupervisedConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def table(tmp_path) -> str:
    path = tmp_path / "data.csv"
    path.write_text("slide,split,label\nslide.svs,train,a\n")
    return str(path)


@pytest.fixture
def teacher_file(tmp_path) -> str:
    from histokd.resdist.model import create_resdist_model, save_model_file

    meta = {"backbone": "resdist_resnet", "num_classes": 2, "magnification": 10.0,
            "input_size": 64, "mean": [0.5] * 3, "std": [0.2] * 3}  # fmt: skip
    path = tmp_path / "teacher" / "model.pt"
    return str(save_model_file(path, create_resdist_model(num_classes=2), meta))


def test_paper_defaults(table, teacher_file):
    config = SupervisedConfig(data=table)
    assert config.magnification == 10.0 and config.epochs == 100 and config.lr == 1e-3  # Sec. 4.5.1
    assert (
        config.accumulation_steps == 32 and config.weight_decay == 1e-4 and config.lr_gamma == 1.0
    )  # public code
    assert (config.brightness, config.contrast, config.saturation, config.hue) == (
        0.5,
        0.5,
        0.5,
        0.2,
    )
    assert config.magnifications == [10.0, 5.0, 2.5, 1.25, 0.625]
    assert config.backbone == "resdist_resnet" and config.num_groups == 32
    assert (config.num_workers, config.max_failures, config.mlflow_experiment) == (
        None, 3, "histokd-resdist")  # fmt: skip
    kd = DistillConfig(data=table, teacher=str(Path(teacher_file).parent))  # a run folder works too
    assert kd.teacher == teacher_file
    assert (
        kd.temperature == 1.0
        and kd.resize_modes == ["maxpool", "bicubic"]
        and not kd.public_code_maxpool_only
    )
    assert (
        kd.train_splits == ["train", "val"] and kd.method_name == "KD" and not kd.do_finetune
    )  # Sec. 4.5.3
    aux = DistillConfig(data=table, teacher=teacher_file, train_splits=["aux"])
    assert aux.method_name == "KD (AD)" and aux.do_finetune  # Sec. 3.4, 4.5.4
    assert (
        DistillConfig(
            data=table, teacher=teacher_file, train_splits=["aux"], finetune="no"
        ).do_finetune
        is False
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs=0"),
        ("accumulation_steps", 1.5, "accumulation_steps=1.5"),
        ("lr", 0.0, "lr=0.0"),
        ("hue", 0.7, r"hue=0.7: must be in \[0, 0.5\]"),
        ("magnification", 3.0, "magnification=3.0: not among magnifications"),
        ("train_splits", ["dev"], "split 'dev'"),
        ("select", "first", "select='first'"),
        ("backbone", "resnet_9000", "backbone='resnet_9000'"),
        ("min_region_area_um2", -5.0, "min_area_um2"),
        ("run_name", "a/b", "run_name='a/b'"),
        ("num_workers", -1, "num_workers=-1"),
        ("cpus_per_worker", 0.0, "cpus_per_worker=0.0"),
        ("storage_path", "s3://bucket/runs", "shared file system"),
    ],
)
def test_bad_supervised_values(table, field, value, message):
    with pytest.raises(ValueError, match=message):
        SupervisedConfig(data=table, **{field: value})


def test_bad_distill_values(table, teacher_file, tmp_path):
    with pytest.raises(ValueError, match="teacher: give"):
        DistillConfig(data=table)
    with pytest.raises(ValueError, match="no such model file"):
        DistillConfig(data=table, teacher=str(tmp_path / "none.pt"))
    with pytest.raises(ValueError, match="temperature=0"):
        DistillConfig(data=table, teacher=teacher_file, temperature=0)
    with pytest.raises(ValueError, match="resize_modes"):
        DistillConfig(data=table, teacher=teacher_file, resize_modes=["area"])
    with pytest.raises(ValueError, match="data: give"):
        SupervisedConfig()
    with pytest.raises(ValueError, match="no such file"):
        SupervisedConfig(data=str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match="model: '.*x.pt' is neither"):
        EvaluateConfig(model=["x.pt"], data=table)
    with pytest.raises(ValueError, match="labelled_slides=3"):
        DemoConfig(labelled_slides=3, val_slides=1, test_slides=2)
    with pytest.raises(ValueError, match="student_magnifications"):
        DemoConfig(student_magnifications=[10.0])


def test_command_line_and_yaml(table, teacher_file, tmp_path, capsys):
    config_file = tmp_path / "kd.yaml"
    config_file.write_text(yaml.safe_dump({"temperature": 4.0, "train_splits": ["aux"]}))
    config = parse_config(
        DistillConfig,
        [
            "--data",
            table,
            "--teacher",
            teacher_file,
            "--config",
            str(config_file),
            "--magnification",
            "0.625",
        ],
    )
    assert (
        config.temperature == 4.0
        and config.train_splits == ["aux"]
        and config.magnification == 0.625
    )
    # the old flag names work for one release, with a notice
    old = ["--data", table, "--teacher", teacher_file, "--arch", "resnet18"]
    assert parse_config(DistillConfig, old).backbone == "resnet18"
    assert "deprecated" in capsys.readouterr().err
    evaluate = parse_config(EvaluateConfig, ["--data", table, "--models", teacher_file, "--n-resamples", "7"])  # fmt: skip
    assert (evaluate.model, evaluate.bootstrap_resamples) == ([teacher_file], 7)
    demo = parse_config(DemoConfig, ["--n-resamples", "9"])
    assert (demo.bootstrap_resamples, demo.run_name) == (9, "resdist-demo")
    with pytest.raises(SystemExit, match="temperature=-1.0"):
        parse_config(
            DistillConfig, ["--data", table, "--teacher", teacher_file, "--temperature", "-1"]
        )


@pytest.mark.parametrize(
    "job",
    ["resdist_teacher", "resdist_distill", "resdist_evaluate", "resdist_tune", "resdist_demo"],
)
def test_jobs_show_their_help(job, capsys):
    spec = importlib.util.spec_from_file_location(job, REPO / "jobs" / f"{job}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--storage-path" in out and "--run-name" in out


def test_help_imports_no_torch_timm_or_ray():
    import subprocess
    import sys

    heavy = ("torch", "timm", "ray", "tensorflow")
    for job in (
        "resdist_teacher",
        "resdist_distill",
        "resdist_evaluate",
        "resdist_tune",
        "resdist_demo",
    ):
        code = (f"import runpy, sys\nsys.argv = ['job', '--help']\ntry:\n"
                f"    runpy.run_path({str(REPO / 'jobs' / f'{job}.py')!r}, run_name='__main__')\n"
                f"except SystemExit:\n    print([m for m in {heavy!r} if m in sys.modules])")  # fmt: skip
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip().endswith("[]"), (job, out.stdout[-200:], out.stderr[-500:])
