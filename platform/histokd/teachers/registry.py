"""Teachers by name: one string on the command line picks the teacher.

Specs:
- ``"stardist"`` / ``"stardist:<name>"`` / ``"<name>"``: a registered StarDist model
  (``2D_versatile_he``, RCKD's teacher, by default), downloaded once into StarDist's cache;
- a path to a StarDist model folder (``config.json``, ``thresholds.json``, ``weights_best.h5``);
- ``"demo"``: the small StarDist model shipped in ``histokd/assets/demo_teacher`` (offline);
- ``"deconvolution"``: haematoxylin from colour deconvolution, no weights.

StarDist teachers run in PyTorch by default (``backend="torch"``,
:mod:`histokd.teachers.stardist_torch`); ``backend="tensorflow"`` runs StarDist itself (the
``tf-cpu``/``tf-gpu`` extras), which ``mask_mode="instances"`` (StarDist's NMS) needs. Resolving a
name imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from histokd.teachers.base import Teacher, TeacherError

__all__ = [
    "BACKENDS",
    "DEMO_TEACHER_DIR",
    "STARDIST_SPECS",
    "available_teachers",
    "build_teacher",
    "register_teacher",
    "stardist_class",
]

DEMO_TEACHER_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo_teacher"

_REGISTRY: dict[str, Callable[..., Teacher]] = {}

BACKENDS = ("torch", "tensorflow")  # StarDist's network in PyTorch (default) or StarDist itself
STARDIST_SPECS = ("demo", "stardist")  # registered names that are StarDist models
_TORCH_ONLY = {"device": (None, "auto", "cpu"), "precision": ("fp32",), "compile": (False,)}
_STARDIST_ONLY = {
    **_TORCH_ONLY,
    "normalization": (None,),
    "percentiles": (None,),
    "teacher_mpp": (None,),
}


def stardist_class(backend: str = "torch", **kwargs) -> tuple[type, dict]:
    """The StarDist teacher class of a backend, and ``kwargs`` fit for it.

    ``mask_mode="instances"`` (StarDist's NMS) always takes the TensorFlow backend.

    Raises:
        TeacherError: Unknown backend, or a PyTorch-only setting asked of TensorFlow.
    """
    if backend not in BACKENDS:
        raise TeacherError(f"backend={backend!r}: allowed: {', '.join(BACKENDS)}")
    if kwargs.get("mask_mode") == "instances":
        backend = (
            "tensorflow"  # StarDist's NMS: only StarDist itself has it (the tf-cpu/tf-gpu extra)
        )
    if backend == "torch":
        from histokd.teachers.stardist_torch import TorchStarDistTeacher

        return TorchStarDistTeacher, kwargs
    for key, allowed in _TORCH_ONLY.items():
        if key in kwargs:
            if kwargs[key] not in allowed:
                raise TeacherError(
                    f"{key}={kwargs[key]!r} is a setting of the torch backend; backend='tensorflow' allows {allowed}"
                )
            kwargs = {k: v for k, v in kwargs.items() if k != key}
    from histokd.teachers.stardist_teacher import StarDistTeacher

    return StarDistTeacher, kwargs


def register_teacher(name: str) -> Callable[[Callable[..., Teacher]], Callable[..., Teacher]]:
    """Register a teacher factory under ``name`` (a decorator).

    Raises:
        TeacherError: The name is taken or contains ``:`` or a path separator.
    """

    def add(factory: Callable[..., Teacher]) -> Callable[..., Teacher]:
        if name in _REGISTRY:
            raise TeacherError(f"teacher name {name!r} is already registered")
        if ":" in name or "/" in name:
            raise TeacherError(
                f"teacher name {name!r}: ':' and '/' are reserved for specs and paths"
            )
        _REGISTRY[name] = factory
        return factory

    return add


def available_teachers() -> list[str]:
    """Registered names (StarDist's pretrained names are accepted too, see :func:`build_teacher`)."""
    return sorted(_REGISTRY)


@register_teacher("deconvolution")
def _deconvolution(**kwargs) -> Teacher:
    from histokd.teachers.deconvolution import DeconvolutionTeacher

    return DeconvolutionTeacher(**kwargs)


@register_teacher("demo")
def _demo(backend: str = "torch", **kwargs) -> Teacher:
    teacher_class, kwargs = stardist_class(backend, **kwargs)
    if not (DEMO_TEACHER_DIR / "weights_best.h5").is_file():
        raise TeacherError(
            f"the demo teacher is missing from {DEMO_TEACHER_DIR} (weights_best.h5); "
            "reinstall histokd or rebuild it with jobs/train_teacher.py"
        )
    return teacher_class.from_folder(DEMO_TEACHER_DIR, source="demo", **kwargs)


@register_teacher("stardist")
def _stardist(name: str = "2D_versatile_he", backend: str = "torch", **kwargs) -> Teacher:
    teacher_class, kwargs = stardist_class(backend, **kwargs)
    return teacher_class.from_pretrained(name, **kwargs)


def build_teacher(spec: str, backend: str = "torch", **kwargs) -> Teacher:
    """The teacher a spec names, built with ``kwargs`` (``alpha``, ``mask_mode``, ...).

    Args:
        spec: ``"deconvolution"``, ``"demo"``, ``"stardist"``, ``"stardist:<name>"``, a
            registered StarDist name such as ``"2D_versatile_he"``, or a model folder path.
        backend: How StarDist models run: ``"torch"`` (default) or ``"tensorflow"``
            (StarDist itself; needed for ``mask_mode="instances"``). Other teachers ignore it.
        **kwargs: Passed to the teacher (see each teacher's arguments).

    Raises:
        TeacherError: Nothing matches the spec (the message lists what is allowed), or the
            teacher cannot be built.
    """
    from histokd.teachers.stardist_models import STARDIST_PRETRAINED

    if backend not in BACKENDS:
        raise TeacherError(f"backend={backend!r}: allowed: {', '.join(BACKENDS)}")
    if not isinstance(spec, str) or not spec.strip():
        raise TeacherError(f"teacher spec {spec!r}: must be a non-empty string")
    spec = spec.strip()
    if spec in _REGISTRY:
        if spec in STARDIST_SPECS:
            return _REGISTRY[spec](backend=backend, **kwargs)
        for (
            key,
            allowed,
        ) in _STARDIST_ONLY.items():  # settings of StarDist teachers, at their defaults
            if kwargs.get(key, allowed[0]) not in allowed:
                raise TeacherError(
                    f"{key}={kwargs[key]!r} is a setting of StarDist teachers; teacher {spec!r} takes none"
                )
            kwargs.pop(key, None)
        kwargs.pop(
            "patch_mpp", None
        )  # the patches' scale: only a teacher with a scale of its own uses it
        return _REGISTRY[spec](**kwargs)
    if spec.startswith("stardist:"):
        return _REGISTRY["stardist"](name=spec.split(":", 1)[1], backend=backend, **kwargs)
    if spec in STARDIST_PRETRAINED:
        return _REGISTRY["stardist"](name=spec, backend=backend, **kwargs)
    path = Path(spec).expanduser()
    if path.is_dir():
        teacher_class, kwargs = stardist_class(backend, **kwargs)
        return teacher_class.from_folder(path, **kwargs)
    raise TeacherError(
        f"teacher spec {spec!r} is neither a teacher name nor a model folder; allowed: "
        f"{', '.join(available_teachers())}, stardist:<name> with name in "
        f"{', '.join(STARDIST_PRETRAINED)}, or a path to a StarDist model folder"
        + (" (no such folder)" if ("/" in spec or spec.startswith(".")) else "")
    )
