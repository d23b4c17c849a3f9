"""Fill a config from a YAML file and the command line: `parse_config(argv, ConfigClass)`.

Values come from, lowest to highest priority: the config class's field defaults, the YAML file given by `--config`
(a mapping of field names to values), then flags on the command line. Every field is a flag (`--name`, plus the
aliases declared with it); unknown flags and unknown YAML keys are errors that name the closest option.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from train.loop_config import ConfigError, LoopConfig, field_kind

ConfigT = TypeVar("ConfigT", bound=LoopConfig)


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """A YAML value converted to the field's type (YAML reads `1e-4` as a string), or a ConfigError naming it."""
    if value is None:
        return None
    kind, is_list = field_kind(annotation)
    if is_list:
        if isinstance(value, str) or not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list of {kind.__name__}, got {value!r}.")
        return [_coerce(name, v, kind) for v in value]
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}.")
        return value
    if kind is int:
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        ):
            raise ConfigError(f"{name}: expected an integer, got {value!r}.")
        return int(value)
    if kind is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}.") from None
    if kind is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{name}: expected a string, got {value!r}.")
        return str(value)
    return value


def _names(config_class: type[LoopConfig]) -> dict[str, str]:
    """Every accepted option name (fields and their aliases) -> the field it sets."""
    names = {}
    for f in dataclasses.fields(config_class):
        names[f.name] = f.name
        names.update(dict.fromkeys(f.metadata.get("aliases", ()), f.name))
    return names


def load_yaml_values(path: str | Path, config_class: type[LoopConfig]) -> dict[str, Any]:
    """The YAML file's mapping, each key checked against the config's fields and each value converted."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config={str(path)!r}: no such file.")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config={str(path)!r} must hold a mapping of option names to values.")
    hints = typing.get_type_hints(config_class)
    names = _names(config_class)
    out: dict[str, Any] = {}
    for key, value in values.items():
        key = str(key).lstrip("-").replace("-", "_")
        if key not in names:
            close = difflib.get_close_matches(key, list(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown option {key!r} for {config_class.__name__}{hint}.")
        out[names[key]] = _coerce(f"{path}: {key}", value, hints[names[key]])
    return out


def build_parser(config_class: type[LoopConfig]) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field; defaults are suppressed so that only given flags come back."""
    parser = argparse.ArgumentParser(
        description=(config_class.__doc__ or "").strip().splitlines()[0],
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML file of option values; command-line flags override it.")
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        kind, is_list = field_kind(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        # argparse expands %-formats in help: a literal % (e.g. "25%") must reach it doubled
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%")
        flags = [f"--{name}" for name in (f.name, *f.metadata.get("aliases", ()))]
        if f.name == "local_rank":  # torch.distributed.launch passes --local-rank
            flags.append("--local-rank")
        if kind is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        elif is_list:
            parser.add_argument(*flags, dest=f.name, type=kind, nargs="+", help=help_text)
        else:
            cli_type = kind if kind in (int, float) else str
            choices = f.metadata.get("choices")
            parser.add_argument(*flags, dest=f.name, type=cli_type, choices=choices, help=help_text)
    return parser


def parse_config(argv: list[str] | None, config_class: type[ConfigT]) -> ConfigT:
    """Build the config from `--config FILE` (optional) and the flags in `argv` (None: sys.argv[1:]).

    Unknown flags exit with argparse's status 2; an unknown YAML key or a bad value raises ConfigError. The result is
    frozen and checked.
    """
    given = vars(build_parser(config_class).parse_args(argv))
    yaml_path = given.pop("config", None)
    values = load_yaml_values(yaml_path, config_class) if yaml_path else {}
    values.update(given)
    return config_class(**values)


def read_mapping(path: str | Path, flag: str) -> dict[str, Any]:
    """A JSON or YAML file holding a mapping; a ConfigError naming `flag` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag}={str(path)!r}: no such file.")
    text = path.read_text()
    values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ConfigError(f"{flag}={str(path)!r} must hold a mapping of names to values.")
    return values
