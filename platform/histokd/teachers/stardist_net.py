"""StarDist2D's network in PyTorch, built from a model folder's ``config.json``, weights from its h5.

StarDist (Schmidt et al. 2018) is a plain U-Net (CSBDeep's ``unet_block``) behind a few
convolutions that max-pool the input down to the output grid, then a ``features`` convolution
and two 1x1 heads: ``prob`` (sigmoid object probability) and ``dist`` (the ray distances).
This module rebuilds exactly that (``stardist/models/model2d.py:StarDist2D._build``, 0.9.2) so
the pseudo label (RCKD Eq. 1-2, which needs only ``prob``) runs without TensorFlow.

Weights load from the Keras ``weights_best.h5`` with h5py, by layer name: Keras 2 names datasets
``<layer>/<layer>/kernel:0``, Keras 3 ``<layer>/<layer>/kernel``. StarDist leaves the grid
convolutions and batch norms unnamed, so Keras numbers them (``conv2d``, ``conv2d_1``, ...) in the
order it created them; those are matched by that number, never by their order in the file.

Nothing here imports TensorFlow, Ray, OpenSlide or MLflow.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histokd.teachers.base import TeacherError

__all__ = ["StarDistNet", "StarDistNetConfig", "load_keras_weights"]

_ACTIVATIONS = {
    "relu": lambda: nn.ReLU(inplace=True),
    "elu": lambda: nn.ELU(inplace=True),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "linear": nn.Identity,
    None: nn.Identity,
}


class StarDistNetConfig:
    """The fields of a StarDist2D ``config.json`` that shape the network, checked.

    Args:
        config: The parsed ``config.json``.
        source: The file it came from, for error messages.

    Raises:
        TeacherError: A field this network does not support, naming the field and its value.
    """

    def __init__(self, config: Mapping, source: str = "config.json"):
        def field(name: str, default=None, required: bool = True):
            if name not in config:
                if required:
                    raise TeacherError(
                        f"{source}: field {name!r} is missing (a StarDist2D config.json has it)"
                    )
                return default
            return config[name]

        def refuse(name: str, value, allowed: str):
            raise TeacherError(f"{source}: {name}={value!r} is not supported; allowed: {allowed}")

        if field("n_dim", 2, required=False) != 2:
            refuse("n_dim", config["n_dim"], "2 (StarDist2D)")
        if field("backbone") != "unet":
            refuse("backbone", config["backbone"], "'unet'")
        axes = field("axes", "YXC", required=False)
        if axes != "YXC":
            refuse("axes", axes, "'YXC'")
        self.n_channel_in = int(field("n_channel_in"))
        if self.n_channel_in not in (1, 3):
            refuse("n_channel_in", self.n_channel_in, "1 or 3")
        self.n_rays = int(field("n_rays"))
        self.n_classes = field("n_classes", None, required=False)
        if self.n_classes is not None and (
            not isinstance(self.n_classes, int) or self.n_classes < 1
        ):
            refuse("n_classes", self.n_classes, "null or a positive integer")
        self.grid = _pair(field("grid"), "grid", source)
        self.depth = int(field("unet_n_depth"))
        if self.depth < 1:
            refuse("unet_n_depth", self.depth, "an integer >= 1")
        self.kernel_size = _pair(field("unet_kernel_size"), "unet_kernel_size", source)
        if any(
            k % 2 == 0 for k in self.kernel_size
        ):  # 'same' padding is symmetric only for odd sizes
            refuse("unet_kernel_size", list(self.kernel_size), "odd sizes")
        self.filter_base = int(field("unet_n_filter_base"))
        self.conv_per_depth = int(field("unet_n_conv_per_depth"))
        if self.conv_per_depth < 1:
            refuse("unet_n_conv_per_depth", self.conv_per_depth, "an integer >= 1")
        self.pool = _pair(field("unet_pool"), "unet_pool", source)
        self.activation = field("unet_activation")
        self.last_activation = (
            field("unet_last_activation", None, required=False) or self.activation
        )
        for name, value in (
            ("unet_activation", self.activation),
            ("unet_last_activation", self.last_activation),
        ):
            if value not in _ACTIVATIONS or value is None:
                refuse(name, value, ", ".join(k for k in _ACTIVATIONS if k))
        self.batch_norm = bool(field("unet_batch_norm", False, required=False))
        dropout = field("unet_dropout", 0.0, required=False)
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            refuse("unet_dropout", dropout, "a number in [0, 1) (off at inference)")
        self.expansion = field("unet_expansion", 2, required=False)
        if not isinstance(self.expansion, (int, float)) or self.expansion <= 0:
            refuse("unet_expansion", self.expansion, "a positive number")
        self.prefix = field("unet_prefix", "", required=False) or ""
        self.conv_after_unet = int(field("net_conv_after_unet", 0, required=False))
        shape = field("net_input_shape", None, required=False)
        if shape is not None and (len(shape) != 3 or shape[-1] != self.n_channel_in):
            refuse("net_input_shape", shape, f"[null, null, {self.n_channel_in}]")

    @property
    def div_by(self) -> tuple[int, int]:
        """Height and width must be multiples of this: the grid times the U-Net's pooling."""
        return tuple(g * p**self.depth for g, p in zip(self.grid, self.pool, strict=True))

    def filters(self, level: int) -> int:
        """Filters of a U-Net level, as CSBDeep computes them."""
        return int(self.filter_base * self.expansion**level)


def _pair(value, name: str, source: str) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    if not (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and v >= 1 for v in value)
    ):
        raise TeacherError(
            f"{source}: {name}={value!r} is not supported; allowed: two positive integers"
        )
    return int(value[0]), int(value[1])


class _ConvBlock(nn.Module):
    """CSBDeep's ``conv_block2``: convolution ('same'), optional batch norm, activation."""

    def __init__(
        self, cin: int, cout: int, kernel_size: tuple[int, int], activation: str, batch_norm: bool
    ):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=tuple(k // 2 for k in kernel_size))
        self.norm = (
            nn.BatchNorm2d(cout, eps=1e-3) if batch_norm else nn.Identity()
        )  # Keras' epsilon
        self.act = _ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class StarDistNet(nn.Module):
    """StarDist2D's U-Net, its ``features`` convolution and its heads.

    ``forward`` returns the object probability at the model's grid, (N, 1, H/gy, W/gx), for a
    normalised float input (N, C, H, W) whose height and width are multiples of
    :attr:`StarDistNetConfig.div_by`. :meth:`forward_all` adds the ray distances (and class
    probabilities when the model has classes).

    Args:
        config: The model's ``config.json`` (a mapping) or a checked :class:`StarDistNetConfig`.
    """

    def __init__(self, config: Mapping | StarDistNetConfig):
        super().__init__()
        cfg = config if isinstance(config, StarDistNetConfig) else StarDistNetConfig(config)
        self.config = cfg
        k, act = cfg.kernel_size, cfg.activation
        # Keras layer name -> module, for loading. Unnamed layers get ("conv2d", i) / ("batch_norm", i).
        self._keras_names: dict[str, nn.Module] = {}
        self._unnamed_convs: list[nn.Conv2d] = []
        self._norms: list[nn.BatchNorm2d] = []

        # Max-pool the input to the output grid (no batch norm here: plain Conv2D layers).
        self.grid_stages = nn.ModuleList()
        pooled, cin = [1, 1], cfg.n_channel_in
        while tuple(pooled) != cfg.grid:
            pool = tuple(1 + int(g > p) for g, p in zip(cfg.grid, pooled, strict=True))
            pooled = [p * q for p, q in zip(pooled, pool, strict=True)]
            convs = []
            for _ in range(cfg.conv_per_depth):
                block = _ConvBlock(cin, cfg.filter_base, k, act, batch_norm=False)
                self._unnamed_convs.append(block.conv)
                convs.append(block)
                cin = cfg.filter_base
            self.grid_stages.append(nn.Sequential(*convs, nn.MaxPool2d(pool, pool)))

        def block(name: str, cin: int, cout: int, activation: str = act) -> _ConvBlock:
            b = _ConvBlock(cin, cout, k, activation, cfg.batch_norm)
            self._keras_names[cfg.prefix + name] = b.conv
            if cfg.batch_norm:
                self._norms.append(b.norm)
            return b

        n, c = cfg.conv_per_depth, cfg.filters
        self.down = nn.ModuleList()
        for level in range(cfg.depth):
            convs = []
            for i in range(n):
                convs.append(block(f"down_level_{level}_no_{i}", cin, c(level)))
                cin = c(level)
            self.down.append(nn.Sequential(*convs))
        self.pool = nn.MaxPool2d(cfg.pool, cfg.pool)
        middle = []
        for i in range(n - 1):
            middle.append(block(f"middle_{i}", cin, c(cfg.depth)))
            cin = c(cfg.depth)
        middle.append(block(f"middle_{n}", cin, c(max(0, cfg.depth - 1))))
        self.middle = nn.Sequential(*middle)
        cin = c(max(0, cfg.depth - 1))
        self.up = nn.ModuleList()
        for level in reversed(range(cfg.depth)):
            cin += c(level)  # concatenated skip
            convs = []
            for i in range(n - 1):
                convs.append(block(f"up_level_{level}_no_{i}", cin, c(level)))
                cin = c(level)
            last = act if level > 0 else cfg.last_activation
            convs.append(block(f"up_level_{level}_no_{n}", cin, c(max(0, level - 1)), last))
            cin = c(max(0, level - 1))
            self.up.append(nn.Sequential(*convs))
        unet_out = cin

        def head(name: str, cin: int, cout: int, kernel: tuple[int, int]) -> nn.Conv2d:
            conv = nn.Conv2d(cin, cout, kernel, padding=tuple(x // 2 for x in kernel))
            self._keras_names[name] = conv
            return conv

        self.features = nn.Identity()
        if cfg.conv_after_unet > 0:
            self.features = nn.Sequential(
                head("features", unet_out, cfg.conv_after_unet, k), _ACTIVATIONS[act]()
            )
            cin = cfg.conv_after_unet
        self.prob = head("prob", cin, 1, (1, 1))
        self.dist = head("dist", cin, cfg.n_rays, (1, 1))
        self.features_class: nn.Module | None = None
        if cfg.n_classes is not None:
            ccin = unet_out
            if cfg.conv_after_unet > 0:
                self.features_class = nn.Sequential(
                    head("features_class", unet_out, cfg.conv_after_unet, k), _ACTIVATIONS[act]()
                )
                ccin = cfg.conv_after_unet
            self.prob_class = head("prob_class", ccin, cfg.n_classes + 1, (1, 1))

    def unet(self, x: torch.Tensor) -> torch.Tensor:
        """The grid stages and the U-Net (CSBDeep ``unet_block``): the input of the heads."""
        for stage in self.grid_stages:
            x = stage(x)
        skips = []
        for down in self.down:
            x = down(x)
            skips.append(x)
            x = self.pool(x)
        x = self.middle(x)
        for up, skip in zip(self.up, reversed(skips), strict=True):
            x = torch.cat(
                [F.interpolate(x, scale_factor=self.config.pool, mode="nearest"), skip], dim=1
            )
            x = up(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Object probability at the grid, (N, 1, H/gy, W/gx): the ``prob`` head (sigmoid)."""
        return torch.sigmoid(self.prob(self.features(self.unet(x))))

    def forward_all(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every head: ``prob``, ``dist`` and, for models with classes, ``prob_class``."""
        base = self.unet(x)
        feats = self.features(base)
        out = {"prob": torch.sigmoid(self.prob(feats)), "dist": self.dist(feats)}
        if self.config.n_classes is not None:
            fc = self.features_class(base) if self.features_class is not None else base
            out["prob_class"] = torch.softmax(self.prob_class(fc), dim=1)
        return out

    @classmethod
    def from_folder(cls, folder: str | Path, weights: str | Path | None = None) -> StarDistNet:
        """The network of a StarDist model folder, with ``weights_best.h5`` (or ``weights``) loaded."""
        folder = Path(folder)
        config_path = folder / "config.json"
        try:
            config = json.loads(config_path.read_text())
        except FileNotFoundError as exc:
            raise TeacherError(f"{folder}: not a StarDist model folder (no config.json)") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TeacherError(f"{config_path}: not valid JSON ({exc})") from exc
        if not isinstance(config, dict):
            raise TeacherError(
                f"{config_path}: expected a JSON object, got {type(config).__name__}"
            )
        net = cls(StarDistNetConfig(config, source=str(config_path)))
        load_keras_weights(net, weights or folder / "weights_best.h5")
        return net.eval()


_SUFFIX = re.compile(r"^(?P<base>.*?)(?:_(?P<num>\d+))?$")


def _creation_order(name: str) -> tuple[str, int]:
    """Keras' automatic names count up: ``conv2d`` (0), ``conv2d_1`` (1), ``conv2d_12`` (12)."""
    match = _SUFFIX.match(name)
    return match["base"], int(match["num"] or 0)


def _read_layers(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """``{layer: {weight: array}}`` from a Keras 2 or Keras 3 h5 weights file.

    Each layer group's ``weight_names`` attribute (``<layer>/kernel:0`` in Keras 2,
    ``<layer>/kernel`` in Keras 3) names its datasets; the weight is the last path part without
    ``:0``.
    """
    import h5py

    try:
        handle = h5py.File(path, "r")
    except FileNotFoundError as exc:
        raise TeacherError(f"{path}: no network weights (weights_best.h5)") from exc
    except OSError as exc:
        raise TeacherError(f"{path}: not a readable HDF5 weights file ({exc})") from exc
    layers: dict[str, dict[str, np.ndarray]] = {}
    with handle as f:
        root = (
            f["model_weights"] if "model_weights" in f else f
        )  # a whole-model save holds them here
        for layer, group in root.items():
            if not isinstance(group, h5py.Group):
                continue
            names = [
                n.decode() if isinstance(n, bytes) else str(n)
                for n in group.attrs.get("weight_names", [])
            ]
            weights = {}
            for name in names:
                weights[name.split("/")[-1].split(":")[0]] = np.asarray(group[name])
            if weights:
                layers[layer] = weights
    if not layers:
        raise TeacherError(
            f"{path}: no layer weights found (expected a Keras save_weights h5 file)"
        )
    return layers


def load_keras_weights(net: StarDistNet, path: str | Path) -> StarDistNet:
    """Load a StarDist Keras h5 weights file into ``net``, every layer by its name.

    Raises:
        TeacherError: The file is missing or unreadable, a layer the network needs is missing,
            the file has a layer the network does not, or a shape differs.
    """
    path = Path(path)
    layers = _read_layers(path)
    targets: dict[str, nn.Module] = dict(net._keras_names)
    convs = sorted(
        (n for n in layers if "kernel" in layers[n] and n not in targets), key=_creation_order
    )
    norms = sorted((n for n in layers if "moving_mean" in layers[n]), key=_creation_order)
    if len(convs) != len(net._unnamed_convs):
        raise TeacherError(
            f"{path}: {len(convs)} unnamed or unexpected convolution layer(s) ({', '.join(convs) or 'none'}), "
            f"but the config's grid {net.config.grid} needs {len(net._unnamed_convs)}; missing: "
            f"{', '.join(sorted(set(targets) - set(layers))) or 'none'}"
        )
    if len(norms) != len(net._norms):
        raise TeacherError(
            f"{path}: {len(norms)} batch-norm layer(s), but unet_batch_norm={net.config.batch_norm} needs {len(net._norms)}"
        )
    targets.update(zip(convs, net._unnamed_convs, strict=True))
    targets.update(zip(norms, net._norms, strict=True))
    missing = sorted(set(targets) - set(layers))
    extra = sorted(set(layers) - set(targets))
    if missing or extra:
        raise TeacherError(
            f"{path}: does not match the config: missing layer(s) {', '.join(missing) or 'none'}; "
            f"extra layer(s) {', '.join(extra) or 'none'}"
        )
    with torch.no_grad():
        for name, module in targets.items():
            weights = layers[name]
            if isinstance(module, nn.Conv2d):
                pairs = {
                    "weight": np.transpose(weights.get("kernel"), (3, 2, 0, 1)),
                    "bias": weights.get("bias"),
                }
            else:
                pairs = {
                    "weight": weights.get("gamma"),
                    "bias": weights.get("beta"),
                    "running_mean": weights.get("moving_mean"),
                    "running_var": weights.get("moving_variance"),
                }
            for attr, value in pairs.items():
                tensor = getattr(module, attr)
                if value is None:
                    raise TeacherError(
                        f"{path}: layer {name!r} has no {attr} (found {', '.join(weights)})"
                    )
                if tuple(value.shape) != tuple(tensor.shape):
                    raise TeacherError(
                        f"{path}: layer {name!r} {attr} has shape {tuple(value.shape)}; the config needs {tuple(tensor.shape)}"
                    )
                tensor.copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))
    return net
