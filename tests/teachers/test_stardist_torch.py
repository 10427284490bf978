"""StarDist in PyTorch against StarDist itself (TensorFlow): same network, same weights, same labels.

Models: the shipped demo teacher (Keras 3 weights, as TensorFlow 2.21 writes them) and a
2D_versatile_he-shaped model (its published config, seeded random weights written by a real
StarDist2D here, in the Keras 3 layout and rewritten in the Keras 2 layout). Inputs: real H&E
tiles (../shared/testdata/tiles) and held-out demo patches, at sizes not divisible by 2^depth.
Bar (issue 14): max |prob_torch - prob_tf| <= 1e-4 and >= 99.9 % equal pseudo-mask pixels.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from histokd.teachers import DEMO_TEACHER_DIR, TeacherError, build_teacher
from histokd.teachers.stardist_base import grid_upsample, normalize_percentiles, reflect_pad
from histokd.teachers.stardist_net import StarDistNet, StarDistNetConfig, load_keras_weights
from histokd.teachers.stardist_torch import TorchStarDistTeacher

pytest.importorskip("stardist", reason="parity needs StarDist itself (the tf-cpu extra)")

SIZES = [
    (256, 256),
    (250, 190),
    (100, 77),
    (37, 300),
]  # 2^depth x grid = 16: most are not multiples


def keras2_layout(keras3: Path, out: Path, rename: dict[str, str] | None = None) -> Path:
    """Rewrite a Keras 3 ``save_weights`` h5 file in Keras 2's layout (``<layer>/<layer>/kernel:0``).

    Layers are written in reverse order and may be renamed (Keras numbers unnamed layers per
    process: ``conv2d_5`` instead of ``conv2d``), so loading must go by name, never by order.
    """
    rename = rename or {}
    with h5py.File(keras3, "r") as src, h5py.File(out, "w") as dst:
        names = [n.decode() if isinstance(n, bytes) else n for n in src.attrs["layer_names"]]
        dst.attrs["layer_names"] = np.array([rename.get(n, n).encode() for n in names])
        dst.attrs["keras_version"] = b"2.15.0"
        dst.attrs["backend"] = b"tensorflow"
        for layer in reversed(names):
            new = rename.get(layer, layer)
            group = dst.create_group(new)
            weight_names = []
            for weight in src[layer].attrs.get("weight_names", []):
                weight = weight.decode() if isinstance(weight, bytes) else weight
                leaf = weight.split("/")[-1]
                name = f"{new}/{leaf}:0"
                group.create_dataset(name, data=np.asarray(src[layer][weight]))
                weight_names.append(name.encode())
            group.attrs["weight_names"] = np.array(weight_names)
    return out


@pytest.fixture(scope="module")
def versatile_he_weights(versatile_he_folder, tmp_path_factory) -> dict[str, Path]:
    """2D_versatile_he-shaped model folders with seeded weights, in both h5 layouts."""
    import keras
    from stardist.models import StarDist2D

    keras.utils.set_random_seed(0)
    base = tmp_path_factory.mktemp("versatile")
    folder3 = base / "keras3"
    shutil.copytree(versatile_he_folder, folder3)
    model = StarDist2D(None, name=folder3.name, basedir=str(base))
    model.keras_model.save_weights(str(folder3 / "weights_best.h5"))
    folder2 = base / "keras2"
    shutil.copytree(versatile_he_folder, folder2)
    keras2_layout(folder3 / "weights_best.h5", folder2 / "weights_best.h5")
    return {"keras3": folder3, "keras2": folder2}


@pytest.fixture(scope="module")
def real_tiles(tiles_dir) -> list[np.ndarray]:
    from PIL import Image

    names = [
        "high-nuclei-score-level0.png",
        "medium-nuclei-score-level1.png",
        "tissue-level2-4640-4649-8736-8746.png",
    ]
    return [np.asarray(Image.open(tiles_dir / n).convert("RGB")) for n in names]


def crops(tiles: list[np.ndarray], size: tuple[int, int], n: int = 2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        tile = tiles[i % len(tiles)]
        y = rng.integers(0, tile.shape[0] - size[0])
        x = rng.integers(0, tile.shape[1] - size[1])
        out.append(tile[y : y + size[0], x : x + size[1]])
    return np.ascontiguousarray(np.stack(out))


def assert_parity(tf_teacher, torch_teacher, images: np.ndarray) -> tuple[float, float]:
    prob_tf = tf_teacher.probability(images)
    prob_torch = torch_teacher.probability(images)
    diff = float(np.abs(prob_tf - prob_torch).max())
    assert diff <= 1e-4, diff
    agree = float((tf_teacher.pseudo_label(images) == torch_teacher.pseudo_label(images)).mean())
    assert agree >= 0.999, agree
    return diff, agree


@pytest.mark.parametrize("size", SIZES)
def test_demo_teacher_parity_on_real_tiles(real_tiles, size):
    tf_teacher = build_teacher("demo", backend="tensorflow")
    torch_teacher = build_teacher("demo", backend="torch", device="cpu")
    assert (
        isinstance(torch_teacher, TorchStarDistTeacher)
        and torch_teacher.alpha == tf_teacher.alpha == 0.1
    )
    images = crops(real_tiles, size, n=3)
    assert_parity(tf_teacher, torch_teacher, images)
    assert torch_teacher.pseudo_label(images).mean() > 0.02  # real nuclei found: not an empty map


def test_demo_teacher_parity_on_held_out_demo_patches(held_out_slides):
    from histokd.slides import SlideReader

    with SlideReader(held_out_slides[0].slide_path) as reader:
        patch = reader.read_region(0, 0, 1000, magnification=20)
    images = np.stack([patch[:500, :500], patch[500:, 500:]])
    tf_teacher = build_teacher("demo", backend="tensorflow")
    torch_teacher = build_teacher("demo", device="cpu")
    assert_parity(tf_teacher, torch_teacher, images)
    truth_fraction = torch_teacher.pseudo_label(images).mean()
    assert 0.05 < truth_fraction < 0.6  # demo slides are dense in nuclei


@pytest.mark.parametrize("layout", ["keras3", "keras2"])
@pytest.mark.parametrize("size", [(256, 256), (100, 77)])
def test_versatile_he_parity_both_layouts(versatile_he_weights, real_tiles, layout, size):
    folder = versatile_he_weights[layout]
    with h5py.File(folder / "weights_best.h5", "r") as f:
        sample = f["prob"].attrs["weight_names"][0]
        sample = sample.decode() if isinstance(sample, bytes) else sample
    assert sample.endswith(":0") == (layout == "keras2")
    images = crops(real_tiles, size, n=2, seed=1)
    torch_teacher = build_teacher(str(folder), device="cpu")
    # Random weights give a map far from 0.5: threshold at its median so both classes exist
    # and the mask comparison means something.
    alpha = float(np.median(torch_teacher.probability(images)))
    torch_teacher = build_teacher(str(folder), device="cpu", alpha=alpha)
    tf_teacher = build_teacher(
        str(versatile_he_weights["keras3"]), backend="tensorflow", alpha=alpha
    )
    assert_parity(tf_teacher, torch_teacher, images)
    assert 0.3 < torch_teacher.pseudo_label(images).mean() < 0.7


def test_keras2_renamed_and_reordered_layers_load_the_same(versatile_he_weights, tmp_path):
    folder = versatile_he_weights["keras3"]
    config = json.loads((folder / "config.json").read_text())
    reference = StarDistNet.from_folder(folder)
    with h5py.File(folder / "weights_best.h5", "r") as f:  # Keras numbered them in this process
        first, second = sorted(
            (n for n in f if n.startswith("conv2d")),
            key=lambda n: int(n.rsplit("_", 1)[-1]) if "_" in n else 0,
        )
    renamed = keras2_layout(
        folder / "weights_best.h5", tmp_path / "w.h5", {first: "conv2d_7", second: "conv2d_12"}
    )
    net = load_keras_weights(StarDistNet(config), renamed).eval()
    for (name, a), b in zip(reference.state_dict().items(), net.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # Swapping the numbers swaps the layers: order of creation decides, not order in the file
    swapped = keras2_layout(
        folder / "weights_best.h5", tmp_path / "s.h5", {first: "conv2d_12", second: "conv2d_7"}
    )
    with pytest.raises(TeacherError, match="shape"):
        load_keras_weights(StarDistNet(config), swapped)


def test_missing_and_extra_layers_are_named(versatile_he_weights, tmp_path):
    folder = versatile_he_weights["keras3"]
    config = json.loads((folder / "config.json").read_text())
    missing = tmp_path / "missing.h5"
    shutil.copy(folder / "weights_best.h5", missing)
    with h5py.File(missing, "a") as f:
        del f["middle_2"]
    with pytest.raises(TeacherError, match=r"missing layer\(s\) middle_2; extra layer\(s\) none"):
        load_keras_weights(StarDistNet(config), missing)
    extra = tmp_path / "extra.h5"
    shutil.copy(folder / "weights_best.h5", extra)
    with h5py.File(extra, "a") as f:
        group = f.create_group("surprise")
        group.create_dataset("surprise/kernel", data=np.zeros((1, 1, 2, 2), np.float32))
        group.attrs["weight_names"] = np.array([b"surprise/kernel"])
    with pytest.raises(TeacherError, match="surprise"):
        load_keras_weights(StarDistNet(config), extra)
    with pytest.raises(TeacherError, match="not a readable HDF5"):
        (tmp_path / "bad.h5").write_bytes(b"not hdf5")
        load_keras_weights(StarDistNet(config), tmp_path / "bad.h5")


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("backbone", "resnet", "'unet'"),
        ("n_dim", 3, "2 \\(StarDist2D\\)"),
        ("unet_kernel_size", [4, 4], "odd sizes"),
        ("unet_activation", "gelu", "relu"),
        ("n_channel_in", 2, "1 or 3"),
        ("grid", [2, 0], "two positive integers"),
    ],
)
def test_other_configs_are_refused_naming_field_and_value(
    versatile_he_folder, field, value, allowed
):
    config = json.loads((versatile_he_folder / "config.json").read_text())
    config[field] = value
    with pytest.raises(
        TeacherError, match=rf"{field}={value!r}".replace("[", r"\[") + f".*allowed: {allowed}"
    ):
        StarDistNet(config)


def test_config_variants_build_and_run():
    """Batch norm, depth 2, grid (1, 2) and 1 input channel: Keras-equal layer counts and shapes."""
    base = json.loads((DEMO_TEACHER_DIR / "config.json").read_text())
    config = dict(
        base,
        unet_batch_norm=True,
        unet_n_depth=2,
        grid=[1, 2],
        n_channel_in=1,
        net_conv_after_unet=0,
        net_input_shape=[None, None, 1],
    )
    net = StarDistNet(config).eval()
    cfg = StarDistNetConfig(config)
    assert cfg.div_by == (4, 8) and len(net._norms) == 2 * 2 + 2 + 2 * 2
    out = net.forward_all(torch.rand(2, 1, 32, 64))
    assert out["prob"].shape == (2, 1, 32, 32) and out["dist"].shape == (2, 32, 32, 32)


def test_batch_norm_parity_with_keras(tmp_path):
    """A batch-norm model, moving statistics included, equals Keras' output."""
    import keras
    from stardist.models import Config2D, StarDist2D

    keras.utils.set_random_seed(3)
    config = Config2D(
        n_rays=8,
        grid=(2, 2),
        n_channel_in=3,
        unet_batch_norm=True,
        unet_n_depth=2,
        unet_n_filter_base=8,
    )
    model = StarDist2D(config, name="bn", basedir=str(tmp_path))
    for layer in model.keras_model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            rng = np.random.default_rng(len(gamma))
            layer.set_weights(
                [
                    gamma * 1.5,
                    beta + 0.1,
                    rng.normal(0, 0.2, mean.shape),
                    var + rng.random(var.shape),
                ]
            )
    model.keras_model.save_weights(str(tmp_path / "bn" / "weights_best.h5"))
    net = StarDistNet.from_folder(tmp_path / "bn")
    x = np.random.default_rng(0).random((2, 48, 64, 3), np.float32)
    expected = np.asarray(model.keras_model.predict_on_batch(x)[0])[..., 0]
    got = net(torch.from_numpy(x).permute(0, 3, 1, 2))[:, 0].detach().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_padding_and_upsampling_as_numpy_and_stardist_do():
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.random((1, 2, 5, 3)).astype(np.float32))
    for div in [(16, 16), (8, 4), (1, 1)]:  # pads past the image size reflect again, as numpy does
        padded = reflect_pad(x, div).numpy()
        pads = ((0, 0), (0, 0), (0, (-5) % div[0]), (0, (-3) % div[1]))
        np.testing.assert_array_equal(padded, np.pad(x.numpy(), pads, mode="reflect"))
    prob = rng.random((1, 7, 9)).astype(np.float32)
    up = grid_upsample(torch.from_numpy(prob), (2, 2), (13, 18)).numpy()
    np.testing.assert_allclose(up[:, ::2, ::2], prob, atol=1e-6)  # cell i is pixel 2i
    np.testing.assert_allclose(
        up[0, 1, 0], (prob[0, 0, 0] + prob[0, 1, 0]) / 2, atol=1e-6
    )  # halfway between
    np.testing.assert_array_equal(up[0, :, 17], up[0, :, 16])  # past the last cell: the last cell


def test_eq2_ties_count_as_nucleus():
    """RCKD Eq. 2 is prob >= alpha: a pixel exactly at alpha is labelled."""
    teacher = build_teacher("demo", device="cpu")
    images = crops([np.full((64, 64, 3), 128, np.uint8)], (32, 32), n=1)
    prob = teacher.probability(images)
    teacher.settings = type(teacher.settings)(alpha=float(prob[0, 5, 5]))
    labels = teacher.pseudo_label(images)
    assert labels[0, 5, 5] == 1
    np.testing.assert_array_equal(labels, (prob >= teacher.alpha).astype(np.uint8))


def test_instances_run_in_tensorflow():
    from histokd.teachers.stardist_teacher import StarDistTeacher

    assert isinstance(build_teacher("demo", mask_mode="instances"), StarDistTeacher)
    with pytest.raises(TeacherError, match="needs TensorFlow.*backend='tensorflow'.*'tf-cpu'"):
        TorchStarDistTeacher.from_folder(DEMO_TEACHER_DIR, mask_mode="instances")


def test_instances_without_tensorflow_is_one_line_naming_the_extra(blocked_imports_env):
    env = blocked_imports_env(("tensorflow", "keras", "stardist", "csbdeep"))
    code = (
        "from histokd.teachers import build_teacher\nbuild_teacher('demo', mask_mode='instances')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0
    assert (
        "TeacherError: the TensorFlow StarDist backend needs TensorFlow and StarDist" in out.stderr
    )
    assert "pip install 'histokd[tf-cpu]'" in out.stderr


def test_pretrained_cache_converts_once(tmp_path, monkeypatch):
    """A registered model found in StarDist's cache loads without TensorFlow; the converted weights
    are cached beside it and reused while the h5 file is unchanged."""
    cache = tmp_path / "models" / "StarDist2D" / "2D_versatile_he"
    folder = cache / "2D_versatile_he_extracted"  # Keras >= 3.6's layout
    shutil.copytree(DEMO_TEACHER_DIR, folder)
    (folder / "histokd_teacher.json").unlink()
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    teacher = build_teacher("stardist:2D_versatile_he", device="cpu")
    converted = folder / "weights_best.torch.pt"
    assert converted.is_file() and teacher.name == "stardist:2D_versatile_he[alpha=0.5]"
    saved = torch.load(converted, weights_only=True)
    saved["state_dict"]["prob.bias"].fill_(-50.0)  # a marker: used only if the cache is read
    torch.save(saved, converted)
    images = crops([np.full((64, 64, 3), 90, np.uint8)], (32, 32), n=1)
    assert build_teacher("2D_versatile_he", device="cpu").probability(images).max() < 1e-6
    saved["h5_sha256"] = "0" * 64  # stale: converted again from the h5 file
    torch.save(saved, converted)
    assert build_teacher("2D_versatile_he", device="cpu").probability(images).max() > 1e-3


_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from histokd.teachers import build_teacher
    teacher = build_teacher("demo", device="cpu")
    images = np.random.default_rng(0).integers(0, 256, (2, 100, 77, 3), dtype=np.uint8)
    labels = teacher.pseudo_label(images)
    assert labels.shape == (2, 100, 77), labels.shape
    print("OK", labels.mean())
    """
)


def test_torch_teacher_runs_where_tensorflow_ray_openslide_mlflow_cannot_import(
    blocked_imports_env,
):
    env = blocked_imports_env(
        ("tensorflow", "keras", "stardist", "csbdeep", "ray", "openslide", "mlflow")
    )
    blocked = subprocess.run(
        [sys.executable, "-c", "import tensorflow"], env=env, capture_output=True, text=True
    )
    assert blocked.returncode != 0 and "ModuleNotFoundError" in blocked.stderr  # the block works
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("OK"), out.stdout


# -- the teacher as it was trained: normalisation and scale (issue 15) ----------------------------
def test_per_channel_normalisation_equals_csbdeep():
    from csbdeep.utils import normalize

    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (2, 31, 45, 3), dtype=np.uint8)
    images[0, ..., 2] //= 3  # a weak blue channel: per channel differs from joint
    theirs = np.stack([normalize(im, 2, 98, axis=(0, 1)) for im in images])
    ours = normalize_percentiles(torch.from_numpy(images), 2, 98, per_channel=True).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_scale_resamples_to_the_teacher_and_back(real_tiles):
    """20x patches and a 40x teacher: labelled at 2x, the probability brought back to 20x."""
    from histokd.teachers.stardist_base import resample_images, resample_probability

    images = crops(real_tiles, (96, 80), n=2, seed=3)
    same = build_teacher("demo", device="cpu")
    scaled = build_teacher("demo", device="cpu", teacher_mpp=0.25, patch_mpp=0.5)
    assert (
        scaled.scale == 2.0 and same.scale == 1.0 and scaled.name == "stardist:demo[alpha=0.1,x2]"
    )
    prob = scaled.probability(images)
    assert prob.shape == (2, 96, 80)
    x2 = resample_images(torch.from_numpy(images), (192, 160))
    by_hand = resample_probability(torch.from_numpy(same.probability(x2.numpy())), (96, 80)).numpy()
    np.testing.assert_allclose(prob, by_hand, atol=1e-6)
    assert np.abs(prob - same.probability(images)).max() > 0.05  # the scale changes the answer
    labels = scaled.pseudo_label(images)
    np.testing.assert_array_equal(labels, (prob >= 0.1).astype(np.uint8))
    assert (
        build_teacher("demo", teacher_mpp=0.5, patch_mpp=0.505).scale == 1.0
    )  # within 2 %: no resampling


def test_both_backends_agree_with_scale_and_per_channel(real_tiles):
    settings = dict(
        teacher_mpp=0.5, patch_mpp=0.25, normalization="per_channel", percentiles=(2, 99)
    )
    images = crops(real_tiles, (128, 100), n=2, seed=4)
    tf_teacher = build_teacher("demo", backend="tensorflow", **settings)
    torch_teacher = build_teacher("demo", device="cpu", **settings)
    assert torch_teacher.scale == tf_teacher.scale == 0.5
    assert_parity(tf_teacher, torch_teacher, images)
    instances = tf_teacher.instance_labels(images)
    assert instances.shape == images.shape[:3] and instances.max() > 0


def test_settings_come_from_the_folder_and_yield_to_arguments(tmp_path):
    folder = tmp_path / "teacher"
    shutil.copytree(DEMO_TEACHER_DIR, folder)
    stored = json.loads((folder / "histokd_teacher.json").read_text())
    stored.update(normalization="per_channel", percentiles=[3, 97], teacher_mpp=0.25)
    (folder / "histokd_teacher.json").write_text(json.dumps(stored))
    teacher = build_teacher(str(folder), device="cpu", patch_mpp=0.5)
    assert (teacher.normalization, teacher.percentiles, teacher.teacher_mpp, teacher.scale) == (
        "per_channel",
        (3.0, 97.0),
        0.25,
        2.0,
    )
    teacher = build_teacher(
        str(folder), device="cpu", normalization="joint", teacher_mpp=None, patch_mpp=0.5
    )
    assert (
        teacher.normalization == "joint" and teacher.teacher_mpp == 0.25
    )  # None: the folder's own
    for bad, match in [({"normalization": "rgb"}, "allowed: joint, per_channel"), ({"percentiles": [99, 1]}, "low < high"),
                       ({"teacher_mpp": -1}, "teacher_mpp=-1: must be a pixel size")]:  # fmt: skip
        with pytest.raises(TeacherError, match=match):
            build_teacher(str(folder), **bad)


def test_versatile_he_runs_at_40x_as_trained(tmp_path, monkeypatch):
    """2D_versatile_he's documented training scale and normalisation apply without a settings file."""
    folder = tmp_path / "models" / "StarDist2D" / "2D_versatile_he" / "2D_versatile_he"
    shutil.copytree(DEMO_TEACHER_DIR, folder)
    (folder / "histokd_teacher.json").unlink()
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    teacher = build_teacher("2D_versatile_he", device="cpu", patch_mpp=0.5)
    assert (teacher.teacher_mpp, teacher.normalization, teacher.percentiles, teacher.scale) == (
        0.25,
        "joint",
        (1.0, 99.8),
        2.0,
    )
