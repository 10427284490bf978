"""Work-arounds for the packages histokd installs, applied only where they are needed.

PyPI's torchvision wheels are CUDA builds. Beside the CPU torch wheel their compiled
extension (``torchvision/_C.so``) fails to load, and ``import torchvision`` then dies with
"operator torchvision::nms does not exist" because ``torchvision._meta_registrations``
registers fake kernels for ops whose schemas the extension would have defined. timm imports
torchvision, so every model import fails. Defining the two schemas ourselves, only when the
extension cannot load, lets torchvision (and timm) import; the ops themselves stay unusable,
and histokd never calls them.

``import histokd`` installs an import hook that applies the fix the moment anything imports
torchvision, so every process that imported histokd (Ray workers included) can import timm in
any order, and processes that never touch torchvision (the TensorFlow teacher actors) never
load torch for it.
"""

from __future__ import annotations

import importlib.util
import os

__all__ = ["ensure_torchvision", "install_import_hook"]

_done = False


def _extension_loads() -> bool:
    """Whether torchvision's compiled extension loads beside the installed torch."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision: nothing to fix
    folder = list(spec.submodule_search_locations)[0]
    candidates = [
        f for f in os.listdir(folder) if f.startswith("_C.") and f.endswith((".so", ".pyd"))
    ]
    if not candidates:
        return False
    try:
        torch.ops.load_library(os.path.join(folder, candidates[0]))
    except (OSError, RuntimeError):
        return False
    return True


def ensure_torchvision() -> bool:
    """Make ``import torchvision`` (and so ``import timm``) work beside a CPU torch.

    Returns:
        True when the op schemas had to be defined, False when nothing was needed.
    """
    global _done
    if _done:
        return False
    _done = True
    import sys

    if "torchvision" in sys.modules or _extension_loads():
        return False
    import torch

    lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 - must outlive this call
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    # Keep the library object alive: dropping it would unregister the schemas.
    globals()["_torchvision_lib"] = lib
    return True


class _TorchvisionHook:
    """A meta-path finder that runs :func:`ensure_torchvision` before torchvision's first import."""

    _busy = False

    def find_spec(self, name, path=None, target=None):  # noqa: D102 - importlib protocol
        if name != "torchvision" or self._busy or _done:
            return None
        type(self)._busy = True
        try:
            ensure_torchvision()
        finally:
            type(self)._busy = False
        return None  # let the normal finders import it

    def find_module(self, name, path=None):  # pragma: no cover - legacy protocol
        return None


def install_import_hook() -> None:
    """Apply :func:`ensure_torchvision` lazily, when torchvision is first imported."""
    import sys

    if "torchvision" in sys.modules or any(isinstance(f, _TorchvisionHook) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionHook())
