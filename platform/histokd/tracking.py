"""MLflow for every run: one run per job run name, resumed when the name comes back.

MLflow 3.17 refuses the plain ``file:`` store, so the default is a SQLite database beside the
runs with an absolute artifact location; any tracking server URI works the same way.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["MLflowRun", "end_unfinished_runs", "git_commit", "opened_runs", "package_versions"]

log = logging.getLogger(__name__)

_VERSIONED = (
    "histokd",
    "torch",
    "timm",
    "ray",
    "tensorflow-cpu",
    "tensorflow",
    "stardist",
    "openslide-python",
    "openslide-bin",
    "mlflow",
    "numpy",
)


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a result depends on."""
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def git_commit(path: str | os.PathLike | None = None) -> str:
    """The commit of the source tree histokd runs from ('unknown' outside a checkout)."""
    path = Path(path or Path(__file__).resolve().parent)
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        commit = out.stdout.strip() if out.returncode == 0 else "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        return commit + ("-dirty" if commit != "unknown" and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class MLflowRun:
    """An MLflow run found by its run name, or created.

    Args:
        tracking_uri: ``sqlite:///abs/path.db``, ``http://host:5000`` or any MLflow URI.
        experiment: Experiment name; created with ``artifact_location`` when missing.
        run_name: The job's run name; an existing run of that name is continued.
        artifact_location: Absolute path or URI for artifacts of a new experiment.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        artifact_location: str | None = None,
    ):
        import mlflow

        if tracking_uri.startswith("file:") or (
            ":" not in tracking_uri and not tracking_uri.startswith("/")
        ):
            raise ValueError(
                f"mlflow_tracking_uri={tracking_uri!r}: MLflow 3 refuses file stores; use "
                "sqlite:///ABSOLUTE/PATH.db or a tracking server URI"
            )
        if tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = tracking_uri
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            if artifact_location and "://" not in artifact_location:
                artifact_location = Path(artifact_location).absolute().as_uri()
            experiment_id = self.client.create_experiment(
                experiment, artifact_location=artifact_location
            )
        else:
            experiment_id = exp.experiment_id
        self.experiment_id = experiment_id
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`mlflow.runName` = '{run_name}'", max_results=1,
            order_by=["attributes.start_time DESC"],
        )  # fmt: skip
        if found:
            self.run_id = found[0].info.run_id
            self.resumed = True
            if found[0].info.status != "RUNNING":
                self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, run_name=run_name)
            self.run_id = run.info.run_id
            self.resumed = False
        _OPENED.append(self)

    @property
    def url(self) -> str:
        return f"{self.tracking_uri} experiment {self.experiment_id} run {self.run_id}"

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flattened params; values already logged with the same value are skipped."""
        import mlflow

        existing = self.client.get_run(self.run_id).data.params
        flat = _flatten(params)
        changed = {k: v for k, v in flat.items() if existing.get(k) != v}
        conflicts = {k: (existing[k], v) for k, v in changed.items() if k in existing}
        if conflicts:
            log.warning(
                "run %s resumed with changed params (kept the first values): %s",
                self.run_id,
                conflicts,
            )
        new = [mlflow.entities.Param(k, v) for k, v in changed.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_standard_tags(self) -> None:
        """The git commit and package versions behind the result."""
        tags = {"histokd.git_commit": git_commit()}
        tags.update({f"version.{k}": v for k, v in package_versions().items()})
        self.set_tags(tags)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, float(value), step=step or 0)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


_OPENED: list[MLflowRun] = []  # the runs this process opened, in order


def opened_runs() -> int:
    """How many MLflow runs this process has opened (a mark for :func:`end_unfinished_runs`)."""
    return len(_OPENED)


def end_unfinished_runs(since: int = 0, status: str = "KILLED") -> list[str]:
    """End the runs this process opened (from the ``since``-th on) that did not finish.

    An interrupted job (Ctrl-C, SIGTERM) ends its runs as KILLED, whether they were still
    running or a driver marked them FAILED on the way out; finished ones stay finished.

    Returns:
        The ids of the runs ended here.
    """
    ended = []
    for run in _OPENED[since:]:
        try:
            if run.client.get_run(run.run_id).info.status != "FINISHED":
                run.finish(status)
                ended.append(run.run_id)
        except Exception as exc:  # noqa: BLE001 - a tracking server that is gone
            log.warning("MLflow run %s could not be ended as %s: %s", run.run_id, status, exc)
    return ended


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            text = str(value)
            flat[name] = text if len(text) <= 6000 else text[:5997] + "..."
    return flat


def worker_mlflow_client(config: Mapping[str, Any]):
    """An MLflow client for a training worker, or None when the run is not tracked.

    ``config`` carries ``mlflow_run_id`` and ``tracking_uri`` (set by the job's driver).
    Tracking must never stop a training run: an unusable store logs a warning instead.
    """
    if not config.get("mlflow_run_id"):
        return None
    try:
        import mlflow

        return mlflow.MlflowClient(tracking_uri=config["tracking_uri"])
    except Exception as exc:  # noqa: BLE001 - tracking must never stop a training run
        log.warning("MLflow unavailable: %s", exc)
        return None


def log_epoch_metrics(
    client, config: Mapping[str, Any], metrics: Mapping[str, Any], step: int
) -> None:
    """Log a worker's numeric, finite metrics at ``step`` in one batch; retried because a SQLite
    store locks briefly while another run writes, and never raises."""
    if client is None:
        return
    import math
    import time

    import mlflow

    now = int(time.time() * 1000)
    batch = [
        mlflow.entities.Metric(k, float(v), now, int(step))
        for k, v in metrics.items()
        if isinstance(v, (int, float))
        and not isinstance(v, bool)
        and k != "epoch"
        and math.isfinite(float(v))
    ]
    for attempt in range(3):
        try:
            client.log_batch(config["mlflow_run_id"], metrics=batch)
            return
        except Exception as exc:  # noqa: BLE001 - tracking must never stop a training run
            if attempt == 2:
                log.warning("MLflow logging failed at epoch %d: %s", step, exc)
            time.sleep(0.5 * (attempt + 1))
