"""Typed experiment configs shared by `reward` and `refl`.

A config is a tree of dataclasses. A YAML file under `configs/` holds only the overrides of one
experiment; `--set a.b=c` on the command line overrides further. Unknown keys are refused with
their full dotted name, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from runkit.files import atomic_write_bytes

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message names the key and the fix."""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} fits none of {tp}: {'; '.join(errors)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (
            isinstance(value, float) and not value.is_integer()
        ):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError as err:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from err
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from err
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys under '{prefix.rstrip('.') or '<root>'}' are: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from err
    return obj


def to_dict(cfg: Any) -> dict:
    """The config as plain YAML-able data."""
    return dataclasses.asdict(cfg)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict:
    """`a.b=c` -> {'a': {'b': c}} with c parsed as YAML (so numbers, bools and lists work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    out: dict = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] = ()) -> T:
    """Defaults of `cls`, then the YAML file at `path`, then each `a.b=c` override, validated."""
    data: dict = to_dict(cls())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        try:
            _from_dict(cls, _merge(data, loaded))
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err
        data = _merge(data, loaded)
    for text in overrides or ():
        data = _merge(data, parse_override(text))
        try:
            _from_dict(cls, data)
        except ConfigError as err:
            raise ConfigError(f"--set {text}: {err}") from err
    return _from_dict(cls, data)


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically) beside a run's outputs."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False).encode()
    return atomic_write_bytes(path, lambda f: f.write(text))


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=str, default=None, help="experiment YAML (overrides only)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set train.lr=1e-4 (repeatable)",
    )
