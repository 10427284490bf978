"""The hyperparameter search of RCKD Sec. 3.1 (Fig. 5) on Ray Tune.

The paper compared input resolutions {224, 384}, learning rates {1e-3, 1e-4} and frozen or
trained positional encodings, scoring each setting by its mean test accuracy over five splits,
and kept 384 / 1e-4 / frozen. Here every Tune trial is a whole fine-tuning job
(`run_finetune`): it builds and fits one ``TorchTrainer`` per split (Ray Train V2 has no
``Tuner(trainer)``) and reports after each split the running mean over the splits done, so an
early-stopping scheduler (ASHA) can stop a poor setting after one or two splits.

Trials are named by their trial id, and a trial's splits are stored under it, so rerunning an
interrupted search with the same run name restores the Tune experiment and each unfinished
trial skips the splits it had finished. Other spaces come from a YAML file (``space``): each key
is a field of the fine-tuning config, each value a list (grid) or ``{choice: [...]}``,
``{uniform: [a, b]}``, ``{loguniform: [a, b]}`` or ``{randint: [a, b]}`` (sampled
``num_samples`` times).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from histokd.cli import arg, check_ints, config_to_dict, load_yaml, save_config
from histokd.cluster import init_ray
from histokd.finetune.config import FinetuneConfig, refuse_register_model
from histokd.finetune.datasets import TaskDataset
from histokd.run import RunConfig, check_storage_path, holds_run_lock, open_mlflow_run

__all__ = [
    "SearchConfig",
    "SearchResult",
    "build_param_space",
    "build_scheduler",
    "run_search",
    "TRIAL_RESOURCES",
    "trial_dirname",
    "tune_trial",
]

_SAMPLERS = ("choice", "uniform", "loguniform", "randint")

# Tune refuses a trial that requests nothing; the trial driver only waits on its Train runs, so it
# reserves one MiB of memory and no CPU, leaving every CPU to the training workers.
TRIAL_RESOURCES = {"cpu": 0, "memory": 2**20}


def _searched(flag: str, *values: Any) -> Any:
    """A list of values searched (RCKD Sec. 3.1's by default) that overrides ``--flag``."""
    return arg(
        help=f"values searched (RCKD Sec. 3.1); take precedence over --{flag}; "
        f"with --space, --{flag} serves trials whose space lacks it",
        factory=lambda: list(values),
    )


@dataclass
class SearchConfig(RunConfig):
    """Ray Tune over fine-tuning settings (RCKD Sec. 3.1, Fig. 5): a search space and the
    fine-tuning job every trial runs (``finetune``; its flags are the fine-tuning job's, and
    the searched fields vary per trial).

    Attributes:
        space: A YAML search space replacing the three lists: ``field: [values]`` (a grid) or
            ``field: {choice|uniform|loguniform|randint: [...]}``.
        metric: The score of a trial, ``test_<metric>_mean`` or ``val_<metric>_mean``; auto:
            test accuracy (classification) or test mIoU (segmentation), the split mean as in
            RCKD.
        max_concurrent_trials: auto: as many as leave every trial all its splits in parallel.
    """

    run_name: str = arg("search", "name of the search; rerunning it resumes it")
    mlflow_experiment: str = arg("histokd-search", "MLflow experiment name")
    finetune: FinetuneConfig = arg(help="the fine-tuning of every trial", factory=FinetuneConfig)
    input_sizes: list[int] = _searched("input-size", 224, 384)
    lrs: list[float] = _searched("lr", 1e-3, 1e-4)
    positional_encodings: list[str] = _searched("positional-encoding", "frozen", "trained")
    space: str | None = arg(None, "YAML space, not the lists: field: [grid] or {sampler: [...]}")
    num_samples: int = arg(1, "Tune num_samples: repeats of the grid, or draws of a sampled space")
    metric: str = arg("auto", "trial score: test_<m>_mean, val_<m>_mean; auto: test accuracy/mIoU")
    scheduler: Literal["none", "asha"] = arg("none", "asha stops poor trials after --grace-period")
    grace_period: int = arg(1, "ASHA: splits every trial runs before it can be stopped")
    reduction_factor: int = arg(2, "ASHA: fraction 1/x of trials promoted at each rung")
    max_concurrent_trials: int | None = arg(None, "trials at once; auto: all splits in parallel")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.finetune, dict):
            self.finetune = FinetuneConfig(**self.finetune)
        refuse_register_model(self.finetune, "search")
        check_ints(self, ["num_samples", "grace_period", "reduction_factor"])
        if self.finetune.num_workers == 0:
            raise ValueError(
                "num_workers=0: Ray Train's local mode cannot run inside a Tune trial "
                "(ray.train's worker API refuses a Tune session); use 1 or more"
            )
        if self.reduction_factor < 2:
            raise ValueError(f"reduction_factor={self.reduction_factor}: must be at least 2")
        if self.scheduler not in ("none", "asha"):
            raise ValueError(f"scheduler={self.scheduler!r}: allowed: none, asha")
        if self.max_concurrent_trials is not None and (
            not isinstance(self.max_concurrent_trials, int) or self.max_concurrent_trials < 1
        ):
            raise ValueError(
                f"max_concurrent_trials={self.max_concurrent_trials!r}: must be a positive integer or auto"
            )
        for name, values in (
            ("input_sizes", self.input_sizes),
            ("lrs", self.lrs),
            ("positional_encodings", self.positional_encodings),
        ):
            if not values:
                raise ValueError(f"{name}=[]: give at least one value")
        self.input_sizes = [int(v) for v in self.input_sizes]
        self.lrs = [float(v) for v in self.lrs]
        for size in self.input_sizes:
            if size < 32:
                raise ValueError(f"input_sizes: {size} is below 32")
        for lr in self.lrs:
            if not lr > 0:
                raise ValueError(f"lrs: {lr!r} must be positive")
        for pe in self.positional_encodings:
            if pe not in ("frozen", "trained"):
                raise ValueError(f"positional_encodings: {pe!r}; allowed: frozen, trained")
        if self.space is not None:
            if not os.path.isfile(self.space):
                raise ValueError(f"space={self.space!r}: no such YAML file")
            self.space = os.path.abspath(self.space)
            build_param_space(self)  # validate now, not after the cluster started
        self.score_metric  # noqa: B018 - validates metric

    @property
    def score_metric(self) -> str:
        """The Tune metric every trial is ranked by."""
        from histokd.finetune.evaluation import METRICS, PRIMARY_METRIC

        if self.metric == "auto":
            return f"test_{PRIMARY_METRIC[self.finetune.task]}_mean"
        parts = self.metric.split("_")
        if (
            len(parts) < 3
            or parts[0] not in ("test", "val")
            or parts[-1] != "mean"
            or "_".join(parts[1:-1]) not in METRICS
        ):
            allowed = ", ".join(f"{p}_{m}_mean" for p in ("test", "val") for m in METRICS)
            raise ValueError(f"metric={self.metric!r}: allowed: auto, {allowed}")
        return self.metric


def build_param_space(config: SearchConfig) -> dict[str, Any]:
    """The Tune ``param_space``: RCKD's 2 x 2 x 2 grid, or the YAML space.

    Raises:
        ValueError: A key that is not a fine-tuning field, or a value Tune cannot search.
    """
    from ray import tune

    if config.space is None:
        return {
            "input_size": tune.grid_search(list(config.input_sizes)),
            "lr": tune.grid_search(list(config.lrs)),
            "positional_encoding": tune.grid_search(list(config.positional_encodings)),
        }
    raw = load_yaml(config.space)
    names = {f.name for f in dataclasses.fields(FinetuneConfig)} - {
        "run_name",
        "storage_path",
        "data",
        "task",
    }
    space: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in names:
            raise ValueError(
                f"space {config.space}: {key!r} is not a fine-tuning field; allowed: {', '.join(sorted(names))}"
            )
        if isinstance(value, list) and value:
            space[key] = tune.grid_search(value)
        elif isinstance(value, dict) and len(value) == 1 and next(iter(value)) in _SAMPLERS:
            kind, args = next(iter(value.items()))
            space[key] = tune.choice(args) if kind == "choice" else getattr(tune, kind)(*args)
        else:
            raise ValueError(
                f"space {config.space}: {key}: {value!r}; give a list (grid) or one of {{{', '.join(_SAMPLERS)}: [...]}}"
            )
    if not space:
        raise ValueError(f"space {config.space}: empty")
    return space


def build_scheduler(config: SearchConfig):
    """ASHA over splits (a trial reports once per finished split), or None.

    A trial that is below the top ``1 / reduction_factor`` of its rung after ``grace_period``
    splits is stopped; ``max_t`` is the number of splits.
    """
    if config.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=config.finetune.num_splits,
        grace_period=min(config.grace_period, config.finetune.num_splits),
        reduction_factor=config.reduction_factor,
    )


def trial_dirname(trial) -> str:
    """Trials are named by id (no timestamps), so a restored search finds its trials again."""
    return trial.trial_id


def tune_trial(params: dict[str, Any], dataset: TaskDataset | None = None) -> None:
    """One Tune trial: a fine-tuning job with the trial's settings, reporting after each split.

    Args:
        params: The sampled settings plus ``_base`` (the shared fine-tuning fields),
            ``_parallel_splits`` and ``_parent_run_id``.
        dataset: The dataset, shared through the object store.
    """
    import ray.tune

    from histokd.finetune.job import run_finetune

    context = ray.tune.get_context()
    trial_id = context.get_trial_id()
    base = dict(params["_base"])
    settings = {k: v for k, v in params.items() if not k.startswith("_")}
    base.update(settings)
    base["run_name"] = f"{base['run_name']}-{trial_id}"
    base["storage_path"] = f"{params['_storage']}/trials"
    base["mlflow_tracking_uri"] = params["_tracking_uri"]
    config = FinetuneConfig(**base)

    def report(result: dict[str, Any], done: list[dict[str, Any]]) -> None:
        if len(done) < config.num_splits:
            ray.tune.report(_running_metrics(done))

    outcome = run_finetune(
        config, dataset=dataset, on_split_done=report, parallel_splits=params["_parallel_splits"],
        parent_run_id=params["_parent_run_id"],
    )  # fmt: skip
    metrics = _running_metrics(outcome.split_results)
    for name, entry in outcome.summary["metrics"].items():
        metrics[f"test_{name}_ci_low"] = entry["ci_low"]
        metrics[f"test_{name}_ci_high"] = entry["ci_high"]
    metrics["run_dir"] = outcome.run_dir
    ray.tune.report(metrics)


def _running_metrics(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over the splits done so far, for test and validation."""
    import numpy as np

    from histokd.finetune.evaluation import METRICS

    metrics: dict[str, Any] = {"splits_done": len(results)}
    for part in ("test", "val"):
        for name in METRICS:
            values = np.array([r[part][name] for r in results], dtype=np.float64)
            metrics[f"{part}_{name}_mean"] = float(np.nanmean(values))
            metrics[f"{part}_{name}_std"] = (
                float(np.nanstd(values, ddof=1)) if len(values) > 1 else 0.0
            )
    return metrics


@dataclass
class SearchResult:
    """What a search produced: one row per trial, the best, the files."""

    rows: list[dict[str, Any]]
    best: dict[str, Any]
    files: dict[str, str]
    experiment_path: str
    mlflow_run_id: str | None


@holds_run_lock
def run_search(config: SearchConfig, dataset: TaskDataset | None = None) -> SearchResult:
    """Run (or resume) the search and write its table and chart.

    Raises:
        ValueError: Bad settings.
        RuntimeError: No trial finished.
    """
    import ray
    from ray import tune

    from histokd.finetune.evaluation import METRICS
    from histokd.finetune.job import prepare_dataset, split_slots
    from histokd.finetune.report import write_search_outputs

    job = config.finetune
    check_storage_path(config.storage_path)
    dataset = dataset if dataset is not None else prepare_dataset(job)
    init_ray(config.ray_address)
    use_gpu = job.use_gpu if job.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    slots = split_slots(job, use_gpu)
    concurrent = config.max_concurrent_trials or max(1, slots // job.num_splits)
    parallel_splits = max(1, slots // concurrent)
    work_dir = config.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, work_dir / "search_config.yaml")
    run = open_mlflow_run(config, "tune_finetune")

    metric = config.score_metric
    base = config_to_dict(job)
    base.update(run_name=config.run_name, mlflow_experiment=config.mlflow_experiment)
    param_space = build_param_space(config)
    param_space.update(
        _base=base, _parallel_splits=parallel_splits, _parent_run_id=run.run_id,
        _storage=f"{config.storage_path.rstrip('/')}/{config.run_name}", _tracking_uri=config.tracking_uri,
    )  # fmt: skip
    trainable = tune.with_resources(
        tune.with_parameters(tune_trial, dataset=dataset), TRIAL_RESOURCES
    )
    experiment_path = f"{config.storage_path.rstrip('/')}/{config.run_name}"
    scheduler = build_scheduler(config)
    if tune.Tuner.can_restore(experiment_path):
        print(f"resuming the search at {experiment_path}", flush=True)
        tuner = tune.Tuner.restore(
            experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=metric, mode="max", scheduler=scheduler, num_samples=config.num_samples,
                max_concurrent_trials=concurrent, trial_name_creator=trial_dirname, trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(name=config.run_name, storage_path=config.storage_path, verbose=1),
        )  # fmt: skip
    print(
        f"search: {metric} over {', '.join(k for k in param_space if not k.startswith('_'))}; "
        f"{concurrent} trial(s) at a time, {parallel_splits} split(s) each",
        flush=True,
    )
    try:
        grid = tuner.fit()
    except Exception:
        run.finish("FAILED")
        raise
    searched = [k for k in param_space if not k.startswith("_")]
    rows, failed = [], []
    for result in grid:
        trial_id = Path(result.path).name
        settings = {k: result.config.get(k) for k in searched}
        if result.error or not result.metrics or metric not in result.metrics:
            failed.append({"trial_id": trial_id, **settings, "error": str(result.error)[:300]})
            continue
        row = {"trial_id": trial_id, **settings}
        for key in ("input_size", "lr", "positional_encoding"):  # the chart's labels
            row.setdefault(key, base[key])
        row.update(
            {
                k: v
                for k, v in result.metrics.items()
                if k.startswith(("test_", "val_")) or k == "splits_done"
            }
        )
        row["num_splits"] = result.metrics.get("splits_done", job.num_splits)
        row["stopped_by_scheduler"] = row["num_splits"] < job.num_splits
        for name in METRICS:  # the table's names: the metric's five-split numbers on the test set
            for stat in ("mean", "std", "ci_low", "ci_high"):
                row[f"{name}_{stat}"] = row.get(f"test_{name}_{stat}", math.nan)
        rows.append(row)
    if not rows:
        run.finish("FAILED")
        raise RuntimeError(f"no trial of the search finished; failures: {failed}")
    chart_metric = metric.split("_", 1)[1].rsplit("_", 1)[0]
    rows.sort(
        key=lambda r: r[metric] if math.isfinite(r[metric]) else -math.inf, reverse=True
    )  # stable: ties keep grid order
    files = write_search_outputs(rows, work_dir, metric=chart_metric, rank_by=metric)
    best = rows[0]
    if failed:
        with open(files["markdown"], "a") as f:
            f.write(
                "\nFailed trials:\n\n"
                + "\n".join(f"- {r['trial_id']}: {r['error']}" for r in failed)
                + "\n"
            )
    run.log_params({f"best.{k}": best[k] for k in searched})
    run.log_metrics(
        {f"best_{metric}": best[metric], "trials_finished": len(rows), "trials_failed": len(failed)}
    )
    for path in files.values():
        run.log_artifact(path)
    run.finish("FINISHED")
    print(
        f"best: {', '.join(f'{k}={best[k]}' for k in searched)}  {metric} {best[metric]:.4f}",
        flush=True,
    )
    return SearchResult(
        rows=rows, best=best, files=files, experiment_path=experiment_path, mlflow_run_id=run.run_id
    )
