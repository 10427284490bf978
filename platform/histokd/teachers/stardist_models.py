"""StarDist model folders and StarDist's pretrained-model cache, for both teacher backends.

A StarDist model folder holds ``config.json``, ``thresholds.json`` and ``weights_best.h5``, and,
when histokd trained or checked it, ``histokd_teacher.json`` with the teacher's own defaults
(alpha, mask mode). StarDist's registered models (``2D_versatile_he``: RCKD's teacher) are
downloaded once into Keras' cache, ``$KERAS_HOME/models/StarDist2D/<name>/`` (``~/.keras``
when ``KERAS_HOME`` is unset), where StarDist itself puts them; both backends read them there.

Nothing here imports TensorFlow: without it, a registered model downloads from the same URL,
checked against the same SHA-256 that StarDist registers (stardist/models/__init__.py, 0.9.2).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from histokd.teachers.base import TeacherError

__all__ = [
    "DEFAULTS_FILE",
    "NORMALIZATIONS",
    "NORMALIZE_PERCENTILES",
    "PRETRAINED_SETTINGS",
    "STARDIST_PRETRAINED",
    "check_model_folder",
    "folder_defaults",
    "keras_cache_dir",
    "pretrained_folder",
]

log = logging.getLogger(__name__)

_RELEASES = "https://github.com/stardist/stardist-models/releases/download/v0.1"
# StarDist2D's registered models: URL and SHA-256 of each zip (stardist/models/__init__.py, 0.9.2).
_PRETRAINED = {
    "2D_versatile_he": (f"{_RELEASES}/python_2D_versatile_he.zip", "f1696ef0631bd7e1c0e5c0d3017e2b4c6a95e284c6aab9c22fc2f08317817b28"),
    "2D_versatile_fluo": (f"{_RELEASES}/python_2D_versatile_fluo.zip", "4ad678d0758eed6e55625f1b5ae30771e59adb79f1239e09b9772eac8846c3dd"),
    "2D_paper_dsb2018": (f"{_RELEASES}/python_2D_paper_dsb2018.zip", "4c11cf68512341d9e8ce3d1278c64ceb8ac400582739f85fcab079a2e82840d2"),
    "2D_demo": (f"{_RELEASES}/python_2D_demo.zip", "a1efaebd7103db6236655bf158b6e21cf5b38d58ec77a509802244a89a260fa4"),
}  # fmt: skip
STARDIST_PRETRAINED = tuple(_PRETRAINED)

# StarDist's H&E example normalises each image jointly over its three channels at the 1st and
# 99.8th percentiles: normalize(img, 1, 99.8, axis=(0, 1, 2)).
NORMALIZE_PERCENTILES = (1.0, 99.8)
NORMALIZATIONS = ("joint", "per_channel")

# How the registered models were trained, where nobody stored it beside their weights. 2D_versatile_he:
# "trained on images from the MoNuSeg 2018 training data and the TNBC dataset" (StarDist's README,
# pretrained models), MoNuSeg's 1000x1000 TCGA crops at 40x (0.25 um/px; Kumar et al. 2020), and
# normalised jointly at 1/99.8 as its example notebook does (examples/other2D/predict_he.ipynb:
# normalize(img, 1, 99.8, axis=(0, 1, 2))).
PRETRAINED_SETTINGS = {
    "2D_versatile_he": {"teacher_mpp": 0.25, "normalization": "joint", "percentiles": [1.0, 99.8]},
}

# A teacher's own defaults (alpha, mask mode), written beside its weights by the training job.
DEFAULTS_FILE = "histokd_teacher.json"
_DEFAULT_KEYS = ("alpha", "mask_mode", "normalization", "percentiles", "teacher_mpp")


def check_model_folder(folder: str | os.PathLike, require_weights: bool = True) -> Path:
    """The folder, resolved, if it holds a StarDist model; else one clear error.

    Args:
        folder: The model folder.
        require_weights: Refuse a folder without ``*.h5`` weights (a teacher with random
            weights labels nothing useful; tests allow it to run the published architecture).
    """
    folder = Path(folder).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise TeacherError(
            f"{folder}: not a StarDist model folder (no config.json); expected config.json, "
            "thresholds.json and weights_best.h5"
        )
    try:
        config = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TeacherError(f"{folder / 'config.json'}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise TeacherError(
            f"{folder / 'config.json'}: expected a JSON object, got {type(config).__name__}"
        )
    if require_weights and not (sorted(folder.glob("*.h5")) + sorted(folder.glob("*.hdf5"))):
        raise TeacherError(
            f"{folder}: no network weights (weights_best.h5); a teacher with random weights "
            "labels nothing useful (require_weights=False allows it for tests)"
        )
    return folder


def folder_defaults(folder: Path, kwargs: dict, source: str | None = None) -> dict:
    """``kwargs`` with the teacher's own settings where a key is missing or None.

    The folder's ``histokd_teacher.json`` first, then, for a registered model (``source``),
    how it was trained (:data:`PRETRAINED_SETTINGS`).
    """
    kwargs = {k: v for k, v in kwargs.items() if not (k in _DEFAULT_KEYS and v is None)}
    path = folder / DEFAULTS_FILE
    if path.is_file():
        try:
            defaults = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TeacherError(f"{path}: not valid JSON ({exc})") from exc
        for key in _DEFAULT_KEYS:
            if key in defaults and defaults[key] is not None:
                kwargs.setdefault(key, defaults[key])
    for key, value in PRETRAINED_SETTINGS.get(source or "", {}).items():
        kwargs.setdefault(key, value)
    return kwargs


def keras_cache_dir() -> Path:
    """Keras' cache folder, as Keras decides it: ``$KERAS_HOME``, else ``~/.keras``."""
    home = os.environ.get("KERAS_HOME")
    if home:
        return Path(home).expanduser()
    default = Path("~/.keras").expanduser()
    return default if os.access(default.parent, os.W_OK) else Path(tempfile.gettempdir()) / ".keras"


def _cached_folder(base: Path, name: str) -> Path | None:
    # Keras >= 3.6 extracts to <name>_extracted/ (csbdeep links <name> to it); older Keras in place.
    for candidate in (base / name, base / f"{name}_extracted", base):
        for folder in (candidate, *sorted(p for p in candidate.glob("*") if p.is_dir())):
            if (folder / "config.json").is_file() and (folder / "weights_best.h5").is_file():
                return folder
    return None


def pretrained_folder(name: str) -> Path:
    """The model folder of a registered StarDist model, downloaded into StarDist's cache once.

    With StarDist installed, StarDist's own download (``csbdeep``'s ``get_model_folder``) fills
    the cache; without it the same zip is fetched from the same URL and checked against the
    same hash.

    Raises:
        TeacherError: Unknown name, or not cached and the download fails (offline).
    """
    if name not in _PRETRAINED:
        raise TeacherError(
            f"StarDist model name {name!r} is not registered; allowed: {', '.join(STARDIST_PRETRAINED)}, "
            "or a path to a model folder"
        )
    base = keras_cache_dir() / "models" / "StarDist2D" / name
    folder = _cached_folder(base, name)
    if folder is not None:
        return folder
    try:
        _download(name, base)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise TeacherError(
            f"StarDist model {name!r} is not cached ({base / f'{name}.zip'}) and could not be downloaded: {exc}. "
            "Run once with internet access (KERAS_HOME decides the cache folder), or give a "
            "model folder with config.json, thresholds.json and weights_best.h5, or use the "
            "offline teachers 'demo' or 'deconvolution'."
        ) from exc
    folder = _cached_folder(base, name)
    if folder is None:
        raise TeacherError(
            f"StarDist model {name!r}: the download into {base} holds no config.json and weights_best.h5"
        )
    return folder


def _download(name: str, base: Path) -> None:
    url, sha256 = _PRETRAINED[name]
    try:  # StarDist's own download and cache, when StarDist is installed
        from csbdeep.models.pretrained import get_model_folder
        from stardist.models import StarDist2D
    except ImportError:
        pass
    else:
        try:
            get_model_folder(StarDist2D, name)
            return
        except Exception as exc:  # noqa: BLE001 - keras raises a bare Exception when offline
            raise OSError(str(exc)) from exc
    base.mkdir(parents=True, exist_ok=True)
    archive = base / f"{name}.zip"
    log.info("downloading StarDist model %s from %s into %s", name, url, base)
    with tempfile.NamedTemporaryFile(dir=base, suffix=".part", delete=False) as part:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - fixed https URL
                shutil.copyfileobj(response, part)
            part.close()
            digest = hashlib.sha256(Path(part.name).read_bytes()).hexdigest()
            if digest != sha256:
                raise ValueError(
                    f"{url}: SHA-256 {digest} differs from StarDist's registered {sha256}"
                )
            os.replace(part.name, archive)
        finally:
            Path(part.name).unlink(missing_ok=True)
    target = base / f"{name}_extracted"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(target)
