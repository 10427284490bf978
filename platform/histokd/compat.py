"""Import hooks for the packages histokd uses, applied only when those packages are imported.

``import histokd`` loads neither torch nor timm (the jobs' ``--help`` stays fast); it puts one
finder at the front of ``sys.meta_path`` that acts on two imports:

* **torchvision**, before it loads. PyPI's torchvision wheels are CUDA builds. Beside the CPU
  torch wheel their compiled extension (``torchvision/_C.so``) fails to load, and ``import
  torchvision`` then dies with "operator torchvision::nms does not exist" because
  ``torchvision._meta_registrations`` registers fake kernels for ops whose schemas the
  extension would have defined. timm imports torchvision, so every model import fails.
  Defining the two schemas ourselves, only when the extension cannot load, lets torchvision
  (and timm) import; the ops themselves stay unusable, and histokd never calls them.
* **timm**, right after it has loaded: importing ``histokd.models`` then registers histokd's
  backbones (``histokd_csat``, ``histokd_csat_nosat``, ``histokd_resnet18_sat``), so
  ``timm.create_model`` finds them in every process that imported histokd, whichever of the two
  came first. When timm is already loaded at ``import histokd``, they are registered at once.

So every process that imported histokd (Ray workers included) can import timm in any order,
and processes that never touch torchvision or timm (the TensorFlow teacher actors) never load
torch for them.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from importlib.machinery import ModuleSpec
from types import ModuleType

__all__ = ["ensure_torchvision", "install_import_hook", "register_timm_models"]

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
    if "torchvision" in sys.modules or _extension_loads():
        return False
    import torch

    lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 - must outlive this call
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    # Keep the library object alive: dropping it would unregister the schemas.
    globals()["_torchvision_lib"] = lib
    return True


def register_timm_models() -> None:
    """Register histokd's backbones with timm (by importing ``histokd.models``).

    Does nothing while ``histokd.models`` is loaded or loading: it registers them itself. A
    failure is a warning, not an error, so that ``import timm`` keeps working without them.
    """
    if "histokd.models" in sys.modules:
        return
    try:
        importlib.import_module("histokd.models")
    except Exception as error:  # whatever fails here must not break ``import timm``
        warnings.warn(
            f"histokd: could not register its backbones with timm ({type(error).__name__}: "
            f"{error}); timm.create_model('histokd_csat') will not find them",
            RuntimeWarning,
            stacklevel=2,
        )


class _RegisteringLoader:
    """Wraps timm's loader: runs it, then `register_timm_models`.

    The module gets its own loader back before it runs, so ``timm.__loader__`` and
    ``timm.__spec__.loader`` are timm's (resources, ``inspect``) and nothing keeps this wrapper.
    """

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:  # noqa: D102 - importlib
        create = getattr(self.loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:  # noqa: D102 - importlib protocol
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self.loader
        if getattr(module.__spec__, "loader", None) is self:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        register_timm_models()

    def __getattr__(self, name: str):
        return getattr(self.loader, name)


class _ImportHook:
    """A meta-path finder: fixes torchvision before it loads, registers models once timm has."""

    _busy = False  # set while this finder looks up a spec itself: no recursion

    def find_spec(self, name, path=None, target=None):  # noqa: D102 - importlib protocol
        if name not in ("torchvision", "timm") or type(self)._busy:
            return None
        type(self)._busy = True
        try:
            if name == "torchvision":
                if not _done:
                    ensure_torchvision()
                return None  # let the normal finders import it
            spec = _find_spec_after(self, name, path, target)
        finally:
            type(self)._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None  # not found, or a loader we cannot wrap: the normal import, unregistered
        spec.loader = _RegisteringLoader(spec.loader)
        return spec

    def find_module(self, name, path=None):  # pragma: no cover - legacy protocol
        return None


def _find_spec_after(hook: _ImportHook, name: str, path, target) -> ModuleSpec | None:
    """The spec that the finders behind ``hook`` on ``sys.meta_path`` give for ``name``."""
    for finder in list(sys.meta_path):
        if finder is hook:
            continue
        find_spec = getattr(finder, "find_spec", None)
        spec = find_spec(name, path, target) if find_spec is not None else None
        if spec is not None:
            return spec
    return None


def install_import_hook() -> None:
    """Fix torchvision when it is first imported; register histokd's models with timm.

    Registers them at once when timm is loaded already; otherwise when it is first imported.
    """
    if not any(isinstance(f, _ImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _ImportHook())
    timm = sys.modules.get("timm")
    if timm is not None and not getattr(getattr(timm, "__spec__", None), "_initializing", False):
        register_timm_models()
