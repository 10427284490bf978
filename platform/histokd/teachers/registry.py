"""Teachers by name: one string on the command line picks the teacher.

Specs:
- ``"stardist"`` / ``"stardist:<name>"`` / ``"<name>"``: a registered StarDist model
  (``2D_versatile_he``, RCKD's teacher, by default), downloaded once into StarDist's cache;
- a path to a StarDist model folder (``config.json``, ``thresholds.json``, ``weights_best.h5``);
- ``"demo"``: the small StarDist model shipped in ``histokd/assets/demo_teacher`` (offline);
- ``"deconvolution"``: haematoxylin from colour deconvolution, no weights;
- ``"package.module:name"``: a teacher that module registers with :func:`register_teacher`
  (imported wherever the spec is resolved: the driver, and each Ray actor).

This module alone resolves and validates specs (:func:`resolve_teacher_spec`); jobs load the
teacher once on the driver (:func:`check_teacher_loads`) before any Ray work.

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
    "check_teacher_loads",
    "is_stardist_spec",
    "portable_spec",
    "register_teacher",
    "resolve_teacher_spec",
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


def _import_plugin(spec: str) -> str:
    """``"package.module:name"``: import the module (its ``@register_teacher`` runs) and
    return ``name``. Ray workers resolve the same string, so such teachers work in actors."""
    import importlib

    module, name = spec.split(":", 1)
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise TeacherError(f"teacher={spec!r}: cannot import module {module!r} ({exc})") from exc
    if name not in _REGISTRY:
        raise TeacherError(
            f"teacher={spec!r}: module {module!r} registers no teacher {name!r}; "
            f"registered: {', '.join(available_teachers())}"
        )
    return name


def resolve_teacher_spec(spec: str) -> tuple[str, str]:
    """What a spec names, without building it: ``(kind, value)``.

    ``kind`` is ``"registered"`` (value: the registered name), ``"stardist"`` (value: a
    StarDist pretrained name) or ``"folder"`` (value: the model folder). Checks nothing heavy:
    no TensorFlow, no download.

    Raises:
        TeacherError: Nothing matches; the message lists what is allowed.
    """
    from histokd.teachers.stardist_models import STARDIST_PRETRAINED

    if not isinstance(spec, str) or not spec.strip():
        raise TeacherError(f"teacher={spec!r}: must be a non-empty string")
    spec = spec.strip()
    if spec in _REGISTRY:
        return "registered", spec
    if spec in STARDIST_PRETRAINED:
        return "stardist", spec
    prefix, _, rest = spec.partition(":")
    if rest and prefix == "stardist":
        if rest not in STARDIST_PRETRAINED:
            raise TeacherError(
                f"teacher={spec!r}: no StarDist model {rest!r}; allowed: {', '.join(STARDIST_PRETRAINED)}"
            )
        return "stardist", rest
    if rest and "/" not in prefix:
        return "registered", _import_plugin(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return "folder", str(path)
    raise TeacherError(
        f"teacher={spec!r}: neither a teacher name nor a model folder; allowed: "
        f"{', '.join(available_teachers())}, stardist:<name> with name in "
        f"{', '.join(STARDIST_PRETRAINED)}, package.module:name (a teacher that module "
        "registers), or a path to a StarDist model folder"
        + (" (no such folder)" if ("/" in spec or spec.startswith(".")) else "")
    )


def is_stardist_spec(spec: str) -> bool:
    """True when the spec names a StarDist model (which takes StarDist's settings)."""
    kind, value = resolve_teacher_spec(spec)
    return kind != "registered" or value in STARDIST_SPECS


def portable_spec(spec: str) -> str:
    """The spec as another process resolves it: a teacher registered by a user's module
    becomes ``"module:name"``, so that Ray actors import that module too."""
    kind, value = resolve_teacher_spec(spec)
    module = getattr(_REGISTRY.get(value), "__module__", __name__) if kind == "registered" else None
    if module and module != __name__ and module != "__main__" and ":" not in spec:
        return f"{module}:{value}"
    return spec


def build_teacher(spec: str, backend: str = "torch", **kwargs) -> Teacher:
    """The teacher a spec names, built with ``kwargs`` (``alpha``, ``mask_mode``, ...).

    Args:
        spec: ``"deconvolution"``, ``"demo"``, ``"stardist"``, ``"stardist:<name>"``, a
            StarDist pretrained name such as ``"2D_versatile_he"``, ``"package.module:name"``
            (a teacher that module registers), or a model folder path.
        backend: How StarDist models run: ``"torch"`` (default) or ``"tensorflow"``
            (StarDist itself; needed for ``mask_mode="instances"``). Other teachers ignore it.
        **kwargs: Passed to the teacher (see each teacher's arguments).

    Raises:
        TeacherError: Nothing matches the spec (the message lists what is allowed), or the
            teacher cannot be built.
    """
    if backend not in BACKENDS:
        raise TeacherError(f"backend={backend!r}: allowed: {', '.join(BACKENDS)}")
    kind, value = resolve_teacher_spec(spec)
    if kind == "stardist":
        return _REGISTRY["stardist"](name=value, backend=backend, **kwargs)
    if kind == "folder":
        teacher_class, kwargs = stardist_class(backend, **kwargs)
        return teacher_class.from_folder(Path(value), **kwargs)
    if value in STARDIST_SPECS:
        return _REGISTRY[value](backend=backend, **kwargs)
    for key, allowed in _STARDIST_ONLY.items():  # settings of StarDist teachers, at defaults
        if kwargs.get(key, allowed[0]) not in allowed:
            raise TeacherError(
                f"{key}={kwargs[key]!r} is a setting of StarDist teachers; teacher {value!r} takes none"
            )
        kwargs.pop(key, None)
    kwargs.pop("patch_mpp", None)  # the patches' scale: only a teacher with a scale of its own
    return _REGISTRY[value](**kwargs)


def check_teacher_loads(spec: str, backend: str = "torch", **kwargs) -> None:
    """Load the teacher once, in this process, so that a broken model fails in seconds with one line.

    Jobs call this on the driver before any Ray work: a teacher that fails to load in a Ray Data
    actor or a training worker is retried there, and its error comes late, if at all. PyTorch
    teachers are built on the CPU and dropped. A StarDist model that runs in TensorFlow
    (``backend="tensorflow"`` or ``mask_mode="instances"``) is checked without importing
    TensorFlow: its folder, ``config.json``, ``histokd_teacher.json`` and weights.

    Args:
        spec: A teacher spec (see :func:`build_teacher`).
        backend: See :func:`build_teacher`.
        **kwargs: The teacher's settings, as the job passes them to :func:`build_teacher`.

    Raises:
        TeacherError: One line naming the spec and why it cannot be loaded.
    """
    try:
        kind, value = resolve_teacher_spec(spec)
        stardist = kind != "registered" or value in STARDIST_SPECS
        if stardist and (backend == "tensorflow" or kwargs.get("mask_mode") == "instances"):
            from histokd.teachers.stardist_models import check_model_folder, folder_defaults

            folder = {"folder": value, "registered": DEMO_TEACHER_DIR}.get(kind)
            if folder is not None:  # a StarDist name is fetched by StarDist itself, in the actor
                folder_defaults(check_model_folder(folder), {})
            return
        if stardist and backend == "torch":
            kwargs = {**kwargs, "device": "cpu", "compile": False}
        build_teacher(spec, backend=backend, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the teacher's, in one line
        reason = str(exc) if isinstance(exc, TeacherError) else f"{type(exc).__name__}: {exc}"
        raise TeacherError(
            f"teacher={spec!r} cannot be loaded: {' '.join(reason.split())}"
        ) from exc
