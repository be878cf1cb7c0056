"""Typed dataclass configs: build from dicts / YAML with strict key and type checks, dotted overrides.

Every config in the project (model, flow, data, training, serving) is a dataclass tree. This module is the single place
that turns untyped input (YAML files, ``--set key=value`` flags, dicts that crossed a Ray boundary) into those trees, and
it fails loudly on unknown keys and wrong types before any work starts (docs/architecture.md#the-cli-convention).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config has an unknown key, a wrong type or an invalid value."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# A number written as text. PyYAML implements YAML 1.1, whose float needs a dot and a signed exponent: it reads ``2e-4``,
# ``1E5``, ``.5e1`` or ``1.0e4`` as *strings* (from ``--set`` and from config files alike), while ``2.0e-4`` is a float.
# Numeric fields therefore accept a string in this (YAML 1.2 / JSON / Python) syntax; ``inf``/``nan``/``1_000`` are not
# in it (YAML's own ``.inf`` / ``.nan`` already arrive as floats). A ``str`` field keeps such a string as it is.
_NUMBER = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_MAX_INT_DIGITS = 100  # '1e100000' for an int field fails instead of building a 100,000-digit integer


def _number_from_text(value: str) -> Decimal | None:
    """The exact value of ``value`` if it is a number in decimal or scientific notation, else None."""
    text = value.strip()
    return Decimal(text) if _NUMBER.fullmatch(text) else None


def _coerce_float(value: Any, where: str) -> float:
    if isinstance(value, str):
        number = _number_from_text(value)
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        result = float(number)
        if not math.isfinite(result):
            raise ConfigError(f"{where}: {value!r} is out of range for a float")
        return result
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _coerce_int(value: Any, where: str) -> int:
    # An int field takes any *whole* number: 100000, '1e5' (YAML 1.1 hands it over as text), 1.0e+5 or 100000.0 (YAML
    # floats). Scientific notation is the natural way to write step counts and sizes, and a whole value loses nothing.
    # A fractional value ('1.5e-3', 2.5) fails, naming the field, rather than being rounded or truncated.
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        number = _number_from_text(value)
        if number is None:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if number.adjusted() > _MAX_INT_DIGITS:
            raise ConfigError(f"{where}: {value!r} is out of range for an integer")
        if number != number.to_integral_value():
            raise ConfigError(f"{where}: expected an integer, got {value!r} (not a whole number)")
        return int(number)
    if isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r} (not a whole number)")
        return int(value)
    raise ConfigError(f"{where}: expected an integer, got {value!r}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert where the conversion is lossless (int→float, list→tuple,
    a number written as text → int / float, a whole float → int)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        if isinstance(value, str) and str in options:
            return value  # `str | int`: a string stays a string, even one that reads as a number ('2e-4', '10')
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:  # `float | None` and the like: the one real option's message ("expected a number, …")
            raise errors[0]
        raise ConfigError(f"{where}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict) and not (isinstance(value, str) and getattr(tp, "PRESETS", None)):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, _where=where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, where): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        return _coerce_float(value, where)
    if tp is int:
        return _coerce_int(value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__}")
    return value


PRESET_KEY = "preset"


def expand_preset(cls: type, data: Any, where: str = "") -> Any:
    """A config class with a ``PRESETS`` table (name → partial dict) takes a preset name in place of its section —
    ``--set sampler=official`` — or a ``preset`` key beside fields that override it. Returns the section with the
    preset's values filled in (other input unchanged)."""
    presets = getattr(cls, "PRESETS", None)
    if not presets:
        return data
    if isinstance(data, str):
        data = {PRESET_KEY: data}
    if not isinstance(data, dict) or PRESET_KEY not in data:
        return data
    rest = {k: v for k, v in data.items() if k != PRESET_KEY}
    name = data[PRESET_KEY]
    if name not in presets:
        raise ConfigError(f"{where or cls.__name__}: unknown preset {name!r}; choose one of {', '.join(presets)}")
    return merge(presets[name], rest)


def from_dict(cls: type[T], data: dict[str, Any], _where: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict. Unknown keys and wrong types raise :class:`ConfigError`."""
    data = expand_preset(cls, data, _where)
    if not isinstance(data, dict):
        raise ConfigError(f"{_where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{_where}." if _where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)} for {cls.__name__}; "
            f"known: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]):
            value = expand_preset(hints[name], value, f"{_where}.{name}" if _where else name)
        if isinstance(value, dict):
            # A partial section overrides the field's own default (its default_factory may differ from the nested
            # class's defaults), never rebuilds the section from the class defaults.
            default = _field_default(fields[name])
            if dataclasses.is_dataclass(default):
                value = merge(to_dict(default), value)
        kwargs[name] = _coerce(value, hints[name], f"{_where}.{name}" if _where else name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{_where or cls.__name__}: {exc}") from exc


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return None


def to_dict(config: Any) -> dict[str, Any]:
    """Plain, YAML/JSON-serialisable dict of a dataclass tree (tuples become lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` → (["a","b","c"], YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_value(data: dict[str, Any], path: list[str], value: Any, item: str | None = None) -> None:
    """Set ``data[path[0]]…[path[-1]] = value``, creating sections; a section given as a preset name earlier
    (``sampler=official``) becomes ``{"preset": name}`` so that a later key overrides one of its fields."""
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str):
            child = node[part] = {PRESET_KEY: child}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item or '.'.join(path)!r}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``--set dotted.key=value`` overrides to a nested dict (in place) and return it."""
    for item in overrides or []:
        path, value = parse_override(item)
        set_value(data, path, value, item)
    return data


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins. Returns a new dict."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from a local path or any fsspec URL."""
    import fsspec

    with fsspec.open(str(path), "r") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level of a config file must be a mapping")
    return data


def resolve_config(cls: type[T], base: T | None = None, file: str | Path | None = None,
                   flags: dict[str, Any] | None = None, overrides: list[str] | None = None) -> T:
    """The config every job runs with: defaults (or ``base``) ← YAML ``file`` ← section presets (``--set
    sampler=official``) ← named ``flags`` (dotted keys; None = not given) ← the other ``--set`` ``overrides``. A preset
    replaces its whole section, so it goes before the flags: ``--steps 20 --set sampler=official`` is the official
    sampling with 20 steps."""
    data = to_dict(base) if base is not None else {}
    if file is not None:
        data = merge(data, load_yaml(file))
    overrides = list(overrides or [])
    presets = [item for item in overrides if _names_a_preset(cls, item)]
    apply_overrides(data, presets)
    for key, value in (flags or {}).items():
        if value is not None:
            set_value(data, key.split("."), value)
    apply_overrides(data, [item for item in overrides if item not in presets])
    return from_dict(cls, data)


def _names_a_preset(cls: type, item: str) -> bool:
    """Whether ``--set`` ``item`` names a preset for a whole config section (a dataclass field whose class has
    ``PRESETS``), e.g. ``sampler=official``."""
    path, value = parse_override(item)
    tp: Any = cls
    for part in path:
        if not dataclasses.is_dataclass(tp):
            return False
        tp = typing.get_type_hints(tp).get(part)
    return isinstance(value, str) and dataclasses.is_dataclass(tp) and bool(getattr(tp, "PRESETS", None))
