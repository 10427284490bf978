"""Two Ray nodes on one machine: the pretraining job across them, and its recovery when the
trainer node dies mid-run and comes back.

``ray.cluster_utils.Cluster`` starts a head node (custom resource ``teacher_node``) and a
second node (``trainer_node``) as separate raylets on this machine; the job's
``teacher_resources`` and ``trainer_resources`` place the teacher actors on the one and the
training workers on the other. A temporary folder stands in for the shared storage (S3, NFS)
that every node of a real cluster reaches. No ``ray stop``: the test removes only the nodes it
started.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from histokd.pretrain.loop import CHECKPOINT_FILE, patch_checksum

pytestmark = pytest.mark.slow

# Two CPUs each, over-subscribing the machine's two cores: Ray counts them, it does not pin them.
HEAD_NODE = dict(num_cpus=2, resources={"teacher_node": 1}, include_dashboard=False)
TRAINER_NODE = dict(num_cpus=2, resources={"trainer_node": 1})


@pytest.fixture
def two_nodes():
    """A head node and a trainer node, with this process as the driver on the head.

    The session's local Ray (if a test started one) is shut down first, since a driver joins
    one cluster at a time, and started again afterwards as conftest.py starts it.
    """
    import ray
    from ray._common.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    session_ray = ray.is_initialized()
    ray.shutdown()
    # The Cluster records its address in /tmp/ray/ray_current_cluster and deletes the file
    # on shutdown: keep whatever another Ray on this machine had written there.
    address_file = Path(get_ray_address_file(None))
    recorded = address_file.read_text() if address_file.is_file() else None
    cluster = Cluster(initialize_head=True, head_node_args=HEAD_NODE)
    try:
        trainer_node = cluster.add_node(**TRAINER_NODE)
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        yield cluster, trainer_node
    finally:
        ray.shutdown()
        cluster.shutdown()
        if recorded is not None:
            address_file.write_text(recorded)
        if session_ray:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                configure_logging=False)  # fmt: skip


def _actors() -> list[dict]:
    # Ray's GCS actor table, dead actors included (the state API needs the dashboard).
    from ray._private import state

    return list(state.actors().values())


def _nodes_of(actors: list[dict], class_part: str) -> list[str]:
    return [a["Address"]["NodeID"] for a in actors if class_part in a["ActorClassName"]]


def _registered_checkpoints(run_dir: Path) -> list[dict]:
    """The checkpoints Ray Train has registered: fully uploaded, resumable. A folder that
    appears in the storage path is not one yet: it is written while the worker uploads."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snapshot.read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
        return []


def test_trainer_node_dies_mid_run_and_the_run_resumes_on_its_replacement(
    two_nodes, tmp_path, tiny_pretrain_config
):
    """Teachers on the head, the training worker on the trainer node, checkpoints on the
    shared path. The trainer node is removed once epoch 1's checkpoint is written and a new
    one is started; Ray Train restarts the worker group there from that checkpoint
    (``max_failures``) and the run ends with epochs 1, 2, 3, none trained twice."""
    import ray

    from histokd.pretrain.job import run_pretraining

    cluster, trainer_node = two_nodes
    head_id, first_trainer_id = cluster.head_node.node_id, trainer_node.node_id
    assert (
        ray.get_runtime_context().get_node_id() == head_id
    )  # the driver (and Train's controller) on the head
    assert (
        ray.cluster_resources()["teacher_node"] == 1
        and ray.cluster_resources()["trainer_node"] == 1
    )

    storage = tmp_path / "shared_storage"
    run_dir = storage / "two_nodes"
    config = tiny_pretrain_config(
        storage_path=str(storage), teacher="deconvolution", run_name="two_nodes",
        teacher_resources={"teacher_node": 0.5}, trainer_resources={"trainer_node": 1}, max_failures=2,
        keep_checkpoints=5,  # keep every epoch's, so an epoch trained twice would show
    )  # fmt: skip
    # The job runs in a thread: Cluster.add_node installs signal handlers, main thread only.
    outcome: dict = {}

    def job() -> None:
        try:
            outcome["result"] = run_pretraining(config)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            outcome["error"] = exc

    started = time.monotonic()
    runner = threading.Thread(target=job, daemon=True)
    runner.start()
    while (
        not _registered_checkpoints(run_dir)
        and runner.is_alive()
        and time.monotonic() - started < 240
    ):
        time.sleep(0.1)
    assert runner.is_alive() and _registered_checkpoints(run_dir), (
        f"no checkpoint while the run was alive: {outcome}"
    )
    first_checkpoint = time.monotonic() - started
    cluster.remove_node(trainer_node)  # kills the raylet and the training worker on it
    removed = time.monotonic() - started
    assert runner.is_alive(), (
        "the run ended before the trainer node was removed: nothing was tested"
    )
    new_trainer = cluster.add_node(**TRAINER_NODE)
    replaced = time.monotonic() - started
    assert new_trainer.node_id != first_trainer_id
    runner.join(timeout=300)
    assert not runner.is_alive(), "the run did not finish within 5 minutes of the node restart"
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    print(
        f"epoch 1 checkpoint registered {first_checkpoint:.1f} s, trainer node removed {removed:.1f} s, "
        f"replacement up {replaced:.1f} s, "
        f"run done {time.monotonic() - started:.1f} s after the start"
    )

    # Placement: teachers only on the head; the worker on the first trainer node, then on its replacement.
    actors = _actors()
    assert set(_nodes_of(actors, "TeacherActor")) == {head_id}
    workers = _nodes_of(actors, "RayTrainWorker")
    assert workers.count(first_trainer_id) == 1 and new_trainer.node_id in workers, workers
    assert set(workers) == {first_trainer_id, new_trainer.node_id}

    # Resumed, not restarted: one checkpoint per epoch, all on the shared path.
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    registered = _registered_checkpoints(run_dir)
    assert [c["metrics"]["epoch"] for c in registered] == [1, 2, 3], (
        "an epoch was trained twice or lost"
    )
    for c in registered:
        state = torch.load(
            run_dir / c["checkpoint_dir_name"] / CHECKPOINT_FILE,
            map_location="cpu",
            weights_only=True,
        )
        assert state["epoch"] == c["metrics"]["epoch"]
    assert Path(result.checkpoint_path).parent == run_dir
    ids = pq.read_table(run_dir / "manifest" / "train.parquet").column("patch_id").to_pylist()
    assert all(
        (h["patches"], h["patch_checksum"]) == (len(ids), patch_checksum(ids))
        for h in result.history
    )
    assert Path(result.backbone_path).is_file()
