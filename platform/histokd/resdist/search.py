"""Ray Tune over the student's magnification and the soft-loss temperature.

DiPalma et al. tuned their hyperparameters on a separate development set of celiac-disease
slides and reused them for the other datasets (Sec. 4.2-4.4). Here each Tune trial is a whole
distillation job (:func:`~histokd.resdist.job.run_distill`: it builds and fits its own
``TorchTrainer``, since Ray Train V2 has no ``Tuner(trainer)``), followed by an evaluation of the
student on the scoring splits; the trial reports top-1 and one-vs-rest accuracy and macro F1
there. Trials are named by their trial id, and a rerun with the same name restores the Tune
experiment.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histokd.cli import config_to_dict, save_config
from histokd.cluster import init_ray
from histokd.resdist.config import DistillConfig

__all__ = ["DistillSearchConfig", "build_param_space", "run_search", "trial_dirname", "tune_trial"]

_SCORES = ("accuracy", "top1_accuracy", "f1", "precision", "recall")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class DistillSearchConfig(DistillConfig):
    """A grid over student magnification x temperature; every other field is the distillation's."""

    run_name: str = field(
        default="kd-search",
        metadata=_help("name of the search; rerunning with the same name resumes it"),
    )
    # every trial takes these two from the grid: refused when given, so no flag is silently ignored
    magnification: float | None = field(
        default=None,
        metadata=_help(
            "not used (giving it is an error): every trial's student magnification comes from --searched-magnifications"
        ),
    )
    temperature: float | None = field(
        default=None,
        metadata=_help(
            "not used (giving it is an error): every trial's temperature comes from --temperatures"
        ),
    )
    searched_magnifications: list[float] = field(
        default_factory=lambda: [0.625, 1.25, 2.5, 5.0],
        metadata=_help("student magnifications searched (Tables 6-8)"),
    )
    temperatures: list[float] = field(
        default_factory=lambda: [1.0, 2.0, 4.0],
        metadata=_help(
            "soft-loss temperatures searched (public code: 1.0; Hinton et al. use 1-20)"
        ),
    )
    score_splits: list[str] = field(
        default_factory=lambda: ["val"],
        metadata=_help(
            "labelled splits a trial is scored on (the paper: a separate development set)"
        ),
    )
    score: str = field(
        default="top1_accuracy",
        metadata=_help(f"metric trials are ranked by: {', '.join(_SCORES)}"),
    )
    max_concurrent_trials: int | None = field(
        default=None, metadata=_help("trials at once; auto: as many as the CPUs allow")
    )

    def __post_init__(self) -> None:
        for name, searched in (
            ("magnification", "searched_magnifications"),
            ("temperature", "temperatures"),
        ):
            if getattr(self, name) is not None:
                raise ValueError(
                    f"{name}={getattr(self, name)!r}: a search takes every trial's {name} from {searched} and would ignore it; "
                    f"give the values as --{searched.replace('_', '-')}"
                )
        if not self.searched_magnifications or not self.temperatures:
            raise ValueError(
                "searched_magnifications and temperatures: give at least one value each"
            )
        self.searched_magnifications = [float(m) for m in self.searched_magnifications]
        self.temperatures = [float(t) for t in self.temperatures]
        # DistillConfig checks one student's magnification and temperature: give it placeholders
        # it accepts (the grid is checked below, naming its fields), then leave both unset
        self.magnification = self.magnifications[0] if self.magnifications else None
        self.temperature = 1.0
        try:
            super().__post_init__()
        finally:
            self.magnification = self.temperature = None
        for mag in self.searched_magnifications:
            self.check_magnification("searched_magnifications", mag)
        for t in self.temperatures:
            if not t > 0:
                raise ValueError(f"temperatures: {t!r} must be positive")
        if self.num_workers < 1:
            # Ray Train's local mode cannot run inside a Tune trial (ray.train.get_context is
            # refused there): every trial trains on its own worker group
            raise ValueError(
                f"num_workers={self.num_workers}: a search needs at least 1 Ray Train worker per trial"
            )
        if self.score not in _SCORES:
            raise ValueError(f"score={self.score!r}: allowed: {', '.join(_SCORES)}")
        if self.max_concurrent_trials is not None and (
            not isinstance(self.max_concurrent_trials, int) or self.max_concurrent_trials < 1
        ):
            raise ValueError(
                f"max_concurrent_trials={self.max_concurrent_trials!r}: must be a positive integer or auto"
            )

    def distill_fields(self) -> dict[str, Any]:
        """The distillation settings shared by every trial."""
        names = {f.name for f in dataclasses.fields(DistillConfig)}
        return {k: v for k, v in config_to_dict(self).items() if k in names}


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

    trial_id = ray.tune.get_context().get_trial_id()
    base = dict(params["_base"])
    base.update(magnification=params["magnification"], temperature=params["temperature"])
    base["run_name"] = f"{base['run_name']}-{trial_id}"
    base["storage_path"] = params["_storage"]
    base["mlflow_tracking_uri"] = params[
        "_tracking_uri"
    ]  # the search's store: one database, created once
    base["region_dir"] = params["_region_dir"]  # the search's region images, built once
    config = DistillConfig(**base)
    outcome = run_distill(config, parent_run_id=params.get("_parent_run_id"))
    region_set = RegionSet.load(config.regions_root)
    evaluation = evaluate_model(
        outcome.model_path, region_set, params["_score_splits"], n_resamples=1000
    )
    metrics: dict[str, Any] = {name: iv.estimate for name, iv in evaluation.metrics.items()}
    metrics.update(
        gflops=evaluation.gflops_median,
        num_images=evaluation.num_images,
        model_path=outcome.model_path,
    )
    ray.tune.report(metrics)


def run_search(config: DistillSearchConfig) -> list[dict[str, Any]]:
    """Run (or resume) the grid; returns one row per trial, best first, and writes ``search.csv``.

    Raises:
        RuntimeError: No trial finished.
    """
    import csv

    import ray
    from ray import tune

    from histokd.resdist.job import prepare_region_set
    from histokd.tracking import MLflowRun

    init_ray()
    prepare_region_set(config)  # once, before the trials share it
    work_dir = Path(config.run_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, work_dir / "search_config.yaml")
    run = MLflowRun(
        config.tracking_uri,
        config.mlflow_experiment,
        config.run_name,
        artifact_location=str(Path(config.storage_path) / "mlartifacts"),
    )
    run.log_params(config_to_dict(config))
    run.set_tags({"histokd.job": "resdist_search", "histokd.run_dir": str(work_dir)})
    param_space = build_param_space(config)
    param_space.update(_base=config.distill_fields(), _storage=str(work_dir / "trials"), _score_splits=list(config.score_splits),
                       _parent_run_id=run.run_id, _tracking_uri=config.tracking_uri, _region_dir=config.regions_root)  # fmt: skip
    # a trial only waits on its TorchTrainer's workers: it reserves no CPU (Tune refuses a trial
    # that requests nothing, hence one MiB of memory)
    trainable = tune.with_resources(tune_trial, {"cpu": 0, "memory": 2**20})
    cpus = ray.cluster_resources().get("CPU", 1)
    per_trial = config.cpus_per_worker * config.num_workers
    concurrent = config.max_concurrent_trials or max(1, int(cpus // per_trial))
    experiment_path = str(work_dir / "tune")
    if tune.Tuner.can_restore(experiment_path):
        tuner = tune.Tuner.restore(
            experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(metric=config.score, mode="max", max_concurrent_trials=concurrent,
                                        trial_name_creator=trial_dirname, trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(name="tune", storage_path=str(work_dir), verbose=1),
        )  # fmt: skip
    grid = tuner.fit()
    rows = []
    for result in grid:
        if result.error or not result.metrics or config.score not in result.metrics:
            continue
        row = {
            "trial_id": Path(result.path).name,
            "magnification": result.config["magnification"],
            "temperature": result.config["temperature"],
        }
        row.update(
            {
                k: result.metrics[k]
                for k in (*_SCORES, "gflops", "num_images", "model_path")
                if k in result.metrics
            }
        )
        rows.append(row)
    if not rows:
        run.finish("FAILED")
        raise RuntimeError(f"no trial of the search {config.run_name} finished")
    rows.sort(key=lambda r: -r[config.score])
    with open(work_dir / "search.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    best = rows[0]
    run.log_params(
        {"best.magnification": best["magnification"], "best.temperature": best["temperature"]}
    )
    run.log_metrics({f"best_{config.score}": best[config.score], "trials_finished": len(rows)})
    run.log_artifact(work_dir / "search.csv")
    run.finish("FINISHED")
    return rows
