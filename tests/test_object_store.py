"""Slides on object storage, against moto's S3 server on 127.0.0.1 (never the internet).

The server runs in this test process, so it counts every request, also those of other
processes (Ray workers, spawned readers), and can answer chosen GETs with HTTP 503.
gs:// is not tested beyond its missing-extra message: there is no GCS server to run here.
"""

from __future__ import annotations

import collections
import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from histokd import object_store
from histokd.manifest import (
    ManifestConfig,
    _fingerprint,
    build_manifest,
    discover_slides,
    read_manifest,
)
from histokd.object_store import ObjectStoreError, SlideCache
from histokd.slides import SlideError, SlideReader

moto_server = pytest.importorskip("moto.server")

BUCKET = "cohort"
CONFIG = ManifestConfig(magnification=10, patch_size=128, num_patches=30, seed=3)
REPO = Path(__file__).resolve().parents[1]


class _CountingMotoServer(moto_server.ThreadedMotoServer):
    """moto's server, its WSGI app wrapped to count requests by (method, path) and to answer
    the next ``fail[path]`` GETs of a path with 503 (-1: all of them)."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1", 0, verbose=False)  # port 0: a free one
        self.requests: collections.Counter = collections.Counter()
        self.fail: dict[str, int] = {}
        self._count_lock = threading.Lock()

    def gets(self, key: str) -> int:
        return self.requests["GET", f"/{BUCKET}/{key}"]

    def _server_entry(self) -> None:  # moto's own, with the app wrapped
        from werkzeug.serving import make_server

        app = moto_server.DomainDispatcherApplication(moto_server.create_backend_app)

        def counting(environ, start_response):
            method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
            with self._count_lock:
                self.requests[method, path] += 1
                left = self.fail.get(path, 0) if method == "GET" else 0
                if left > 0:
                    self.fail[path] = left - 1
            if left:
                start_response("503 Service Unavailable", [("Content-Type", "application/xml")])
                return [b"<Error><Code>ServiceUnavailable</Code><Message>down</Message></Error>"]
            return app(environ, start_response)

        self._server = make_server(
            self._ip_address, self._port, counting, True,
            request_handler=moto_server.MotoRequestHandler,
        )  # fmt: skip
        self._server_ready_event.set()
        self._server.serve_forever()


def _s3_env(endpoint: str) -> dict[str, str]:
    """Credentials for moto, and none of this machine's AWS settings or instance metadata."""
    return {
        "HISTOKD_S3_ENDPOINT": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


@pytest.fixture(scope="module")
def s3(slides_dir, demo_slides_dir, tmp_path_factory):
    """A bucket with a real SVS, a broken one and two demo slides (with their truth files)
    under ``slides/``, and the same files in a local folder."""
    import boto3

    server = _CountingMotoServer()
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    local = tmp_path_factory.mktemp("local_slides")
    for name in ["cmu-1-small-region.svs", "broken.svs"]:
        shutil.copy(slides_dir / name, local / name)
    for file in demo_slides_dir.iterdir():
        shutil.copy(file, local / file.name)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in _s3_env(endpoint).items():
            mp.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            mp.delenv(key, raising=False)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        for file in local.iterdir():
            client.upload_file(str(file), BUCKET, f"slides/{file.name}")
        client.put_object(Bucket=BUCKET, Key="slides/README.md", Body=b"not a slide")
        # a sibling prefix that starts like the listed one
        client.upload_file(str(local / "broken.svs"), BUCKET, "slides-old/old.svs")
        yield SimpleNamespace(server=server, client=client, endpoint=endpoint, local=local)
    server.stop()


@pytest.fixture(autouse=True)
def slide_cache(tmp_path, monkeypatch, request):
    """A fresh node cache per test; request counts start at zero."""
    monkeypatch.setenv("HISTOKD_SLIDE_CACHE", str(tmp_path / "cache"))
    if "s3" in request.fixturenames:
        server = request.getfixturevalue("s3").server
        server.requests.clear()
        server.fail.clear()
    return tmp_path / "cache"


def test_a_prefix_lists_like_a_folder_and_the_fingerprint_follows_the_etag(s3):
    urls = discover_slides(f"s3://{BUCKET}/slides")
    assert urls == discover_slides(f"s3://{BUCKET}/slides/")
    names = [u.rsplit("/", 1)[1] for u in urls]
    local_names = [Path(p).name for p in discover_slides(s3.local)]
    # the same slides as the local folder: no truth masks, no README, nothing from slides-old/
    assert names == local_names == [
        "broken.svs", "cmu-1-small-region.svs", "demo-s0-000.svs", "demo-s0-001.svs",
    ]  # fmt: skip
    assert all(u.startswith(f"s3://{BUCKET}/slides/") for u in urls)
    one = f"s3://{BUCKET}/slides/broken.svs"
    assert discover_slides([one, one]) == [one]

    # fingerprint: size and ETag from the listing, no HEAD per slide; a rewrite changes it
    s3.server.requests.clear()
    before = _fingerprint(discover_slides(f"s3://{BUCKET}/slides"), CONFIG)
    assert sum(n for (method, _), n in s3.server.requests.items() if method == "HEAD") == 0
    s3.client.put_object(Bucket=BUCKET, Key="slides/broken.svs", Body=b"rewritten")
    assert _fingerprint(discover_slides(f"s3://{BUCKET}/slides"), CONFIG) != before
    s3.client.upload_file(str(s3.local / "broken.svs"), BUCKET, "slides/broken.svs")
    assert _fingerprint(discover_slides(f"s3://{BUCKET}/slides"), CONFIG) == before


def test_missing_bucket_credentials_and_extras_are_one_line(s3, monkeypatch):
    with pytest.raises(ObjectStoreError, match=r"^s3://no-such-bucket/x: bucket not found") as e:
        discover_slides("s3://no-such-bucket/x")
    assert "\n" not in str(e.value)
    # a missing object is a bad slide naming the URL, found at once (not retried)
    with pytest.raises(SlideError, match=r"^s3://cohort/slides/gone.svs: object not found"):
        SlideReader(f"s3://{BUCKET}/slides/gone.svs")
    assert s3.server.requests["HEAD", f"/{BUCKET}/slides/gone.svs"] == 1
    # multi-file formats are refused before any request
    with pytest.raises(SlideError, match=r"MIRAX slides are several files.*shared file system"):
        SlideReader(f"s3://{BUCKET}/slides/a.mrxs")
    try:
        import google.cloud.storage  # noqa: F401
    except ImportError:
        with pytest.raises(ObjectStoreError, match=r"^gs://b/p: .*pip install 'histokd\[gcs\]'"):
            discover_slides("gs://b/p")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    with pytest.raises(ObjectStoreError, match=r"^s3://cohort/slides: no AWS credentials found"):
        discover_slides(f"s3://{BUCKET}/slides")
    monkeypatch.setenv("HISTOKD_SLIDE_CACHE_GB", "lots")
    with pytest.raises(ValueError, match=r"^HISTOKD_SLIDE_CACHE_GB='lots': must be a positive"):
        object_store.default_cache()


_READER = """
import json, sys, time
from pathlib import Path
from histokd.slides import SlideReader
ready, go, url = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
ready.touch()
while not go.exists():
    time.sleep(0.005)
with SlideReader(url) as reader:
    print(json.dumps(float(reader.read_region(512, 512, 64, 10).mean())))
"""


def test_concurrent_readers_on_a_node_download_a_slide_once(s3, slide_cache, tmp_path):
    url = f"s3://{BUCKET}/slides/cmu-1-small-region.svs"
    with SlideReader(s3.local / "cmu-1-small-region.svs") as reader:
        expected = float(reader.read_region(512, 512, 64, 10).mean())

    # four processes, started together once each has imported histokd
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _READER, str(tmp_path / f"ready{i}"), str(go), url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(4)
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in range(4)):
        assert time.monotonic() < deadline, "readers did not start"
        time.sleep(0.01)
    go.touch()
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, results
    assert [json.loads(out) for out, _ in results] == [pytest.approx(expected)] * 4
    assert s3.server.gets("slides/cmu-1-small-region.svs") == 1
    copies = [f for f in slide_cache.iterdir() if f.suffix == ".svs"]
    assert len(copies) == 1 and copies[0].stat().st_size == 1938955
    assert not [f for f in slide_cache.iterdir() if f.name.endswith(".tmp")]

    # four threads of one process, into another cache folder
    s3.server.requests.clear()
    cache = SlideCache(tmp_path / "threads", max_bytes=10**9)
    barrier = threading.Barrier(4)
    held = []

    def open_it() -> None:
        barrier.wait()
        held.append(cache.open(url))

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({h.path for h in held}) == 1 and len(held) == 4
    assert s3.server.gets("slides/cmu-1-small-region.svs") == 1
    for h in held:
        h.release()


def test_least_recently_used_copies_are_evicted_but_never_one_in_use(s3, tmp_path):
    source = s3.local / "cmu-1-small-region.svs"
    size = source.stat().st_size
    urls = {}
    for name in "abc":
        s3.client.upload_file(str(source), BUCKET, f"lru/{name}.svs")
        urls[name] = f"s3://{BUCKET}/lru/{name}.svs"

    def cached(folder: Path) -> set[str]:
        return {f.name.split("-")[0] for f in folder.iterdir() if f.suffix == ".svs"}

    folder = tmp_path / "lru"
    cache = SlideCache(folder, max_bytes=int(2.5 * size))  # room for two
    for name in "aba":  # a is used last: b is the least recently used
        cache.open(urls[name]).release()
        time.sleep(0.02)
    assert cached(folder) == {"a", "b"}
    cache.open(urls["c"]).release()
    assert cached(folder) == {"a", "c"}
    assert [s3.server.gets(f"lru/{n}.svs") for n in "abc"] == [1, 1, 1]  # a was a hit

    small = SlideCache(folder, max_bytes=int(1.5 * size))  # room for one
    time.sleep(0.02)
    with small.open(urls["a"]):  # a in use: c is evicted, a stays though over the cap
        time.sleep(0.02)
        small.open(urls["b"]).release()
        assert cached(folder) == {"a", "b"}
    small.open(urls["c"]).release()  # a released: now it goes
    assert cached(folder) == {"c"}
    assert [s3.server.gets(f"lru/{n}.svs") for n in "abc"] == [1, 2, 2]


def _bad_slides(path: Path) -> dict[str, dict]:
    with open(path) as f:
        return {row["slide_path"].rsplit("/", 1)[1]: row for row in csv.DictReader(f)}


def test_failed_downloads_are_retried_then_the_slide_is_bad(s3, tmp_path, monkeypatch):
    for name in ["cmu-1-small-region.svs", "demo-s0-000.svs"]:
        s3.client.upload_file(str(s3.local / name), BUCKET, f"flaky/{name}")
    s3.client.upload_file(str(s3.local / "demo-s0-001.svs"), BUCKET, "flaky/deleted.svs")
    urls = discover_slides(f"s3://{BUCKET}/flaky")
    assert len(urls) == 3

    # two 503s, then the third try reads it
    s3.server.fail[f"/{BUCKET}/flaky/cmu-1-small-region.svs"] = 2
    start = time.monotonic()
    with SlideReader(urls[0]) as reader:
        assert reader.info.dimensions == (2220, 2967)
    assert time.monotonic() - start >= 3.0  # waited 1 s, then 2 s
    assert s3.server.gets("flaky/cmu-1-small-region.svs") == 3

    # one deleted after the listing, one failing every try: both bad slides, the rest used
    s3.client.delete_object(Bucket=BUCKET, Key="flaky/deleted.svs")
    s3.server.fail[f"/{BUCKET}/flaky/demo-s0-000.svs"] = -1
    result = build_manifest(urls, tmp_path / "m", CONFIG, use_ray=False)
    bad = _bad_slides(result.bad_slides_path)
    assert set(bad) == {"deleted.svs", "demo-s0-000.svs"}
    assert bad["deleted.svs"]["reason"] == f"{urls[1]}: object not found (HTTP 404)"
    assert bad["demo-s0-000.svs"]["reason"].startswith(f"{urls[2]}: S3 error ServiceUnavailable")
    assert bad["demo-s0-000.svs"]["reason"].endswith("(failed 3 tries)")
    assert s3.server.gets("flaky/demo-s0-000.svs") == 3
    assert s3.server.gets("flaky/deleted.svs") == 0
    table = read_manifest(result.manifest_path).to_pandas()
    assert set(table.slide_path) == {urls[0]} and len(table) == CONFIG.num_patches

    # the server down: three tries, then one line
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    monkeypatch.setenv("HISTOKD_S3_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    with pytest.raises(
        SlideError, match=r"cannot reach http://127.0.0.1:\d+: .*\(failed 3 tries\)$"
    ):
        SlideReader(urls[0])


@pytest.fixture(scope="module")
def local_manifest(s3, tmp_path_factory):
    out = tmp_path_factory.mktemp("local_manifest")
    return build_manifest(s3.local, out, CONFIG, use_ray=False)


def _same_patches(result, local) -> None:
    """The same patches as the local copy's manifest, the slides named by their URLs."""
    got = read_manifest(result.manifest_path).to_pandas()
    want = read_manifest(local.manifest_path).to_pandas()
    assert len(got) == len(want) == CONFIG.num_patches
    assert got.slide_path.str.startswith(f"s3://{BUCKET}/slides/").all()
    assert list(got.slide_path.str.rsplit("/", n=1).str[1]) == [
        Path(p).name for p in want.slide_path
    ]
    columns = ["sample_index", "x", "y", "extent", "level", "tissue_fraction", "mean_intensity"]
    assert got[columns].equals(want[columns])
    assert set(_bad_slides(result.bad_slides_path)) == {"broken.svs"}
    assert "not a slide format" in _bad_slides(result.bad_slides_path)["broken.svs"]["reason"]


def test_manifest_from_s3_matches_the_local_copy(s3, local_manifest, slide_cache, tmp_path):
    result = build_manifest(f"s3://{BUCKET}/slides", tmp_path / "m", CONFIG, use_ray=False)
    _same_patches(result, local_manifest)
    for name in ["cmu-1-small-region.svs", "demo-s0-000.svs", "demo-s0-001.svs"]:
        assert s3.server.gets(f"slides/{name}") == 1  # scan and verify share the copy
    # an open reader holds its copy; once closed (the object still alive), the copy can go
    reader = SlideReader(f"s3://{BUCKET}/slides/cmu-1-small-region.svs")
    evicted = SlideCache(slide_cache, max_bytes=1).make_room(0)
    assert sorted(p.name.split("-")[0] for p in evicted) == ["broken", "demo", "demo"]
    reader.close()
    evicted = SlideCache(slide_cache, max_bytes=1).make_room(0)
    assert [p.name.split("-")[0] for p in evicted] == ["cmu"]
    again = build_manifest(f"s3://{BUCKET}/slides", tmp_path / "m", CONFIG, use_ray=False)
    assert again.reused


_RAY_BUILD = """
import sys
import ray
from histokd.manifest import ManifestConfig, build_manifest
# a cluster of its own: a bare ray.init() would join a running one (`ray start` elsewhere)
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
config = ManifestConfig(**eval(sys.argv[3]))
build_manifest(sys.argv[1], sys.argv[2], config, use_ray=True, verify_chunk=4)
"""


def test_ray_tasks_read_slides_from_s3(s3, local_manifest, slide_cache, tmp_path):
    """A manifest built by Ray tasks in several worker processes, which share the node's cache."""
    settings = dict(magnification=10, patch_size=128, num_patches=30, seed=3)
    assert ManifestConfig(**settings) == CONFIG
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    done = subprocess.run(
        [sys.executable, "-c", _RAY_BUILD, f"s3://{BUCKET}/slides", str(tmp_path / "m"), repr(settings)],
        env=env, timeout=240, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = build_manifest(f"s3://{BUCKET}/slides", tmp_path / "m", CONFIG, use_ray=False)
    assert result.reused  # the one Ray wrote
    _same_patches(result, local_manifest)
    names = ["broken.svs", "cmu-1-small-region.svs", "demo-s0-000.svs", "demo-s0-001.svs"]
    assert [s3.server.gets(f"slides/{name}") for name in names] == [1, 1, 1, 1]
    assert len([f for f in slide_cache.iterdir() if f.suffix == ".svs"]) == 4
