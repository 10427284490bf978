"""The StarDist teacher's TensorFlow backend (StarDist itself): normalisation, grid upsampling,
loading, and the published architecture (2D_versatile_he's config with random weights: its
weights need internet). The PyTorch backend is tested against it in test_stardist_torch.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from histokd.teachers import TeacherError, build_teacher
from histokd.teachers.stardist_base import grid_upsample, normalize_percentiles


def test_percentile_normalize_equals_csbdeep():
    from csbdeep.utils import normalize

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 37, 53, 3), dtype=np.uint8)
    images[1] = images[1] // 4 + 90  # low contrast
    images[2, :20] = 255  # saturated
    ours = normalize_percentiles(torch.from_numpy(images)).numpy()
    theirs = np.stack([normalize(im, 1, 99.8, axis=(0, 1, 2)) for im in images])
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_upsample_grid_by_hand():
    prob = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    up = grid_upsample(prob, (2, 2), (4, 4)).numpy()
    # cell i is pixel 2i; pixel 1 is halfway; pixels past the last cell repeat it
    expected_row0 = [0.0, 0.5, 1.0, 1.0]
    np.testing.assert_allclose(up[0, 0], expected_row0)
    np.testing.assert_allclose(up[0, 1], [1.0, 1.5, 2.0, 2.0])
    np.testing.assert_allclose(up[0, 2], [2.0, 2.5, 3.0, 3.0])
    np.testing.assert_allclose(up[0, 3], up[0, 2])
    assert grid_upsample(prob, (1, 1), (2, 2)) is prob  # grid 1 at the same size: nothing to do


@pytest.fixture(scope="module")
def random_versatile_he(versatile_he_folder):
    return build_teacher(
        str(versatile_he_folder), require_weights=False, batch_size=2, backend="tensorflow"
    )


def test_folder_without_weights_is_refused(versatile_he_folder):
    with pytest.raises(TeacherError, match="no network weights.*require_weights=False"):
        build_teacher(str(versatile_he_folder))


def test_published_architecture_loads(random_versatile_he, versatile_he_folder):
    teacher = random_versatile_he
    config = json.loads((versatile_he_folder / "config.json").read_text())
    assert teacher.grid == tuple(config["grid"]) == (2, 2)
    assert teacher.model.config.n_rays == 32 and teacher.model.config.unet_n_depth == 3
    assert teacher.div_by == (16, 16)  # 2**3 pooling x grid 2
    assert teacher.alpha == 0.5 and teacher.name == "stardist:2D_versatile_he[alpha=0.5]"
    assert teacher.model.thresholds.prob == pytest.approx(0.6924782541382084)


@pytest.mark.parametrize("shape", [(3, 64, 64), (1, 100, 75), (2, 17, 250)])
def test_any_patch_size_comes_back_at_its_size(random_versatile_he, shape):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    prob = random_versatile_he.probability(images)
    assert prob.shape == shape and prob.dtype == np.float32
    assert 0 <= prob.min() and prob.max() <= 1
    grid = random_versatile_he.grid_probability(images)
    assert grid.shape == (shape[0], -(-shape[1] // 2), -(-shape[2] // 2))
    labels = random_versatile_he.pseudo_label(images)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1}
    np.testing.assert_array_equal(labels, (prob >= 0.5).astype(np.uint8))


def test_batches_do_not_mix(random_versatile_he):
    """Chunking (batch_size=2) and per-image normalisation: a patch's label is its own."""
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (5, 48, 48, 3), dtype=np.uint8)
    together = random_versatile_he.probability(images)
    alone = np.concatenate([random_versatile_he.probability(im[None]) for im in images])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_instances_mode(versatile_he_folder):
    teacher = build_teacher(str(versatile_he_folder), require_weights=False, mask_mode="instances")
    images = np.random.default_rng(3).integers(0, 256, (2, 64, 80, 3), dtype=np.uint8)
    labels = teacher.pseudo_label(images)
    assert labels.shape == (2, 64, 80) and labels.dtype == np.uint8
    assert teacher.name.endswith("[instances]")


def test_not_a_model_folder(tmp_path):
    with pytest.raises(TeacherError, match="not a StarDist model folder.*config.json"):
        build_teacher(str(tmp_path))


def test_unknown_registered_name():
    with pytest.raises(TeacherError, match="no StarDist model '2D_nope'; allowed: 2D_versatile_he"):
        build_teacher("stardist:2D_nope")


def test_offline_and_not_cached_is_one_clear_error(tmp_path, monkeypatch):
    """Mocked network: tests must never download (with internet this would fetch 5 MB)."""
    pytest.importorskip("stardist")
    from keras.src.backend import config
    from keras.src.utils import file_utils

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(config, "_KERAS_DIR", str(tmp_path))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # where histokd looks, as Keras does at import
    monkeypatch.setattr(file_utils, "urlretrieve", offline)
    with pytest.raises(TeacherError) as err:
        build_teacher("stardist:2D_versatile_he")
    message = str(err.value)
    assert "'2D_versatile_he' is not cached" in message
    assert (
        str(Path(tmp_path) / "models" / "StarDist2D" / "2D_versatile_he" / "2D_versatile_he.zip")
        in message
    )
    assert "'demo' or 'deconvolution'" in message


# The child blocks every socket connection (recording where it went) before anything imports.
_OFFLINE_CHILD = """
import json, socket
attempts = []
def refuse(self, address):
    attempts.append(repr(address))
    raise ConnectionRefusedError(f"network disabled by the test: {address!r}")
socket.socket.connect = refuse
from histokd.teachers import TeacherError, build_teacher
try:
    build_teacher("2D_versatile_he")
except TeacherError as exc:
    print(json.dumps({"error": str(exc), "attempts": attempts}))
else:
    print(json.dumps({"error": None, "attempts": attempts}))
"""


def test_keras_home_from_the_environment_names_the_cache_in_the_offline_error(tmp_path):
    """KERAS_HOME set in the environment (not patched in Keras) decides where 2D_versatile_he is
    looked for; offline (HF_HUB_OFFLINE=1, a dead proxy, sockets refused) the one error names it."""
    pytest.importorskip("stardist")
    keras_home = tmp_path / "keras home"
    home = tmp_path / "home"  # were KERAS_HOME ignored, Keras would use $HOME/.keras
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "keras_home")}
    dead_proxy = "http://127.0.0.1:9"
    env.update(
        KERAS_HOME=str(keras_home), HOME=str(home), HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="3",
        CUDA_VISIBLE_DEVICES="", HTTP_PROXY=dead_proxy, HTTPS_PROXY=dead_proxy, http_proxy=dead_proxy,
        https_proxy=dead_proxy,
    )  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", _OFFLINE_CHILD],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    message = report["error"]
    assert message is not None, (
        "2D_versatile_he loaded although nothing was cached and the network was off"
    )
    cached = keras_home / "models" / "StarDist2D" / "2D_versatile_he" / "2D_versatile_he.zip"
    assert f"'2D_versatile_he' is not cached ({cached}) and could not be downloaded" in message
    assert (
        "KERAS_HOME decides the cache folder" in message and "'demo' or 'deconvolution'" in message
    )
    assert str(home) not in message and not (home / ".keras" / "models").exists()
    # Keras itself made the cache folder under KERAS_HOME, and nothing was downloaded into it
    assert cached.parent.is_dir() and not cached.exists()
    assert all("127.0.0.1" in a for a in report["attempts"]), report[
        "attempts"
    ]  # only the dead proxy


@pytest.mark.parametrize("shape", [(2, 64, 64), (1, 100, 75)])
def test_device_fast_path_equals_numpy_reference(random_versatile_he, shape):
    """Normalisation, grid upsampling and Eq. 2 in TensorFlow match the NumPy reference."""
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    images[0, :10] = 250
    teacher = random_versatile_he
    reference = grid_upsample(
        torch.from_numpy(teacher.grid_probability(images)), teacher.grid, shape[1:]
    ).numpy()
    prob = teacher.probability(images)
    np.testing.assert_allclose(prob, reference, atol=2e-5)
    # Eq. 2 on the device: equal except where the probability sits on alpha within rounding
    alpha = float(np.median(prob))
    teacher.settings = type(teacher.settings)(alpha=alpha)
    labels = teacher.pseudo_label(images)
    decided = np.abs(reference - alpha) > 1e-5
    np.testing.assert_array_equal(labels[decided], (reference >= alpha)[decided].astype(np.uint8))
    teacher.settings = type(teacher.settings)(alpha=0.5)


def test_eq2_ties_at_alpha_are_nucleus(random_versatile_he, ties_at_alpha, tiles_dir):
    """The TensorFlow backend's Eq. 2 is ``>=``: pixels exactly at alpha are labelled."""
    from PIL import Image

    tile = np.asarray(Image.open(tiles_dir / "medium-nuclei-score-level0.png").convert("RGB"))
    images = np.stack([tile[:64, :64], tile[64:128, 64:128]])
    images[1, :32] = 242  # flat glass: many pixels share one probability
    assert ties_at_alpha(random_versatile_he, images) >= 1
