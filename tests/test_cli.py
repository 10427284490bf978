"""Shared config checks of `histokd.cli`: integer fields and where a run lives."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from histokd.cli import RunStorage, check_ints


@dataclass
class _Job(RunStorage):
    storage_path: str = "/data/runs"
    run_name: str = "r1"
    mlflow_tracking_uri: str | None = None
    workers: int | None = 2
    epochs: int = 3


@pytest.mark.parametrize(
    ("value", "minimum", "auto", "message"),
    [(0, 1, False, "workers=0: must be a positive integer$"), (-1, 0, False, "workers=-1: must be a non-negative integer$"),
     (True, 0, False, "workers=True: must be a non-negative integer"), (2.0, 1, True, "workers=2.0: must be a positive integer or auto"),
     (None, 1, False, "workers=None"), (1, 2, False, "workers=1: must be an integer >= 2")],
)  # fmt: skip
def test_check_ints_names_the_field_value_and_what_is_allowed(value, minimum, auto, message):
    with pytest.raises(ValueError, match=message):
        check_ints(_Job(workers=value), ["epochs", "workers"], minimum=minimum, auto=auto)


def test_check_ints_accepts_what_it_allows():
    check_ints(_Job(workers=None), ["workers"], auto=True)
    check_ints(_Job(workers=0), ["workers"], minimum=0)


def test_run_storage_local_and_remote():
    assert (_Job().run_dir, _Job().tracking_uri) == (
        "/data/runs/r1",
        "sqlite:////data/runs/mlflow.db",
    )
    remote = _Job(storage_path="s3://bucket/runs/")
    assert remote.run_dir == "s3://bucket/runs/r1"
    with pytest.raises(
        ValueError,
        match="mlflow_tracking_uri is unset and storage_path='s3://bucket/runs/' is remote",
    ):
        _ = remote.tracking_uri
    assert (
        _Job(storage_path="s3://b", mlflow_tracking_uri="http://mlflow:5000").tracking_uri
        == "http://mlflow:5000"
    )
