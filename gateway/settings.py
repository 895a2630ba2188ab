"""Typed settings parsing: one generic parser from plain data to frozen dataclasses.

Every config section is a dataclass. ``parse_dataclass`` walks its fields, converts the
YAML/env value to the annotated type and raises ConfigError naming the dotted key, the
value and the source on the first unknown key or wrong type. Strings are accepted where a
number or bool is expected (environment values are always strings), but only when they
convert cleanly.

Markers for ``Annotated`` fields:
- DURATION: seconds as a number, or a string with a unit: "500ms", "30s", "15m", "2h", "7d".
- SIZE: bytes as an integer, or a string with a unit: "512KB", "64MiB", "1GB" (1 KB = 1024).
Field metadata ``{"secret": True}`` masks the value wherever config is printed;
``secret_url``/``secret_connection_string`` fields mask only the secret part of theirs
(gateway/masking.py): the user still sees which server a URL names.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import orjson

from gateway import masking
from gateway.errors import ConfigError, raise_config_errors

T = TypeVar("T")

DURATION = "duration"
SIZE = "size"

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {
    "": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2,
    "mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gib": 1024**3,
}
_NUMBER_WITH_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def secret(default: Any = None) -> Any:
    """A dataclass field whose value is masked when config is shown."""
    return dataclasses.field(default=default, metadata={"secret": True})


def secret_url(default: Any = None) -> Any:
    """A URL field: shown with its password (and secret query parameters) masked."""
    return dataclasses.field(default=default, metadata={"secret": masking.URL})


def secret_connection_string(default: Any = None) -> Any:
    """A ``Name=value;...`` connection string: shown with its keys masked."""
    return dataclasses.field(default=default, metadata={"secret": masking.CONNECTION_STRING})


def parse_dataclass(cls: type[T], data: object, key: str, source: str) -> T:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(key or "<root>", data, "expected a mapping of keys", source)
    return cls(**parse_fields(cls, data, key, source))


def parse_fields(cls: type, data: Mapping[Any, Any], key: str, source: str, *,
                 unknown: str = "unknown key; known keys here") -> dict[str, Any]:
    """The keys of ``data`` parsed as ``cls``'s fields of those names: every key is checked
    (a file with two mistakes shows both); one not a field is ``unknown``, naming the known."""
    hints = get_type_hints(cls, include_extras=True)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}
    errors: list[ConfigError] = []
    for name, raw in data.items():
        sub = f"{key}.{name}" if key else str(name)
        if name not in fields:
            errors.append(ConfigError(sub, raw, f"{unknown}: {', '.join(sorted(fields))}",
                                      source))
            continue
        try:
            values[name] = parse_value(hints[name], raw, sub, source)
        except ConfigError as exc:
            errors.extend(exc.all)
    raise_config_errors(errors)
    return values


def parse_value(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = get_origin(tp)
    if origin is typing.Annotated:
        base, *markers = get_args(tp)
        if DURATION in markers:
            return _duration(value, key, source)
        if SIZE in markers:
            return _size(value, key, source)
        return parse_value(base, value, key, source)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _union(get_args(tp), value, key, source)
    if origin is Literal:
        for choice in get_args(tp):
            if value == choice or (isinstance(value, int | float | str) and str(value) == str(choice)):
                return choice
        choices = ", ".join(repr(c) for c in get_args(tp))
        raise ConfigError(key, value, f"must be one of {choices}", source)
    if dataclasses.is_dataclass(tp):
        return parse_dataclass(tp, value, key, source)  # type: ignore[arg-type]
    if origin is list:
        return _list(get_args(tp)[0], value, key, source)
    if origin is dict:
        return _dict(get_args(tp)[1], value, key, source)
    return _scalar(tp, value, key, source)


def _union(args: tuple[Any, ...], value: Any, key: str, source: str) -> Any:
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(key, value, "must not be empty", source)
    errors: list[str] = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return parse_value(arg, value, key, source)
        except ConfigError as exc:
            errors.append(exc.reason)
    raise ConfigError(key, value, " or ".join(errors), source)


def _list(item: Any, value: Any, key: str, source: str) -> list[Any]:
    if isinstance(value, str):
        value = _list_from_string(value)
    if not isinstance(value, list):
        raise ConfigError(key, value, "expected a list", source)
    out: list[Any] = []
    errors: list[ConfigError] = []
    for i, v in enumerate(value):
        try:
            out.append(parse_value(item, v, f"{key}[{i}]", source))
        except ConfigError as exc:
            errors.extend(exc.all)
    raise_config_errors(errors)
    return out


def _list_from_string(text: str) -> Any:
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            return orjson.loads(stripped)
        except orjson.JSONDecodeError:
            return text
    return [part.strip() for part in stripped.split(",") if part.strip()]


def _dict(item: Any, value: Any, key: str, source: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise ConfigError(key, value, f"expected a mapping or a JSON object ({exc})", source) from None
    if not isinstance(value, Mapping):
        raise ConfigError(key, value, "expected a mapping", source)
    return {str(k): parse_value(item, v, f"{key}.{k}", source) for k, v in value.items()}


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _scalar(tp: Any, value: Any, key: str, source: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(key, value, "expected true or false", source)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]+\s*", value):
            return int(value)
        raise ConfigError(key, value, "expected a whole number", source)
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, value, "expected a number", source)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, value, "expected a string", source)
    raise TypeError(f"settings type {tp!r} at {key} has no parser")  # a programming error


def _duration(value: Any, key: str, source: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(key, value, "must not be negative", source)
        return float(value)
    if isinstance(value, str):
        match = _NUMBER_WITH_UNIT.match(value)
        if match and match.group(2).lower() in _DURATION_UNITS | {"": 1.0}:
            unit = match.group(2).lower() or "s"
            return float(match.group(1)) * _DURATION_UNITS[unit]
    raise ConfigError(key, value, "expected a duration: seconds, or e.g. '500ms', '30s', '15m', '7d'", source)


def _size(value: Any, key: str, source: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(key, value, "must not be negative", source)
        return value
    if isinstance(value, str):
        match = _NUMBER_WITH_UNIT.match(value)
        if match and match.group(2).lower() in _SIZE_UNITS:
            return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    raise ConfigError(key, value, "expected a size: bytes, or e.g. '256KB', '64MB', '1GB'", source)


def to_plain(obj: Any, mask: bool = True) -> Any:
    """A dataclass tree as plain data, secrets replaced by '***' when ``mask``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            kind = f.metadata.get("secret")
            if mask and kind and value not in (None, ""):
                out[f.name] = masking.mask_value(value, kind)
            else:
                out[f.name] = to_plain(value, mask)
        return out
    if isinstance(obj, list | tuple):
        return [to_plain(v, mask) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v, mask) for k, v in obj.items()}
    return obj
