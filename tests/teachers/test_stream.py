"""The teacher stream on a local Ray: manifest -> read tasks -> teacher actor pool -> records."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from histokd.manifest import PatchReader
from histokd.streams import plan_resources
from histokd.teachers import TeacherError, build_teacher
from histokd.teachers.cache import RecordCache, patch_key
from histokd.teachers.stream import (
    load_manifest_table,
    pseudo_label_dataset,
    read_cached_batch,
    resize_image,
    resize_label,
)

INPUT = 64  # training input size of these tests (RCKD: 512 from 1024)


@pytest.fixture(scope="module")
def manifest(held_out_slides, tmp_path_factory):
    """A real manifest (histokd.manifest) of 256 px tissue patches at 20x of two demo slides."""
    from histokd.manifest import ManifestConfig, build_manifest

    out = tmp_path_factory.mktemp("manifest")
    result = build_manifest(
        [str(s.slide_path) for s in held_out_slides],
        out,
        ManifestConfig(magnification=20, patch_size=256),
        use_ray=False,
    )
    table = pq.read_table(result.manifest_path)
    assert table.num_rows >= 12
    return result.manifest_path


def _collect(ds) -> dict[str, np.ndarray]:
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _assert_same_labels(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Every patch of ``got`` has the pseudo label ``expected`` has for it."""
    for pid, label in zip(got["patch_id"], got["pseudo_label"], strict=True):
        np.testing.assert_array_equal(
            expected["pseudo_label"][expected["patch_id"] == pid][0], label
        )


# -- resources ----------------------------------------------------------------------------------
def test_two_cpus_cannot_deadlock():
    plan = plan_resources({"CPU": 2.0}, reserved_cpus=1.0)
    assert plan.num_actors == 1 and plan.actor_gpus == 0
    # actor + one read task + the training worker fit in 2 CPUs
    assert plan.actor_cpus + plan.read_cpus + 1.0 <= 2.0
    assert 0 < plan.actor_cpus < 1 and 0 < plan.read_cpus < 1


def test_gpu_share_and_pool_size():
    plan = plan_resources({"CPU": 16.0, "GPU": 2.0}, num_gpus=0.25, reserved_cpus=2)
    assert plan.num_actors == 2 and plan.actor_gpus == 0.25
    assert plan.actor_cpus == 1.0 and plan.intra_op_threads == 1
    assert plan_resources({"CPU": 8.0}, num_gpus=0.5).actor_gpus == 0  # no GPU: no GPU share


def test_impossible_resources_are_clear():
    with pytest.raises(ValueError, match="reserved_cpus=2 leaves no CPU"):
        plan_resources({"CPU": 2.0}, reserved_cpus=2)
    with pytest.raises(ValueError, match="needs 1.5 GPUs; the cluster has 1"):
        plan_resources({"CPU": 8.0, "GPU": 1.0}, num_actors=3, num_gpus=0.5)
    with pytest.raises(ValueError, match="num_actors=0"):
        plan_resources({"CPU": 8.0}, num_actors=0)


def test_manifest_checks(manifest):
    table = pq.read_table(manifest)
    with pytest.raises(TeacherError, match=r"missing column\(s\) \['x'\]"):
        load_manifest_table(table.drop(["x"]))
    mixed = pa.concat_tables([table, table])
    with pytest.raises(TeacherError, match="patch_id is not unique"):
        load_manifest_table(mixed)
    sizes = table.set_column(table.column_names.index("patch_size"), "patch_size",
                             pa.array([256] * (table.num_rows - 1) + [512], pa.int32()))  # fmt: skip
    with pytest.raises(TeacherError, match="patch_size takes 2 values"):
        load_manifest_table(sizes)
    with pytest.raises(TeacherError, match="teacher='nope'"):
        pseudo_label_dataset(manifest, teacher="nope")
    # bad settings fail in the driver, not as actors that never start
    with pytest.raises(TeacherError, match=r"alpha=2.*\(0, 1\]"):
        pseudo_label_dataset(manifest, teacher="demo", teacher_kwargs={"alpha": 2})
    with pytest.raises(TeacherError, match="mask_mode='instances'.*allowed: 'probability'"):
        pseudo_label_dataset(
            manifest, teacher="deconvolution", teacher_kwargs={"mask_mode": "instances"}
        )


# -- the stream ---------------------------------------------------------------------------------
def test_every_patch_once_with_its_label(ray_cluster, manifest, tmp_path):
    table = pq.read_table(manifest)
    ds = pseudo_label_dataset(  # lossless records: the image is exactly the resized patch
        manifest, "deconvolution", input_size=INPUT, cache_dir=tmp_path, batch_size=4,
        record_format="png",
    )  # fmt: skip
    out = _collect(ds)
    assert sorted(out["patch_id"]) == sorted(table.column("patch_id").to_pylist())
    assert (
        out["image"].shape == (table.num_rows, INPUT, INPUT, 3) and out["image"].dtype == np.uint8
    )
    assert (
        out["pseudo_label"].shape == (table.num_rows, INPUT, INPUT)
        and out["pseudo_label"].dtype == np.uint8
    )
    assert set(np.unique(out["pseudo_label"])) <= {0, 1} and out["pseudo_label"].mean() > 0.02
    # one record checked against the teacher run by hand on the same patch
    from histokd.manifest import PatchReader

    row = table.slice(0, 1).to_pylist()[0]
    i = int(np.flatnonzero(out["patch_id"] == row["patch_id"])[0])
    assert (out["slide"][i], out["x"][i], out["y"][i]) == (row["slide_path"], row["x"], row["y"])
    patch = PatchReader().read(row)
    expected = resize_label(build_teacher("deconvolution").pseudo_label(patch)[0], INPUT)
    np.testing.assert_array_equal(out["pseudo_label"][i], expected)
    np.testing.assert_array_equal(out["image"][i], resize_image(patch, INPUT))


def test_rerun_labels_only_what_is_missing(ray_cluster, manifest, tmp_path):
    table = pq.read_table(manifest)
    half = table.slice(0, table.num_rows // 2)
    first = _collect(
        pseudo_label_dataset(
            half, "deconvolution", input_size=INPUT, cache_dir=tmp_path, batch_size=4
        )
    )
    cache = RecordCache.for_teacher(tmp_path, "deconvolution", None, INPUT)
    before = {p: p.stat().st_mtime_ns for p in cache.shards()}
    assert len(cache.index()) == half.num_rows

    second = _collect(
        pseudo_label_dataset(
            table, "deconvolution", input_size=INPUT, cache_dir=tmp_path, batch_size=4
        )
    )
    assert sorted(second["patch_id"]) == sorted(table.column("patch_id").to_pylist())
    after = cache.shards()
    new = [p for p in after if p not in before]
    labelled_again = {
        k for p in new for k in pq.read_table(p, columns=["key"]).column("key").to_pylist()
    }
    assert len(labelled_again) == table.num_rows - half.num_rows  # only the missing half
    assert all(p.stat().st_mtime_ns == before[p] for p in before)  # cached shards untouched
    # cached labels come back identical
    _assert_same_labels(first, second)
    # a third run labels nothing
    _collect(
        pseudo_label_dataset(
            table, "deconvolution", input_size=INPUT, cache_dir=tmp_path, batch_size=4
        )
    )
    assert len(cache.shards()) == len(after)


def test_epochs_and_reruns_read_no_slide_and_run_no_teacher(
    ray_cluster, manifest, tmp_path, capsys
):
    """The first phase labels and stores every record; then the slides are moved away. Two
    epochs over the dataset and a rerun still give every record, identical, from the shards:
    no slide is read (a fresh patch reader would fail), no teacher runs (it writes shards)."""
    import shutil

    from histokd import streams

    table = pq.read_table(manifest).slice(0, 8)
    slides = sorted(set(table.column("slide_path").to_pylist()))
    (tmp_path / "slides").mkdir()
    copies = {s: str(tmp_path / "slides" / f"{i}{Path(s).suffix}") for i, s in enumerate(slides)}
    for source, copy in copies.items():
        shutil.copy(source, copy)
    paths = pa.array([copies[s] for s in table.column("slide_path").to_pylist()], pa.string())
    table = table.set_column(table.column_names.index("slide_path"), "slide_path", paths)
    make = lambda: pseudo_label_dataset(  # noqa: E731
        table, "deconvolution", input_size=INPUT, cache_dir=tmp_path / "cache", batch_size=4,
        record_format="png",
    )  # fmt: skip
    ds = make()
    assert "record cache: 8/8 patches labelled and stored" in capsys.readouterr().out
    cache = RecordCache.for_teacher(tmp_path / "cache", "deconvolution", None, INPUT, "png")
    shards = {p: p.stat().st_mtime_ns for p in cache.shards()}
    assert len(shards) == 2 and len(cache.index()) == 8
    (tmp_path / "slides").rename(tmp_path / "moved")

    first, second = _collect(ds), _collect(ds)  # two training epochs
    again = _collect(make())  # a rerun
    assert "labelled" not in capsys.readouterr().out
    for out in (first, second, again):
        assert sorted(out["patch_id"]) == sorted(table.column("patch_id").to_pylist())
        order = np.argsort(out["patch_id"])
        for key in ("image", "pseudo_label"):
            np.testing.assert_array_equal(
                out[key][order], first[key][np.argsort(first["patch_id"])]
            )
    assert {p: p.stat().st_mtime_ns for p in cache.shards()} == shards  # no teacher wrote any
    stats = ds.stats()
    assert (
        "read_cached_batch" in stats
        and "TeacherActor" not in stats
        and "read_patch_batch" not in stats
    )
    # the records are exactly the patches' (lossless PNG), and reading them opens no slide
    reader = PatchReader()
    (tmp_path / "moved").rename(tmp_path / "slides")
    expected = np.stack([resize_image(reader.read(row), INPUT) for row in table.to_pylist()])
    reader.close()
    (tmp_path / "slides").rename(tmp_path / "moved")
    np.testing.assert_array_equal(first["image"][np.argsort(first["patch_id"])],
                                  expected[np.argsort(table.column("patch_id").to_pylist())])  # fmt: skip
    streams._PATCH_READER = None  # this process's reader: fresh, no slide open
    index = cache.index()
    batch = {k: np.asarray(v) for k, v in table.to_pydict().items()}
    keys = [patch_key(s, x, y, m, p, INPUT) for s, x, y, m, p in
            zip(*(batch[c] for c in ("slide_path", "x", "y", "magnification", "patch_size")), strict=True)]  # fmt: skip
    batch["cache_shard"] = np.array([index[k][0] for k in keys])
    batch["cache_row"] = np.array([index[k][1] for k in keys])
    records = read_cached_batch(batch, INPUT)
    np.testing.assert_array_equal(records["image"], expected)


def test_a_damaged_shard_is_set_aside_and_its_records_made_again(
    ray_cluster, manifest, tmp_path, capsys
):
    table = pq.read_table(manifest).slice(0, 8)
    make = lambda: pseudo_label_dataset(  # noqa: E731
        table, "deconvolution", input_size=INPUT, cache_dir=tmp_path, batch_size=4
    )  # fmt: skip
    first = _collect(make())
    cache = RecordCache.for_teacher(tmp_path, "deconvolution", None, INPUT)
    damaged, kept = cache.shards()
    kept_time = kept.stat().st_mtime_ns
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the images
    damaged.write_bytes(bytes(data))
    capsys.readouterr()
    again = _collect(make())
    printed = capsys.readouterr().out
    assert (
        "damaged record cache shard" in printed
        and "record cache: 4/4 patches labelled and stored" in printed
    )
    assert Path(f"{damaged}.bad").is_file() and damaged.is_file()  # made again, under its name
    assert kept.stat().st_mtime_ns == kept_time and len(cache.index()) == 8
    assert sorted(again["patch_id"]) == sorted(first["patch_id"])
    _assert_same_labels(again, first)


def _teacher_actors() -> list[dict]:
    # Ray's GCS actor table (the public ray.util.state API needs the dashboard, which the test
    # cluster runs without).
    from ray._private import state

    return [a for a in state.actors().values() if "MapWorker" in a["ActorClassName"]]


def test_dead_teacher_actor_is_replaced(ray_cluster, manifest, tmp_path):
    """SIGKILL the StarDist actor mid-stream: Ray Data restarts it, retries its batch, and
    every manifest patch still comes out exactly once."""
    table = pq.read_table(manifest)
    batches = -(-table.num_rows // 2)
    cache = RecordCache.for_teacher(tmp_path, "demo", None, INPUT)
    killed: dict = {}

    def kill_after_first_batch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not cache.shards():
            time.sleep(0.05)
        alive = [a for a in _teacher_actors() if a["State"] == "ALIVE"]
        if alive:
            killed["shards"] = len(cache.shards())
            killed["pid"] = alive[0]["Pid"]
            os.kill(alive[0]["Pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_after_first_batch)
    killer.start()  # the labelling phase runs inside pseudo_label_dataset
    out = _collect(
        pseudo_label_dataset(manifest, "demo", input_size=INPUT, cache_dir=tmp_path, batch_size=2)
    )
    killer.join()
    print("killed", killed, "of", batches, "batches")
    assert killed, "the teacher actor was never seen alive"
    assert killed["shards"] < batches, "the stream finished before the kill: nothing was tested"
    assert sorted(out["patch_id"]) == sorted(table.column("patch_id").to_pylist())  # exactly once
    assert any(a["NumRestarts"] >= 1 for a in _teacher_actors())
    assert len(cache.index()) == table.num_rows


def test_published_architecture_through_the_stream(ray_cluster, manifest, versatile_he_folder):
    """2D_versatile_he's real config (random weights): shapes and grid through loader and stream."""
    table = pq.read_table(manifest).slice(0, 6)
    ds = pseudo_label_dataset(
        table,
        str(versatile_he_folder),
        teacher_kwargs={"require_weights": False},
        input_size=INPUT,
        batch_size=3,
    )
    out = _collect(ds)
    # no cache: reads run as their own tasks, not fused into the teacher actor
    assert "read_patch_batch)->MapBatches(TeacherActor)" not in ds.stats()
    assert len(out["patch_id"]) == 6 and len(set(out["patch_id"])) == 6
    assert out["pseudo_label"].shape == (6, INPUT, INPUT) and set(
        np.unique(out["pseudo_label"])
    ) <= {0, 1}


@pytest.mark.parametrize(("field", "value"), [("input_size", 0), ("batch_size", 2.5)])
def test_stream_sizes_are_checked_before_any_work(field, value):
    from histokd.teachers.stream import patch_dataset

    sizes = {"input_size": 64, "batch_size": 4, field: value}
    for make in (
        lambda: pseudo_label_dataset("no-manifest", "deconvolution", **sizes),
        lambda: patch_dataset("no-manifest", **sizes),
    ):
        with pytest.raises(TeacherError, match=f"{field}={value!r}: must be a positive integer"):
            make()


# -- a user's teacher ---------------------------------------------------------------------------
PLUGIN = '''
import numpy as np
from histokd.teachers import register_teacher
from histokd.teachers.deconvolution import DeconvolutionTeacher


class Inverted(DeconvolutionTeacher):
    """A teacher of the user's own: colour deconvolution with its labels flipped."""

    def pseudo_label(self, images):
        return 1 - super().pseudo_label(images)


@register_teacher("inverted")
def _inverted(**kwargs):
    return Inverted(**kwargs)
'''

PLUGIN_RUN = """
import sys
import numpy as np
import pyarrow.parquet as pq
import ray
from histokd.teachers import build_teacher
from histokd.teachers.stream import pseudo_label_dataset

manifest, cache = sys.argv[1:3]
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
# only the spec names the module, as on the command line
out = pseudo_label_dataset(manifest, "my_lab_teachers:inverted", input_size=64, cache_dir=cache + "/a",
                           batch_size=4).take_all()
import my_lab_teachers  # noqa: F401, E402 - now the driver imported the module; the actors must too
again = pseudo_label_dataset(manifest, "inverted", input_size=64, cache_dir=cache + "/b", batch_size=4).take_all()
assert sorted(r["patch_id"] for r in again) == sorted(r["patch_id"] for r in out)
by_hand = build_teacher("my_lab_teachers:inverted")
deconv = build_teacher("deconvolution")
row = pq.read_table(manifest).slice(0, 1).to_pylist()[0]
from histokd.manifest import PatchReader
from histokd.teachers.stream import resize_label
patch = PatchReader().read(row)
got = next(r["pseudo_label"] for r in out if r["patch_id"] == row["patch_id"])
assert np.array_equal(got, resize_label(by_hand.pseudo_label(patch)[0], 64))
assert not np.array_equal(got, resize_label(deconv.pseudo_label(patch)[0], 64))
print("labelled", len(out))
"""


def test_a_registered_teacher_works_in_ray_actors_and_from_the_cli(manifest, tmp_path):
    """A teacher from a user's module (``@register_teacher``) labels in Ray's teacher actors,
    whether the driver imported its module or the spec names it (``module:name``), and the job's
    command line accepts that spec. Fresh processes: the actors must import the module themselves."""
    import subprocess

    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "my_lab_teachers.py").write_text(PLUGIN)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(tmp_path / "plugin"), os.environ.get("PYTHONPATH", "")]),
    )
    script = tmp_path / "run.py"
    script.write_text(PLUGIN_RUN)
    out = subprocess.run([sys.executable, str(script), str(manifest), str(tmp_path / "cache")],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert out.returncode == 0 and "labelled" in out.stdout, out.stderr[-3000:]
    # the job's command line takes the spec, and checks it
    job = Path(__file__).resolve().parents[2] / "jobs" / "rckd_pretrain.py"
    cli = subprocess.run([sys.executable, str(job), "--slides", "x.svs", "--teacher", "my_lab_teachers:inverted",
                          "--storage-path", str(tmp_path / "runs"), "--print-config"],
                         capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert cli.returncode == 0 and "teacher: my_lab_teachers:inverted" in cli.stdout, cli.stderr[
        -2000:
    ]
    bad = subprocess.run([sys.executable, str(job), "--slides", "x.svs", "--teacher", "my_lab_teachers:nope",
                          "--print-config"], capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert (
        bad.returncode != 0 and "module 'my_lab_teachers' registers no teacher 'nope'" in bad.stderr
    )
