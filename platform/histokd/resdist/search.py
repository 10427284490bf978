"""Ray Tune over the student's magnification and the soft-loss temperature.

DiPalma et al. tuned on a separate development set (Sec. 4.2-4.4). Each trial here is a whole
distillation job (:func:`~histokd.resdist.job.run_distill` builds and fits its own
``TorchTrainer``: Ray Train V2 has no ``Tuner(trainer)``), followed by an evaluation of the
student on the scoring splits. Trials are named by their id; rerunning the search's name
restores the Tune experiment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from histokd.resdist.config import SCORES, DistillConfig, DistillSearchConfig
from histokd.run import holds_run_lock

__all__ = ["build_param_space", "run_search", "trial_dirname", "tune_trial"]


def build_param_space(config: DistillSearchConfig) -> dict[str, Any]:
    """The grid: ``magnification`` x ``temperature``."""
    from ray import tune

    return {
        "magnification": tune.grid_search(list(config.searched_magnifications)),
        "temperature": tune.grid_search(list(config.temperatures)),
    }


def trial_dirname(trial) -> str:
    """Trials are named by id (no timestamps), so a restored search finds its trials again."""
    return trial.trial_id


def tune_trial(params: dict[str, Any]) -> None:
    """One trial: distil with the trial's magnification and temperature, then score the student."""
    import ray.tune

    from histokd.resdist.evaluation import evaluate_model
    from histokd.resdist.job import run_distill
    from histokd.resdist.region_set import RegionSet

    base = dict(params["_base"], magnification=params["magnification"], temperature=params["temperature"])  # fmt: skip
    base["run_name"] += f"-{ray.tune.get_context().get_trial_id()}"
    config = DistillConfig(**base)
    outcome = run_distill(config, parent_run_id=params["_parent_run_id"])
    evaluation = evaluate_model(outcome.model_path, RegionSet.load(config.regions_root), params["_score_splits"], 1000)  # fmt: skip
    metrics: dict[str, Any] = {name: iv.estimate for name, iv in evaluation.metrics.items()}
    metrics.update(gflops=evaluation.gflops_median, num_images=evaluation.num_images,
                   model_path=outcome.model_path)  # fmt: skip
    ray.tune.report(metrics)


@holds_run_lock
def run_search(config: DistillSearchConfig) -> list[dict[str, Any]]:
    """Run (or resume) the grid; one row per trial, best first, also in ``search.csv`` (a
    RuntimeError where no trial finished)."""
    import pandas as pd
    import ray
    from ray import tune

    from histokd.cli import save_config
    from histokd.cluster import init_ray
    from histokd.resdist.job import prepare_region_set
    from histokd.run import open_mlflow_run

    init_ray(config.ray_address)
    prepare_region_set(config)  # once, before the trials share it
    work_dir = Path(config.run_dir)
    save_config(config, work_dir / "search_config.yaml")
    run = open_mlflow_run(config, "resdist_search")
    # the trials share the search's store, region images and storage (theirs under trials/)
    base = dict(config.distill_fields(), storage_path=str(work_dir / "trials"),
                mlflow_tracking_uri=config.tracking_uri, region_dir=config.regions_root)  # fmt: skip
    param_space = dict(build_param_space(config), _base=base, _parent_run_id=run.run_id,
                       _score_splits=list(config.score_splits))  # fmt: skip
    # a trial only waits on its TorchTrainer's workers: it reserves no CPU (Tune refuses a trial
    # that requests nothing, hence one MiB of memory)
    trainable = tune.with_resources(tune_trial, {"cpu": 0, "memory": 2**20})
    per_trial = config.cpus_per_worker * (config.num_workers or 1)
    concurrent = config.max_concurrent_trials or max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))  # fmt: skip
    experiment = str(work_dir / "tune")
    if tune.Tuner.can_restore(experiment):
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)  # fmt: skip
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=config.score, mode="max", max_concurrent_trials=concurrent,
                                        trial_name_creator=trial_dirname, trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(name="tune", storage_path=str(work_dir), verbose=1),
        )  # fmt: skip
    rows = []
    for result in tuner.fit():
        if result.error or config.score not in (result.metrics or {}):
            continue
        row = {"trial_id": Path(result.path).name, **{k: result.config[k] for k in ("magnification", "temperature")}}  # fmt: skip
        keys = (*SCORES, "gflops", "num_images", "model_path")
        rows.append(row | {k: result.metrics[k] for k in keys if k in result.metrics})
    if not rows:
        run.finish("FAILED")
        raise RuntimeError(f"no trial of the search {config.run_name} finished")
    rows.sort(key=lambda r: -r[config.score])
    pd.DataFrame(rows).to_csv(work_dir / "search.csv", index=False, na_rep="nan")
    best = rows[0]
    run.log_params({f"best.{k}": best[k] for k in ("magnification", "temperature")})
    run.log_metrics({f"best_{config.score}": best[config.score], "trials_finished": len(rows)})
    run.log_artifact(work_dir / "search.csv")
    run.finish("FINISHED")
    return rows
