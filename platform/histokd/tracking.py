"""MLflow for every run: one run per job run name, resumed when the name comes back.

MLflow 3.17 refuses the plain ``file:`` store, so the default is a SQLite database beside the
runs with an absolute artifact location; any tracking server URI works the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import logging
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "LoggedModel",
    "MLflowRun",
    "check_registered_model_name",
    "end_unfinished_runs",
    "fetch_model_file",
    "git_commit",
    "is_model_uri",
    "log_pytorch_model",
    "model_requirements",
    "opened_runs",
    "package_versions",
]

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


#: The MLflow model metadata key that names the histokd model file inside the model's folder.
MODEL_FILE_METADATA = "histokd_model_file"

#: The packages an MLflow model of histokd needs besides histokd itself, pinned to the installed
#: versions (histokd's own pins): the model is a pickled histokd module.
_MODEL_REQUIREMENTS = ("torch", "torchvision", "timm", "numpy", "cloudpickle")

#: The MLflow model URIs inference accepts besides a model file.
MODEL_URI_FORMS = "runs:/RUN_ID/PATH, models:/NAME/VERSION or models:/NAME@ALIAS"


@dataclass(frozen=True)
class LoggedModel:
    """An MLflow model logged by `log_pytorch_model`.

    Attributes:
        model_uri: ``models:/m-...``, the logged model itself.
        run_uri: ``runs:/RUN_ID/NAME``.
        registered_name: The registry name, when it was registered.
        registered_version: Its version there.
    """

    model_uri: str
    run_uri: str
    registered_name: str | None = None
    registered_version: int | None = None


def check_registered_model_name(name: str | None, field: str = "register_model") -> None:
    """A model registry name: non-empty, and without ``/``, ``@`` or ``:`` (which would break
    ``models:/NAME/VERSION`` and ``models:/NAME@ALIAS``).

    Raises:
        ValueError: Naming the field, the value and what is allowed.
    """
    if name is None:
        return
    if not isinstance(name, str) or not name.strip() or any(c in name for c in "/@:"):
        raise ValueError(
            f"{field}={name!r}: give a model registry name without '/', '@' or ':' "
            "(e.g. rckd-csat), or leave it unset"
        )


def is_model_uri(value: str) -> bool:
    """Whether ``value`` is an MLflow model URI (``runs:/...`` or ``models:/...``)."""
    return isinstance(value, str) and value.startswith(("runs:/", "models:/"))


def model_requirements() -> list[str]:
    """Pip requirements of a histokd MLflow model: its packages at their installed versions
    (without a local build tag: ``torch==2.13.0``, as histokd pins it, not ``2.13.0+cpu``)."""
    pins = []
    for name in _MODEL_REQUIREMENTS:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins


def log_pytorch_model(
    run: MLflowRun,
    model,
    *,
    input_size: int,
    metadata: Mapping[str, Any],
    model_file: str | os.PathLike | None = None,
    name: str = "model",
    register: str | None = None,
) -> LoggedModel | None:
    """Log ``model`` to ``run`` as an MLflow PyTorch model, and register it when asked.

    The model is pickled (it loads where histokd is importable, with
    ``mlflow.pytorch.load_model(uri)``), with a signature and an input example of one
    ``1 x 3 x input_size x input_size`` float image in [0, 1] (the models take uint8 too and
    normalise their input themselves), pinned pip requirements (`model_requirements`) and
    ``metadata``. ``model_file`` (histokd's own file of the same model) goes into the MLflow
    model's folder, and the metadata's ``histokd_model_file`` names it there: `fetch_model_file`
    finds it. A model with an ``input_norm`` records its mean and std as ``normalization``.

    Logging a model never fails a finished run: an MLflow error is one warning line, and the
    result is None (the registration alone failing keeps the logged model).

    Args:
        run: The job's run.
        model: The network, in eval mode, on CPU.
        input_size: Side of the square input.
        metadata: histokd's description (task, backbone, classes, mpp, ...); plain values.
        model_file: histokd's model file to keep beside the MLflow model.
        name: The model's name in the run (``runs:/RUN_ID/NAME``).
        register: Model registry name; prints ``registered NAME version N``.
    """
    try:
        logged = _log_pytorch_model(run, model, input_size, metadata, model_file, name)
    except Exception as exc:  # noqa: BLE001 - a finished run must not fail on its MLflow model
        log.warning("MLflow model %r of run %s not logged: %s", name, run.run_id, _one_line(exc))
        return None
    if register is None:
        return logged
    try:
        import mlflow
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        with _use_tracking_uri(run.tracking_uri), _quiet_mlflow():
            version = mlflow.register_model(logged.model_uri, register)
    except Exception as exc:  # noqa: BLE001 - as above
        log.warning(
            "MLflow model %s not registered as %r: %s", logged.run_uri, register, _one_line(exc)
        )
        return logged
    print(f"registered {register} version {version.version}", flush=True)
    return dataclasses.replace(
        logged, registered_name=register, registered_version=int(version.version)
    )


def _log_pytorch_model(run, model, input_size, metadata, model_file, name) -> LoggedModel:
    import json

    import mlflow
    import numpy as np
    import torch
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    example = np.random.default_rng(0).random((1, 3, input_size, input_size), dtype=np.float32)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = mlflow.models.infer_signature(example, output)
    meta = json.loads(json.dumps(dict(metadata), default=list))  # tuples, paths: plain values
    norm = getattr(model, "input_norm", None)
    if norm is not None and hasattr(norm, "mean"):
        meta.setdefault("normalization", {
            "mean": norm.mean.flatten().tolist(), "std": norm.std.flatten().tolist(),
            "input": "RGB, float in [0, 1] or uint8; the model normalises it",
        })  # fmt: skip
    extra_files = None
    if model_file is not None:
        extra_files = [str(model_file)]
        meta[MODEL_FILE_METADATA] = f"extra_files/{Path(model_file).name}"
    # the logged model lives in the run's experiment (MLflow's fluent default is experiment 0)
    created = run.client.create_logged_model(
        experiment_id=run.experiment_id, name=name, source_run_id=run.run_id
    )
    with _use_tracking_uri(run.tracking_uri), _quiet_mlflow():
        info = mlflow.pytorch.log_model(
            model, name=name, model_id=created.model_id, run_id=run.run_id, signature=signature,
            input_example=example, pip_requirements=model_requirements(), metadata=meta,
            extra_files=extra_files, serialization_format="pickle",
        )  # fmt: skip
    return LoggedModel(model_uri=info.model_uri, run_uri=f"runs:/{run.run_id}/{name}")


def fetch_model_file(uri: str, tracking_uri: str, dst: str | os.PathLike) -> Path:
    """The histokd model file of the MLflow model at ``uri``, downloaded into the empty ``dst``.

    Args:
        uri: ``runs:/RUN_ID/PATH``, ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` or
            ``models:/MODEL_ID`` of a model `log_pytorch_model` logged with its model file.
        tracking_uri: The MLflow store (and registry) to resolve it against.
        dst: Folder to download into (emptied first).

    Raises:
        ValueError: The URI does not resolve, or its model holds no histokd model file.
    """
    import shutil

    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    dst = Path(dst)
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    try:
        with _use_tracking_uri(tracking_uri), _quiet_mlflow():
            local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dst)))
            meta = mlflow.models.Model.load(str(local)).metadata or {}
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a missing model
        raise ValueError(
            f"model={uri!r}: no MLflow model there in {tracking_uri} ({_one_line(exc)}); "
            f"allowed: {MODEL_URI_FORMS} of a histokd model, or a model file"
        ) from exc
    relative = meta.get(MODEL_FILE_METADATA)
    if not relative or not (local / relative).is_file():
        raise ValueError(
            f"model={uri!r}: this MLflow model holds no histokd model file (no "
            f"{MODEL_FILE_METADATA!r} in its metadata); give a model logged by the fine-tuning job"
        )
    return local / relative


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


@contextlib.contextmanager
def _quiet_mlflow():
    """MLflow's notes on pickled models and its download progress bars, silenced."""
    loggers = [logging.getLogger(n) for n in ("mlflow.pytorch", "mlflow.tracking._model_registry")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if previous is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = previous
