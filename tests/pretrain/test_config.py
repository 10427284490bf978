"""Bad pretraining settings fail before any cluster work, naming the field."""

from __future__ import annotations

import pytest

from histokd.cli import parse_config
from histokd.pretrain.config import DEMO_PRESET, PretrainConfig
from histokd.run import check_storage_path


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"patch_size": 0}, "patch_size=0: must be a positive integer"),
        ({"epochs": -1}, "epochs=-1: must be a positive integer"),
        ({"epochs": 0}, "epochs=0: must be a positive integer"),
        ({"warmup_epochs": -1}, "warmup_epochs=-1: must be a non-negative integer"),
        ({"backbone": "vgg99"}, "backbone='vgg99': unknown; allowed: csat"),
        (
            {"teacher": "nonsense"},
            "teacher='nonsense': neither a teacher name nor a model folder; allowed:",
        ),
        ({"alpha": 1.5}, r"alpha=1.5: must be in \(0, 1\]"),
        ({"warmup_epochs": 20, "epochs": 10}, "warmup_epochs=20: must be at most epochs=10"),
        ({"run_name": "a/b"}, "run_name='a/b'"),
        (
            {"trainer_resources": {"trainer_node": -1}},
            "trainer_resources=.*'trainer_node' must be a non-negative number",
        ),
        (
            {"teacher_resources": {"GPU": 1}},
            "teacher_resources=.*'GPU' is not a custom resource; set cpus_per_worker, teacher_gpus",
        ),
        ({"teacher_resources": "{teacher_node: 1}"}, "teacher_resources=.*not JSON"),
        ({"trainer_resources": [1]}, r"trainer_resources=\[1\]: must be a mapping"),
        ({"record_format": "webp"}, "record_format='webp': allowed: jpeg, png"),
        ({"jpeg_quality": 101}, r"jpeg_quality=101: must be an integer in \[1, 100\]"),
        (
            {"record_cache": "s3://bucket/records"},
            "record_cache='s3://bucket/records': must be a folder",
        ),
        (
            {"teacher_placement": "trainer", "record_format": "png"},
            "record_format='png': a setting of the record cache, which teacher_placement='trainer' does not keep",
        ),
    ],
)
def test_bad_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PretrainConfig(**kwargs)


def test_unreachable_storage_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="storage_path=.*cannot be written"):
        check_storage_path(str(blocker / "runs"))
    check_storage_path(str(tmp_path / "ok"))  # a writable one passes


def test_paper_defaults():
    c = PretrainConfig()
    assert (c.magnification, c.patch_size, c.num_patches, c.input_size) == (
        20.0,
        1024,
        400_000,
        512,
    )
    assert (c.batch_size, c.epochs, c.warmup_epochs, c.alpha, c.backbone) == (
        64,
        100,
        10,
        0.5,
        "csat",
    )
    assert c.teacher == "2D_versatile_he"


def test_cli_precedence(tmp_path, capsys):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("epochs: 17\nbatch_size: 8\n")
    c = parse_config(
        PretrainConfig,
        ["--config", str(yaml_file), "--batch-size", "4", "--slides", "a.svs", "b.svs"],
        presets={"demo": DEMO_PRESET},
        default_preset=lambda v: None if v.get("slides") else "demo",
    )
    assert (c.epochs, c.batch_size, c.slides, c.patch_size) == (17, 4, ["a.svs", "b.svs"], 1024)
    demo = parse_config(
        PretrainConfig,
        [],
        presets={"demo": DEMO_PRESET},
        default_preset=lambda v: None if v.get("slides") else "demo",
    )
    assert demo.teacher == "demo" and demo.patch_size == DEMO_PRESET["patch_size"]
    with pytest.raises(SystemExit, match="patch_size=0"):
        parse_config(PretrainConfig, ["--patch-size", "0"])
    yaml_file.write_text("epochz: 3\n")
    with pytest.raises(SystemExit, match=r"unknown field 'epochz'"):
        parse_config(PretrainConfig, ["--config", str(yaml_file)])


def test_record_cache_flags(tmp_path, monkeypatch):
    """The record cache's flags; a relative folder is made absolute, and the default is
    ``records/`` in the run folder."""
    from histokd.pretrain.job import _record_cache_dir

    monkeypatch.chdir(tmp_path)
    c = parse_config(PretrainConfig, ["--slides", "a.svs", "--storage-path", "runs", "--record-cache",
                                      "shared/records", "--record-format", "png", "--jpeg-quality", "90"])  # fmt: skip
    assert (c.record_cache, c.record_format, c.jpeg_quality) == (
        str(tmp_path / "shared" / "records"),
        "png",
        90,
    )
    assert _record_cache_dir(c) == str(tmp_path / "shared" / "records")
    default = PretrainConfig(slides=["a.svs"], storage_path=str(tmp_path / "runs"))
    assert (default.record_cache, default.record_format, default.jpeg_quality) == (None, "jpeg", 95)
    assert _record_cache_dir(default) == str(tmp_path / "runs" / "rckd" / "records")


def test_custom_resources_from_yaml_and_flags(tmp_path):
    """A YAML mapping or a JSON flag (the flag overrides), as floats; empty by default."""
    assert PretrainConfig().teacher_resources == {} and PretrainConfig().trainer_resources == {}
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "teacher_resources:\n  teacher_node: 1\ntrainer_resources:\n  trainer_node: 2\n"
    )
    c = parse_config(
        PretrainConfig, ["--config", str(yaml_file), "--trainer-resources", '{"trainer_node": 0.5}']
    )
    assert c.teacher_resources == {"teacher_node": 1.0} and c.trainer_resources == {
        "trainer_node": 0.5
    }
    with pytest.raises(SystemExit, match="trainer_resources='nope': not JSON"):
        parse_config(PretrainConfig, ["--trainer-resources", "nope"])


def test_training_worker_resources_share_a_gpu_with_a_teacher_actor():
    from histokd.pretrain.job import _worker_resources

    cpu = PretrainConfig(cpus_per_worker=2.0)
    assert _worker_resources(cpu, use_gpu=False, gpus=0) == {"CPU": 2.0}
    shared = PretrainConfig(teacher_gpus=0.25, trainer_resources={"trainer_node": 1})
    resources = _worker_resources(shared, use_gpu=True, gpus=8)
    assert resources == {
        "trainer_node": 1,
        "CPU": 1.0,
        "GPU": 0.75,
    }  # with a 0.25 teacher actor: one GPU
    whole = PretrainConfig(teacher_gpus=1.0)  # teachers and trainers on separate GPUs
    assert _worker_resources(whole, use_gpu=True, gpus=8)["GPU"] == 1.0


def test_teacher_settings_reach_the_teacher(tmp_path):
    """Flags, and a check_teacher settings file, become the teacher's keyword arguments."""
    import json

    from histokd.teachers import build_teacher

    config = PretrainConfig(
        teacher="demo", magnification=20, teacher_normalization="per_channel", teacher_mpp=0.25
    )
    kwargs = config.teacher_kwargs()
    assert (
        kwargs["patch_mpp"],
        kwargs["normalization"],
        kwargs["teacher_mpp"],
        kwargs["backend"],
    ) == (0.5, "per_channel", 0.25, "torch")
    teacher = build_teacher("demo", **kwargs)
    assert (teacher.scale, teacher.normalization) == (2.0, "per_channel")
    settings = tmp_path / "histokd_teacher.json"
    settings.write_text(
        json.dumps(
            {
                "alpha": 0.15,
                "normalization": "joint",
                "percentiles": [2, 99],
                "teacher_mpp": 0.5,
                "check_iou": 0.9,
            }
        )
    )
    config = PretrainConfig(
        teacher="demo",
        magnification=10,
        teacher_settings=str(settings),
        teacher_normalization="per_channel",
    )
    teacher = build_teacher("demo", **config.teacher_kwargs())
    assert (teacher.alpha, teacher.normalization, teacher.percentiles, teacher.scale) == (
        0.15,
        "joint",
        (2.0, 99.0),
        2.0,
    )
    assert (
        build_teacher(
            "deconvolution", **PretrainConfig(teacher="deconvolution").teacher_kwargs()
        ).alpha
        == 0.5
    )
    (tmp_path / "bad.json").write_text("{}")
    for path, message in [
        (tmp_path / "none.json", "cannot read it"),
        (tmp_path / "bad.json", "holds none of alpha"),
    ]:
        with pytest.raises(ValueError, match=f"teacher_settings=.*{message}"):
            PretrainConfig(teacher_settings=str(path))
    with pytest.raises(ValueError, match="teacher_mpp=0: must be a pixel size"):
        PretrainConfig(teacher_mpp=0)
    with pytest.raises(ValueError, match="empty_slide_fraction=0"):
        PretrainConfig(empty_slide_fraction=0)


def test_augmentation_flags():
    from histokd.pretrain.config import AUGMENT_DEFAULT

    c = PretrainConfig()
    assert c.augment == list(AUGMENT_DEFAULT) == ["flip", "rot90", "hed"]  # today's, plus HED
    assert (c.augment_device, c.hed_sigma) == ("auto", 0.05)
    c = parse_config(PretrainConfig, ["--augment", "none"])
    assert c.augment == []
    c = parse_config(PretrainConfig, ["--augment", "hed", "brightness", "--color-jitter", "0.2"])
    assert (c.augment, c.color_jitter) == (["hed", "brightness"], 0.2)
    with pytest.raises(ValueError, match=r"augment=\['warp'\]: unknown augmentation 'warp'"):
        PretrainConfig(augment=["warp"])
    with pytest.raises(ValueError, match=r"color_jitter=1.0: must be >= 0 and < 1"):
        PretrainConfig(color_jitter=1.0)
