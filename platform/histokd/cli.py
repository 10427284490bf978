"""Command lines from job config dataclasses: one flag per field, YAML files, the resolved config.

Every job and tool builds its command line here. A job config is a ``@dataclass`` whose fields
carry their help text in ``field(metadata={"help": ...})``; :func:`parse_config` builds the
argparse parser from the fields, so ``--help``, the YAML keys and the code never disagree.
Precedence: the dataclass defaults, then a ``--preset``, then ``--config FILE.yaml``, then
flags given on the command line.

Field metadata:
    help: The flag's help text.
    aliases: Old names of the field, kept for one release: ``--old-name`` and the YAML key
        ``old_name`` still work and print a one-line notice.
    cli: ``"hidden"`` keeps a (test-only) flag out of ``--help``; ``False`` keeps the field off
        the command line.

A field whose type is itself a config dataclass (a search's job config) is filled from the
same flags (its own fields' names) and from a nested YAML mapping under its name; the config
receives it as a mapping and builds it in its ``__post_init__``.

This module imports neither torch nor Ray: a job's ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "arg",
    "check_ints",
    "check_positive",
    "config_to_dict",
    "disk_error_line",
    "load_yaml",
    "make_parser",
    "parse_config",
    "parse_json_object",
    "print_fields",
    "run_job",
    "save_config",
]

C = TypeVar("C")
REMOVED_IN = "0.2"


def arg(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002 - argparse's word
    *,
    factory: Callable[[], Any] | None = None,
    aliases: Sequence[str] = (),
    hidden: bool = False,
) -> Any:
    """A config field on one line: ``lr: float = arg(0.075, "peak learning rate")``.

    Args:
        default: The default value (a list or dict default: ``factory``).
        help: The flag's help text.
        factory: Builds a mutable default.
        aliases: Old names, accepted for one release with a notice.
        hidden: Keep the flag out of ``--help`` (test hooks).
    """
    metadata: dict[str, Any] = {"help": help}
    if aliases:
        metadata["aliases"] = list(aliases)
    if hidden:
        metadata["cli"] = "hidden"
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _field_kind(tp: Any) -> tuple[Callable[[str], Any] | None, bool, bool]:
    """(scalar parser, is_list, is_optional) for a field's type annotation."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else str
        origin = typing.get_origin(tp)
    if origin in (list, tuple, Sequence):
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
        return inner if inner in (int, float, str) else str, True, optional
    if origin is typing.Literal:
        return str, False, optional
    if tp is bool:
        return None, False, optional
    if tp in (int, float, str):
        return tp, False, optional
    return str, False, optional


def _none_or(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        return None if text.lower() in {"none", "null", "auto"} else parse(text)

    convert.__name__ = parse.__name__  # argparse's error says "invalid int value: 'x'"
    return convert


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _nested(cls: type) -> dict[str, type]:
    """Fields whose type is a config dataclass: {field name: its class}."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(cls)
        if f.init and dataclasses.is_dataclass(hints[f.name])
    }


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _Deprecated(argparse.Action):
    """An old flag name: sets the field and says, once, what replaced it."""

    def __init__(self, option_strings, dest, new_flag: str, value_action: str, **kwargs):
        self.new_flag, self.value_action = new_flag, value_action
        if value_action == "flag":
            kwargs["nargs"] = 0
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(
            f"notice: {option_string} is deprecated and goes in histokd {REMOVED_IN}: "
            f"use {self.new_flag}",
            file=sys.stderr,
        )
        if self.value_action == "flag":
            values = not option_string.startswith("--no-")
        setattr(namespace, self.dest, values)


def _add_field(group, f: dataclasses.Field, tp: Any) -> None:
    parse, is_list, optional = _field_kind(tp)
    default = _default(f)
    help_text = f.metadata.get("help", "")
    help_text = f"{help_text} (default: {default!r})" if help_text else f"default: {default!r}"
    if f.metadata.get("cli") == "hidden":
        help_text = argparse.SUPPRESS
    flag = _flag(f.name)
    if parse is None:  # bool
        kwargs: dict[str, Any] = {"action": argparse.BooleanOptionalAction}
    elif is_list:
        kwargs = {"nargs": "*", "type": parse, "metavar": f.name.upper()}
    else:
        choices = None
        for candidate in (tp, *typing.get_args(tp)):
            if typing.get_origin(candidate) is typing.Literal:
                choices = list(typing.get_args(candidate))
        kwargs = {
            "type": _none_or(parse) if optional else parse,
            "choices": choices,
            "metavar": f.name.upper() if choices is None else None,
        }
    group.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=help_text, **kwargs)
    for old in f.metadata.get("aliases", ()):
        names = [_flag(old)] + ([_flag("no_" + old)] if parse is None else [])
        extra = {k: v for k, v in kwargs.items() if k in ("nargs", "type", "choices")}
        group.add_argument(
            *names,
            dest=f.name,
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
            action=_Deprecated,
            new_flag=flag,
            value_action="flag" if parse is None else "value",
            **extra,
        )


def make_parser(
    cls: type,
    description: str = "",
    presets: Mapping[str, Mapping[str, Any]] | None = None,
) -> argparse.ArgumentParser:
    """The parser of a job or tool: ``--config``, ``--print-config``, a flag per field.

    The fields every job shares (those of :class:`histokd.run.RunConfig` and its subclasses
    in ``histokd.run``) come last, in their own group.
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", metavar="FILE.yaml", help="YAML file of field: value pairs (flags override it)"
    )
    if presets:
        parser.add_argument(
            "--preset",
            choices=sorted(presets),
            help="named set of overrides applied before --config and flags: "
            + "; ".join(
                f"{k}: {', '.join(f'{a}={b}' for a, b in v.items())}" for k, v in presets.items()
            ),
        )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    common = parser.add_argument_group("run and cluster (the same in every job)")
    seen: set[str] = set()

    def add(config_cls: type) -> None:
        hints = typing.get_type_hints(config_cls)
        nested = _nested(config_cls)
        for f in dataclasses.fields(config_cls):
            if not f.init or f.metadata.get("cli") is False or f.name in seen:
                continue
            if f.name in nested:
                add(nested[f.name])
                continue
            seen.add(f.name)
            owner = next(  # the base-most class that declares it
                k
                for k in reversed(config_cls.__mro__)
                if f.name in vars(k).get("__annotations__", {})
            )
            group = common if owner.__module__ == "histokd.run" else parser
            _add_field(group, f, hints[f.name])

    add(cls)
    return parser


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping, or a clear error naming the file."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"error: --config {path}: cannot read it as YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SystemExit(
            f"error: --config {path}: must be a mapping of field: value, got {type(data).__name__}"
        )
    return data


def parse_json_object(text: str, where: str, example: str) -> dict[str, Any]:
    """A JSON object from ``text``, or one error line naming ``where`` and showing ``example``.

    Raises:
        ValueError: ``text`` is not JSON, or not a JSON object.
    """
    import json

    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{where}: not JSON ({exc.msg}); expected an object such as {example}"
        ) from exc
    if not isinstance(data, dict):
        raise ValueError(
            f"{where}: holds a {type(data).__name__}; expected an object such as {example}"
        )
    return data


def _type_words(tp: Any) -> str:
    """What a value of type ``tp`` is, in an error message."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        words = [_type_words(a) for a in args if a is not type(None)]
        return " or ".join(words + (["null"] if type(None) in args else []))
    if origin in (list, tuple, Sequence):
        inner = _type_words(args[0]) if args else "value"
        return f"a list of {inner.removeprefix('a ').removeprefix('an ')}s"
    if origin in (dict, Mapping):
        return "a mapping"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return words.get(tp, getattr(tp, "__name__", str(tp)))


def _typed(name: str, value: Any, tp: Any) -> Any:
    """A YAML value as its field's declared type, or one error naming the field, the value and
    the type. Integers are numbers too; bools are not integers; text that reads as a number is
    one (YAML 1.1 reads ``1e-4`` as a string).

    Raises:
        ValueError: The value does not fit the type.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    wrong = ValueError(f"{name}={value!r}: must be {_type_words(tp)}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _typed(name, value, option)
            except ValueError:
                pass
        raise wrong
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise wrong
        inner = args[0] if args else Any
        items = [_typed(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, (Mapping, str)):  # a string: JSON, as on the command line
            raise wrong
        return value
    if origin is typing.Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            raise wrong
        return value
    if tp is bool or tp is str:
        if not isinstance(value, tp):
            raise wrong
        return value
    if tp in (int, float):
        if isinstance(value, bool):
            raise wrong
        if isinstance(value, int) or (tp is float and isinstance(value, float)):
            return tp(value)
        if isinstance(value, str):
            try:
                return tp(value.strip())
            except ValueError:
                raise wrong from None
        raise wrong
    return value


def _renames(cls: type) -> dict[str, str]:
    """Old field names (aliases) to the current ones."""
    return {old: f.name for f in dataclasses.fields(cls) for old in f.metadata.get("aliases", ())}


def _from_mapping(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Field values from a YAML mapping: old names renamed (with a notice), unknown keys
    refused, nested configs' mappings checked the same way."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    renames, nested, hints = _renames(cls), _nested(cls), typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in renames:
            print(
                f"notice: {where}: {key!r} is deprecated and goes in histokd {REMOVED_IN}: "
                f"use {renames[key]!r}",
                file=sys.stderr,
            )
            key = renames[key]
        if key not in names:
            raise SystemExit(f"error: {where}: unknown field {key!r}; allowed: {sorted(names)}")
        if key in nested:
            if not isinstance(value, Mapping):
                raise SystemExit(f"error: {where}: {key!r} must be a mapping of field: value")
            value = _from_mapping(nested[key], value, f"{where}: {key}")
        else:
            try:
                value = _typed(key, value, hints[key])
            except ValueError as exc:
                raise SystemExit(f"error: {where}: {exc}") from None
        values[key] = value
    return values


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            value = _merge(dict(out[key]), value)
        out[key] = value
    return out


def _split_flags(cls: type, flags: Mapping[str, Any]) -> dict[str, Any]:
    """Flat flag values arranged into the config's (possibly nested) fields."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values = {k: v for k, v in flags.items() if k in names}
    for name, sub in _nested(cls).items():
        inner = _split_flags(sub, flags)
        if inner:
            values[name] = inner
    return values


def _build(cls: type[C], values: Mapping[str, Any]) -> C:
    """The config; a nested job config arrives as a mapping, which the config's own
    ``__post_init__`` checks and builds (it may refuse fields it sets itself)."""
    return cls(**values)


def parse_config(
    cls: type[C],
    argv: Sequence[str] | None = None,
    description: str = "",
    presets: Mapping[str, Mapping[str, Any]] | None = None,
    default_preset: Callable[[dict[str, Any]], str | None] | None = None,
) -> C:
    """Build a job config from defaults, a preset, a YAML file and command-line flags.

    Args:
        cls: The config dataclass.
        argv: Arguments (default: ``sys.argv[1:]``).
        description: Text shown at the top of ``--help``.
        presets: Named override sets for ``--preset``.
        default_preset: Chooses a preset when none is given, from the merged values.

    Raises:
        SystemExit: With a message naming the field, for unknown YAML keys or invalid values
            (the dataclass's own validation).
    """
    presets = presets or {}
    args = vars(make_parser(cls, description, presets).parse_args(argv))
    values: dict[str, Any] = {}
    if args.get("config"):
        values = _from_mapping(cls, load_yaml(args["config"]), f"--config {args['config']}")
    values = _merge(values, _split_flags(cls, args))
    preset = args.get("preset") or (default_preset(values) if default_preset else None)
    merged = _merge(dict(presets.get(preset, {})), values) if preset else values
    try:
        config = _build(cls, merged)
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    if preset:
        given = set(values) | {k for v in values.values() if isinstance(v, Mapping) for k in v}
        print(
            f"preset {preset!r}: "
            + ", ".join(f"{k}={v!r}" for k, v in presets[preset].items() if k not in given)
        )
    if args.get("print_config"):
        import yaml

        print(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        sys.exit(0)
    return config


def run_job(
    cls: type[C],
    run: Callable[[C], Any],
    argv: Sequence[str] | None = None,
    *,
    description: str = "",
    presets: Mapping[str, Mapping[str, Any]] | None = None,
    default_preset: Callable[[dict[str, Any]], str | None] | None = None,
    report: Callable[[Any], None] | None = None,
) -> int:
    """A job's ``main``: parse its config, set up the console, run it, report; a bad setting
    is one line, exit 2.

    The console (:func:`histokd.console.setup_console`) shows the job's own lines, and Ray's,
    the libraries' and their warnings only with ``--verbose``; the driver's full output goes to
    ``RUN_DIR/logs/driver.log``.

    Args:
        cls: The job's config dataclass.
        run: Runs the job from its config; imports what it needs itself, so that ``--help``
            and ``--print-config`` answer without torch, Ray or TensorFlow.
        report: Prints the result's lines.
    """
    config = parse_config(cls, argv, description, presets, default_preset)
    import contextlib

    from histokd.console import DRIVER_LOG, setup_console
    from histokd.run import RunConfig, RunLockedError, lock_run

    work_dir = getattr(config, "work_dir", None)  # the run's local folder
    try:
        with contextlib.ExitStack() as stack:
            if isinstance(config, RunConfig):  # a job's run: one writer, before its log opens
                stack.enter_context(lock_run(config))
            stack.enter_context(
                setup_console(getattr(config, "verbose", False), work_dir and work_dir / DRIVER_LOG)
            )
            try:
                result = _stop_on_signals(run, config)
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            if report is not None:
                report(result)
    except RunLockedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        if exc.code == 143:  # 128 + SIGTERM, from _stop_on_signals
            _exit_after_sigterm(exc.code)
        raise
    except OSError as exc:
        line = disk_error_line(exc)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1
    return 0


def print_fields(fields: Mapping[str, Any]) -> None:
    """Print a job's result lines, ``label: value``, the values aligned (a `run_job` report).

    Args:
        fields: Labels and their values, in the order to print.
    """
    width = max(len(label) for label in fields) + 2
    for label, value in fields.items():
        print(f"{label + ':':<{width}}{value}")


# errors of a file system write: read-only, full, over quota, no permission, I/O error
_DISK_ERRNOS = {
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO,
    errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
}  # fmt: skip


def disk_error_line(exc: OSError) -> str | None:
    """One line for a failed file system write, naming the path where the error knows it; None
    for other OSErrors (a lost connection, a timeout), which stay tracebacks."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return None
    if exc.filename is not None:
        target = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
        return f"cannot write {target}: {exc.strerror or exc}"
    # pyarrow's name the path in the text: "Failed to open local file '/path'. Detail: ..."
    text = (str(exc).splitlines() or [type(exc).__name__])[0]
    if exc.errno in _DISK_ERRNOS or ("[errno " in text.lower() and "file" in text.lower()):
        return f"a disk write failed: {text}"
    return None


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _stop_on_signals(run: Callable[[C], Any], config: C) -> Any:
    """``run(config)``; Ctrl-C (SIGINT) or SIGTERM ends the job with one line, its unfinished
    MLflow runs ended as KILLED, and exit code 130 or 143 (``SystemExit``).

    SIGTERM raises KeyboardInterrupt as Ctrl-C does. Ray puts in its own handlers while it runs
    (``ray.init``: SIGTERM exits; a TorchTrainer's ``fit``: SIGINT aborts the training run), so
    which signal came is read from the signal module's wakeup file descriptor, which records
    each one whichever handler takes it. Checkpoints stay as they are: a rerun with the same
    run name resumes from the newest good one (:mod:`histokd.resume`).
    """
    import os
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # signals reach only main
        return run(config)
    from histokd.tracking import end_unfinished_runs, opened_runs

    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    mark, error, result = opened_runs(), None, None
    try:
        result = run(config)
    except BaseException as exc:  # noqa: BLE001 - re-raised below unless a signal caused it
        error = exc
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGTERM, old_term)
        try:
            received = set(os.read(read_fd, 1024))
        except BlockingIOError:
            received = set()
        os.close(read_fd)
        os.close(write_fd)
    if signal.SIGTERM in received:
        signum = signal.SIGTERM
    elif signal.SIGINT in received or isinstance(error, KeyboardInterrupt):
        signum = signal.SIGINT
    elif error is not None:
        raise error
    else:
        return result
    killed = end_unfinished_runs(mark, "KILLED")
    name = signal.Signals(signum).name
    print(
        f"stopped by {name}{' (Ctrl-C)' if signum == signal.SIGINT else ''}: MLflow run(s) "
        f"{', '.join(killed) or 'none open'} ended as KILLED; the checkpoints in "
        f"{getattr(config, 'run_dir', 'the run folder')} are kept: rerun with the same "
        "--run-name to resume",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(128 + signum) from None


def _exit_after_sigterm(code: int) -> None:
    """Leave with ``code`` after a SIGTERM once the run's lock and console are released.

    Ray's C++ signal hooks saw the SIGTERM, and the interpreter's normal exit of a process that
    ran Ray Train (``ray.shutdown`` among the exit handlers) can then abort (SIGABRT), while
    stopping the local cluster first makes Ray's core worker end the process (exit 1) when its
    raylet goes. So the process leaves at once: the processes of a local cluster it started die
    with it (Ray starts them to share its fate); their session folder stays in /tmp/ray.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain JSON/YAML-safe values."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def save_config(config: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (what timm's train.py does with args.yaml)."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return path


def check_ints(
    config: Any, names: Sequence[str], *, minimum: int = 1, auto: bool | str = False
) -> None:
    """Raise one error naming the field when a field of ``names`` is not an integer >= ``minimum``.

    Args:
        config: The dataclass instance.
        names: Field names.
        minimum: Smallest allowed value (1: positive, 0: non-negative).
        auto: None is allowed too (the job picks the value); a string says what None means
            in the error, e.g. ``"None (the dataset's)"``.
    """
    allowed = {1: "a positive integer", 0: "a non-negative integer"}.get(
        minimum, f"an integer >= {minimum}"
    )
    for name in names:
        value = getattr(config, name)
        if auto is not False and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name}={value!r}: must be {allowed}" + _or_none(auto))


def check_positive(
    config: Any, names: Sequence[str], *, example: str = "", auto: bool | str = False
) -> None:
    """Raise one error naming the field when a field of ``names`` is not a number > 0.

    Args:
        config: The dataclass instance.
        names: Field names.
        example: A typical value, shown in the error.
        auto: None is allowed too, as in `check_ints`.
    """
    for name in names:
        value = getattr(config, name)
        if auto is not False and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            allowed = "positive" + (f" (e.g. {example})" if example else "")
            raise ValueError(f"{name}={value!r}: must be {allowed}" + _or_none(auto))


def _or_none(auto: bool | str) -> str:
    """What an error adds when None is allowed: `` or auto``, or the caller's words."""
    if auto is False:
        return ""
    return " or " + ("auto" if auto is True else auto)
