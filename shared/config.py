"""Typed configuration: frozen dataclasses loaded from TOML, with ``--set key=value`` overrides.

Precedence, lowest first: the dataclass defaults (a method's paper preset), a TOML file
(``--config``), then each ``--set`` in order.  Unknown keys are refused with the nearest
valid name, values are type-checked against the field annotations, and the resolved
config is dumped back to TOML so every run records exactly what it used.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from xkt.shared.errors import ConfigError

T = TypeVar("T")


def load_config(cls: type[T], *, path: Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from its defaults, an optional TOML file and ``key=value`` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        values = _read_toml(path)
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(values, key, value)
    return from_mapping(cls, values, where="")


def from_mapping(cls: type[T], values: Mapping[str, Any], *, where: str = "") -> T:
    """Instantiate dataclass ``cls`` from a (possibly partial, nested) mapping, checking types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {where + key!r}", hint=_near_miss(key, list(fields), where))
        kwargs[key] = _coerce(hints[key], value, where + key)
    return cls(**kwargs)


def to_toml(config: Any) -> str:
    """Render a (nested) config dataclass as TOML, the form saved beside every run."""
    scalars, tables = [], []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            tables.append((field.name, value))
        else:
            scalars.append(f"{field.name} = {toml_value(value)}")
    lines = scalars
    for name, table in tables:
        body = to_toml(table).replace("\n[", f"\n[{name}.")
        lines += ["", f"[{name}]", body.rstrip("\n")]
    return "\n".join(lines) + "\n"


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain JSON-compatible data (tuples become lists)."""
    return typing.cast(dict[str, Any], _plain(dataclasses.asdict(config)))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist", hint="pass an existing TOML file to --config") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}", hint="fix the TOML syntax") from None


def _parse_override(item: str) -> tuple[str, Any]:
    """``a.b=1e-3`` → ("a.b", 0.001). Values are TOML literals; bare words are strings."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not key=value", hint="write --set optim.lr=0.01")
    try:
        return key, tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return key, raw.strip()


def _set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = values
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key {part!r} is a value, not a table", hint=f"drop the '.{leaf}' part")
        node = child
    node[leaf] = value


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check ``value`` against a field annotation; the few safe widenings are int→float, list→tuple."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} must be a table", hint=f"write [{key}] with its keys")
        return from_mapping(hint, value, where=key + ".")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r} has the wrong type", hint=f"expected {hint}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key {key!r} must be a list", hint="write it as [a, b, ...]")
        (item_type, *_rest) = typing.get_args(hint)
        return tuple(_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} must be a table", hint=f"write [{key}] with its keys")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool, float) and not (
        isinstance(value, hint) and (hint is bool or not isinstance(value, bool))
    ):
        raise ConfigError(
            f"config key {key!r} must be {hint.__name__}, got {type(value).__name__} {value!r}",
            hint=f"give {key} a {hint.__name__} value",
        )
    return value


def _near_miss(key: str, known: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"did you mean {where + close[0]!r}?"
    return f"valid keys here: {', '.join(where + k for k in sorted(known))}"


def toml_value(value: Any) -> str:
    """One value in TOML literal syntax (strings escaped, control characters as \\uXXXX)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return '"' + "".join(c if " " <= c != "\x7f" else f"\\u{ord(c):04x}" for c in escaped) + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if value is None:
        raise ConfigError("None cannot be written to TOML", hint="give the field a value")
    raise ConfigError(f"cannot write {type(value).__name__} to TOML", hint="use plain types in configs")
