"""Shared fixtures: the real test data beside the repo, a local Ray, tiled TIFFs written here."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a model hub

REPO = Path(__file__).resolve().parents[1]
TESTDATA = REPO.parent / "shared" / "testdata"


@pytest.fixture(scope="session")
def testdata() -> Path:
    """../shared/testdata, or a skip saying it is missing."""
    if not TESTDATA.is_dir():
        pytest.skip(f"real test data not found at {TESTDATA} (see DEVELOPERS.md)")
    return TESTDATA


@pytest.fixture(scope="session")
def slides_dir(testdata: Path) -> Path:
    return testdata / "slides"


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (starting one takes seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
            configure_logging=False)  # fmt: skip
    yield ray
    ray.shutdown()


def write_tiled_tiff(
    path: Path,
    image: np.ndarray,
    mpp: float | None = None,
    tile: int = 256,
    levels: int = 1,
    compression: str = "jpeg",
) -> Path:
    """A generic tiled (optionally pyramidal) TIFF that OpenSlide opens, from an RGB array."""
    import tifffile
    from PIL import Image

    kwargs = {}
    if mpp is not None:
        kwargs["resolution"] = (1e4 / mpp, 1e4 / mpp)
        kwargs["resolutionunit"] = "CENTIMETER"
    with tifffile.TiffWriter(path) as tif:
        current = image
        for level in range(levels):
            tif.write(
                current,
                tile=(tile, tile),
                compression=compression,
                photometric="rgb",
                subfiletype=0 if level == 0 else 1,
                **(kwargs if level == 0 else {}),
            )
            h, w = current.shape[:2]
            current = np.asarray(Image.fromarray(current).resize((max(1, w // 2), max(1, h // 2))))
    return path


@pytest.fixture
def tiled_tiff(tmp_path: Path):
    """Factory: write_tiled_tiff into the test's temporary folder."""

    def make(name: str, image: np.ndarray, **kwargs) -> Path:
        return write_tiled_tiff(tmp_path / name, image, **kwargs)

    return make


@pytest.fixture(scope="session")
def demo_slides_dir(tmp_path_factory) -> Path:
    """Two small synthetic demo slides, written once per session."""
    from histokd.demos.synthetic import make_demo_slides

    folder = tmp_path_factory.mktemp("demo_slides")
    make_demo_slides(folder, n=2, seed=0, width=2048, height=2048)
    return folder


TINY_PRETRAIN = dict(
    teacher="demo", patch_size=256, num_patches=24, input_size=64, batch_size=8, epochs=3, warmup_epochs=1, lr=0.5,
    holdout_fraction=0.2, teacher_batch_size=8, backbone="csat", run_name="tiny",
)  # fmt: skip


@pytest.fixture
def tiny_pretrain_config(tmp_path, demo_slides_dir):
    """Makes pretraining configs that run in seconds on the demo slides; keywords override."""
    from histokd.pretrain.config import PretrainConfig

    def make(**overrides):
        settings = dict(
            TINY_PRETRAIN, storage_path=str(tmp_path / "runs"), slides=[str(demo_slides_dir)]
        )
        settings.update(overrides)
        return PretrainConfig(**settings)

    return make


@pytest.fixture(scope="session")
def blocked_imports_env(tmp_path_factory):
    """Makes an environment whose Python processes (and the Ray workers they start) cannot import
    the given top-level packages, as on a machine without them.

    A ``sitecustomize`` first on ``PYTHONPATH`` sets each to None in ``sys.modules``: that is how
    Python spells "not installed" (``import x`` raises ModuleNotFoundError, ``find_spec(x)`` is
    None). A meta-path finder that raised instead would also break libraries that probe for
    optional packages with ``find_spec`` (torch._dynamo does, on import).
    """

    def make(blocked: tuple[str, ...], base: dict | None = None) -> dict[str, str]:
        site = tmp_path_factory.mktemp("blocked-site")
        (site / "sitecustomize.py").write_text(
            f"import sys\n\nfor _name in {tuple(blocked)!r}:\n    sys.modules[_name] = None\n"
        )
        env = dict(os.environ if base is None else base)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(site), str(REPO / "platform"), env.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep)
        return env

    return make


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """Factory: an offline Hugging Face cache (``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1``) holding a
    timm model's ImageNet checkpoint as the Hub lays it out (``models--timm--NAME.TAG``: blob,
    ``refs/main``, ``snapshots/REV/model.safetensors`` and ``config.json`` linked to it), with
    weights of ``timm.create_model(arch)`` under ``seed``, each float tensor shifted by a seeded
    uniform draw; returns them and the snapshot file.

    huggingface_hub reads both variables when it is imported, so its constants are set too:
    this is the real Hub client and timm's real loader, pointed at the test's cache.
    """
    import hashlib
    import json

    import huggingface_hub.constants
    import timm
    import torch
    from safetensors.torch import save_file

    cache = tmp_path / "hf_hub_cache"
    cache.mkdir()
    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def make(arch: str = "resnet18", seed: int = 11, head: bool = True):
        hub_id = timm.models.get_pretrained_cfg(arch).hf_hub_id  # timm/ARCH.TAG
        torch.manual_seed(seed)
        state = timm.create_model(arch, num_classes=1000 if head else 0).state_dict()
        # every float tensor moved off its initialisation (norm weights are 1, biases 0), so that
        # each one tells the checkpoint's weights from a fresh model's
        state = {
            k: v + torch.rand_like(v) if v.is_floating_point() else v for k, v in state.items()
        }
        repo = cache / f"models--{hub_id.replace('/', '--')}"
        revision = hashlib.sha1(hub_id.encode()).hexdigest()
        snapshot = repo / "snapshots" / revision
        (repo / "blobs").mkdir(parents=True)
        snapshot.mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision)
        config = {"architecture": arch, "num_classes": 1000, "pretrained_cfg": {"tag": hub_id}}
        for name, write in (
            ("model.safetensors", lambda p: save_file({k: v.contiguous() for k, v in state.items()}, str(p))),
            ("config.json", lambda p: p.write_text(json.dumps(config))),
        ):  # fmt: skip
            staged = repo / "blobs" / "staged"
            write(staged)
            blob = repo / "blobs" / hashlib.sha256(staged.read_bytes()).hexdigest()
            staged.rename(blob)
            (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
        return state, snapshot / "model.safetensors"

    return make


def pytest_collection_modifyitems(config, items):
    """The test that starts a cluster with the ray CLI goes last: it ends the session's in-process Ray
    (with `-n 2`, that of its own test process)."""
    items.sort(key=lambda item: item.get_closest_marker("ray_cli") is not None)
