"""The Ray Tune search (RCKD Sec. 3.1, Fig. 5): space, trial names, table, chart, resume."""

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from histokd.finetune.search import SearchConfig, build_param_space, build_scheduler, run_search


def test_default_space_is_rckds_eight_settings(tmp_path):
    from ray.tune.search.variant_generator import generate_variants

    config = SearchConfig(storage_path=str(tmp_path))
    variants = [v for _, v in generate_variants(build_param_space(config))]
    settings = {(v["input_size"], v["lr"], v["positional_encoding"]) for v in variants}
    assert settings == {
        (r, lr, pe) for r in (224, 384) for lr in (1e-3, 1e-4) for pe in ("frozen", "trained")
    }
    assert config.score_metric == "test_accuracy_mean"
    assert (
        SearchConfig(storage_path=str(tmp_path), finetune={"task": "segmentation"}).score_metric
        == "test_miou_mean"
    )


def test_space_from_yaml(tmp_path):
    from ray import tune

    (tmp_path / "space.yaml").write_text(
        "batch_size: [32, 64]\nlr: {loguniform: [1.0e-5, 1.0e-2]}\nfocal_gamma: {choice: [0, 2]}\n"
    )
    space = build_param_space(
        SearchConfig(storage_path=str(tmp_path), space=str(tmp_path / "space.yaml"))
    )
    assert space["batch_size"] == {"grid_search": [32, 64]}
    assert isinstance(space["lr"], tune.search.sample.Float) and isinstance(
        space["focal_gamma"], tune.search.sample.Categorical
    )
    (tmp_path / "bad.yaml").write_text("learning_rate: [1, 2]\n")
    with pytest.raises(ValueError, match="'learning_rate' is not a fine-tuning field"):
        SearchConfig(storage_path=str(tmp_path), space=str(tmp_path / "bad.yaml"))


def test_asha_scheduler_by_flag(tmp_path):
    from ray.tune.schedulers import ASHAScheduler

    assert build_scheduler(SearchConfig(storage_path=str(tmp_path))) is None
    asha = build_scheduler(
        SearchConfig(storage_path=str(tmp_path), scheduler="asha", grace_period=2)
    )
    assert isinstance(asha, ASHAScheduler)
    assert (asha._max_t, asha._reduction_factor, asha._time_attr) == (5, 2, "training_iteration")
    assert [milestone for milestone, _ in asha._brackets[0]._rungs] == [
        4,
        2,
    ]  # stop points: after 2 and 4 splits


def test_bad_settings_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="metric='accuracy'"):
        SearchConfig(storage_path=str(tmp_path), metric="accuracy")
    with pytest.raises(ValueError, match="positional_encodings: 'learned'"):
        SearchConfig(storage_path=str(tmp_path), positional_encodings=["learned"])
    with pytest.raises(
        ValueError,
        match="num_workers=0: Ray Train's local mode cannot run inside a Tune trial",
    ):
        SearchConfig(storage_path=str(tmp_path), finetune={"num_workers": 0})
    with pytest.raises(ValueError, match="scheduler='hyperband'"):
        SearchConfig(storage_path=str(tmp_path), scheduler="hyperband")


@pytest.mark.slow
def test_tiny_four_trial_search_writes_table_and_chart(ray_cluster, tmp_path, demo_tasks_small):
    import mlflow

    # One split per trial keeps the 4 Ray Train runs (each some 10 s of start-up on 2 CPUs) to
    # a minute or two, all at once on half a CPU each; the whole 2 x 2 x 2 grid of RCKD Sec. 3.1
    # is test_default_space_is_rckds_eight_settings'. Split means: test_job, test_loop.
    config = SearchConfig(
        storage_path=str(tmp_path / "runs"), run_name="tiny", input_sizes=[32], lrs=[1e-2, 1e-3],
        finetune=dict(data=str(demo_tasks_small.classification_dir), batch_size=16, epochs=1, patience=1,
                      num_splits=1, bootstrap_resamples=200, cpus_per_worker=0.5),
    )  # fmt: skip
    result = run_search(config)
    table = pd.read_csv(result.files["csv"])
    assert len(table) == 4 and (table["num_splits"] == 1).all()
    assert set(
        zip(table["input_size"], table["lr"], table["positional_encoding"], strict=True)
    ) == {(32, lr, pe) for lr in (1e-2, 1e-3) for pe in ("frozen", "trained")}
    assert table["accuracy_mean"].is_monotonic_decreasing  # best first
    assert (
        table["accuracy_mean"].between(0, 1).all()
        and (table["accuracy_ci_low"] <= table["accuracy_mean"]).all()
    )
    markdown = Path(result.files["markdown"]).read_text()
    assert markdown.count("\n| ") == 5  # header + 4 trials
    assert Image.open(result.files["chart"]).size[0] > 600
    # trials are named by id, no timestamps, and each trial's splits live under it
    experiment = Path(result.experiment_path)
    trial_dirs = sorted(p.name for p in experiment.iterdir() if p.is_dir() and p.name != "trials")
    assert trial_dirs == sorted(table["trial_id"]) and all(
        len(name.split("_")) == 2 for name in trial_dirs
    )
    for trial_id in table["trial_id"]:
        summary = json.loads(
            (experiment / "trials" / f"tiny-{trial_id}" / "summary.json").read_text()
        )
        assert summary["num_splits"] == 1
    client = mlflow.MlflowClient(tracking_uri=config.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "search_results.csv",
        "search_results.md",
        "search_results.png",
    }
    assert run.data.metrics["trials_finished"] == 4

    again = run_search(config)  # the same name restores the finished experiment: nothing retrains
    assert sorted(r["trial_id"] for r in again.rows) == sorted(table["trial_id"])


def test_searched_lists_take_precedence_over_single_flags(tmp_path, capsys, monkeypatch):
    from ray.tune.search.variant_generator import generate_variants

    from histokd.cli import config_to_dict, parse_config
    from histokd.finetune.config import FinetuneConfig

    def trial_settings(config):  # what tune_trial builds each trial's fine-tuning from
        out = set()
        for _, variant in generate_variants(build_param_space(config)):
            trial = FinetuneConfig(**dict(config_to_dict(config.finetune), **variant))
            out.add((trial.input_size, trial.lr, trial.positional_encoding, trial.batch_size))
        return out

    flags = [
        "--storage-path",
        str(tmp_path),
        "--input-size",
        "64",
        "--lr",
        "0.5",
        "--positional-encoding",
        "trained",
    ]
    config = parse_config(
        SearchConfig,
        [*flags, "--input-sizes", "96", "128", "--lrs", "0.01", "--positional-encodings", "frozen"],
    )
    assert trial_settings(config) == {
        (96, 0.01, "frozen", 64),
        (128, 0.01, "frozen", 64),
    }  # the single flags are ignored
    # with --space, the single flags are the value of the settings the space does not search
    (tmp_path / "space.yaml").write_text("batch_size: [16, 32]\ninput_size: [48]\n")
    config = parse_config(
        SearchConfig, [*flags, "--input-sizes", "96", "--space", str(tmp_path / "space.yaml")]
    )
    assert trial_settings(config) == {(48, 0.5, "trained", 16), (48, 0.5, "trained", 32)}
    # and --help says so
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag
    with pytest.raises(SystemExit) as exit_info:
        parse_config(SearchConfig, ["--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for single, searched in (
        ("--input-size", "--input-sizes"),
        ("--lr", "--lrs"),
        ("--positional-encoding", "--positional-encodings"),
    ):
        entry = help_text.split(f" {searched} ", 1)[1][:300]  # the flag's metavar and help
        assert f"take precedence over {single};" in entry, entry


@pytest.mark.slow
def test_an_interrupted_search_resumes_its_errored_trial(
    ray_cluster, tmp_path, demo_tasks_small, capsys
):
    """A search whose only trial failed is rerun under the same name: Tune restores it and the
    trial finishes (each split's injected fault happens once; the rerun's splits train)."""
    config = SearchConfig(
        storage_path=str(tmp_path / "runs"), run_name="interrupted", input_sizes=[32], lrs=[1e-2],
        positional_encodings=["frozen"],
        finetune=dict(data=str(demo_tasks_small.classification_dir), batch_size=16, epochs=2, patience=2,
                      num_splits=2, bootstrap_resamples=200, cpus_per_worker=0.5, fail_at_epoch=1, max_failures=0),
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="no trial of the search finished"):
        run_search(config)
    markers = sorted(
        (tmp_path / "runs" / "interrupted" / "trials").glob("*/split_*/.fault_injected")
    )
    assert markers, "the fault did not happen"
    result = run_search(config)
    assert "resuming the search" in capsys.readouterr().out
    assert len(result.rows) == 1 and result.rows[0]["num_splits"] == 2
    assert 0 <= result.rows[0]["accuracy_mean"] <= 1
