"""Command lines from job config dataclasses: one flag per field, YAML files, the resolved config.

Every job config is a ``@dataclass`` whose fields carry their help text in
``field(metadata={"help": ...})``. :func:`parse_config` builds the argparse parser from the
fields, so ``--help``, the YAML keys and the code never disagree. Precedence: the dataclass
defaults, then a ``--preset``, then ``--config FILE.yaml``, then flags given on the command line.
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

import yaml

__all__ = ["RunStorage", "check_ints", "config_to_dict", "load_yaml", "parse_config", "save_config"]

C = TypeVar("C")


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


def _build_parser(
    cls: type, description: str, presets: Mapping[str, Mapping[str, Any]]
) -> argparse.ArgumentParser:
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
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        parse, is_list, optional = _field_kind(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
            )
        )
        help_text = f.metadata.get("help", "")
        help_text = f"{help_text} (default: {default!r})" if help_text else f"default: {default!r}"
        if parse is None:  # bool
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        elif is_list:
            parser.add_argument(
                flag,
                nargs="*",
                type=parse,
                default=argparse.SUPPRESS,
                help=help_text,
                metavar=f.name.upper(),
            )
        else:
            choices = None
            tp = hints[f.name]
            for candidate in (tp, *typing.get_args(tp)):
                if typing.get_origin(candidate) is typing.Literal:
                    choices = list(typing.get_args(candidate))
            parser.add_argument(
                flag,
                type=_none_or(parse) if optional else parse,
                choices=choices,
                default=argparse.SUPPRESS,
                help=help_text,
                metavar=f.name.upper() if choices is None else None,
            )
    return parser


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping, or a clear error naming the file."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"error: --config {path}: cannot read it as YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SystemExit(
            f"error: --config {path}: must be a mapping of field: value, got {type(data).__name__}"
        )
    return data


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
    parser = _build_parser(cls, description, presets)
    args = vars(parser.parse_args(argv))
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}
    if args.get("config"):
        from_file = load_yaml(args["config"])
        unknown = sorted(set(from_file) - names)
        if unknown:
            raise SystemExit(
                f"error: --config {args['config']}: unknown field(s) {unknown}; allowed: {sorted(names)}"
            )
        values.update(from_file)
    values.update({k: v for k, v in args.items() if k in names})
    preset = args.get("preset") or (default_preset(values) if default_preset else None)
    merged = dict(presets.get(preset, {})) if preset else {}
    merged.update(values)
    try:
        config = cls(**merged)
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    if preset:
        print(
            f"preset {preset!r}: "
            + ", ".join(f"{k}={v!r}" for k, v in presets[preset].items() if k not in values)
        )
    if args.get("print_config"):
        print(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        sys.exit(0)
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain JSON/YAML-safe values."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def save_config(config: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (what timm's train.py does with args.yaml)."""
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


class RunStorage:
    """Where a job's run lives, for job configs with ``storage_path``, ``run_name`` and
    ``mlflow_tracking_uri`` fields: mixed into their dataclasses."""

    @property
    def run_dir(self) -> str:
        """Everything of this run: ``STORAGE/RUN_NAME`` (a path or a URI)."""
        return f"{self.storage_path.rstrip('/')}/{self.run_name}"

    @property
    def tracking_uri(self) -> str:
        """The MLflow URI: the configured one, or a SQLite file in a local storage folder.

        Raises:
            ValueError: The storage is remote and no tracking URI is configured.
        """
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        if "://" in self.storage_path:
            raise ValueError(
                f"mlflow_tracking_uri is unset and storage_path={self.storage_path!r} is remote: "
                "give a tracking server URI (http://...) or a sqlite:/// path"
            )
        return f"sqlite:///{self.storage_path}/mlflow.db"
