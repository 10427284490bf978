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
    "config_to_dict",
    "load_yaml",
    "make_parser",
    "parse_config",
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


def _renames(cls: type) -> dict[str, str]:
    """Old field names (aliases) to the current ones."""
    return {old: f.name for f in dataclasses.fields(cls) for old in f.metadata.get("aliases", ())}


def _from_mapping(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Field values from a YAML mapping: old names renamed (with a notice), unknown keys
    refused, nested configs' mappings checked the same way."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    renames, nested = _renames(cls), _nested(cls)
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
    from histokd.console import DRIVER_LOG, setup_console

    work_dir = getattr(config, "work_dir", None)  # the run's local folder
    with setup_console(getattr(config, "verbose", False), work_dir and work_dir / DRIVER_LOG):
        try:
            result = run(config)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if report is not None:
            report(result)
    return 0


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


def check_ints(config: Any, names: Sequence[str], *, minimum: int = 1, auto: bool = False) -> None:
    """Raise one error naming the field when a field of ``names`` is not an integer >= ``minimum``.

    Args:
        config: The dataclass instance.
        names: Field names.
        minimum: Smallest allowed value (1: positive, 0: non-negative).
        auto: None is allowed too (the job picks the value).
    """
    allowed = {1: "a positive integer", 0: "a non-negative integer"}.get(
        minimum, f"an integer >= {minimum}"
    )
    for name in names:
        value = getattr(config, name)
        if auto and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name}={value!r}: must be {allowed}" + (" or auto" if auto else ""))
