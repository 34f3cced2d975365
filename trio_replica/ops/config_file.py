"""Node settings from a TOML file and ``--set KEY=VALUE`` flags (the ``node`` command).

This module owns the mapping from text to `NodeConfig`: every field of `NodeConfig` and of
its nested settings (``membership``, ``broadcast``, ``replica``, ``replica.digest``,
``link``, ``flow``, ``health``, ``departures``) is settable by its dotted name, with the
names and defaults of the README's "Configuration" table. A TOML file sets them as keys
and tables::

    name = "h1"
    listen = "0.0.0.0:7000"
    advertise = "10.0.0.1:7000"
    seeds = ["10.0.0.1:7000", "10.0.0.2:7000"]
    maps = ["kv"]                  # the command's own settings: maps, tombstone_ttl,
    tombstone_ttl = 604800         # metrics, secret_file (not NodeConfig fields)

    [membership]
    rejoin_interval = 30
    reconnect_interval = 5

    [replica]
    anti_entropy_interval = 10

``--set membership.rejoin_interval=30`` sets one, its value in TOML syntax (a bare word is
taken as a string). Precedence: defaults, then the file, then ``--set``, then the named
flags (``--listen``, ``--join``, ...). An unknown name or a value of the wrong type is a
`ConfigError` naming the setting and what it expected; every setting is then checked by
the configuration classes themselves, as for a node built in Python.
"""

from __future__ import annotations

import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from ..errors import ConfigError
from ..runtime.config import NodeConfig

__all__ = ["COMMAND_KEYS", "SetValue", "apply_settings", "coerce", "parse_set", "read_toml"]

#: Settings of the ``node`` command itself, allowed at the top of the file beside the
#: `NodeConfig` fields.
COMMAND_KEYS = frozenset({"maps", "tombstone_ttl", "metrics", "secret_file", "join"})
#: Fields that cannot come from text (objects, not values).
_NOT_FROM_TEXT = frozenset({"server_ssl", "client_ssl", "secret"})


def read_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"the config file {path} is not valid TOML: {exc}") from None


@attrs.frozen
class SetValue:
    """A ``--set`` value: its text, and what TOML makes of it (a string setting takes the
    text as it is: ``--set cluster=true`` is the cluster "true", not "True")."""

    text: str
    value: Any


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> the nested tables a TOML file would give."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text  # a bare word: a string
        table = out
        parts = key.split(".")
        for part in parts[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        table[parts[-1]] = SetValue(text, value)
    return out


def apply_settings(config: NodeConfig, settings: Mapping[str, Any]) -> NodeConfig:
    """`config` with `settings` (nested tables) applied; command keys are ignored here."""
    node_fields = {k: v for k, v in settings.items() if k not in COMMAND_KEYS}
    evolved: NodeConfig = _evolve(config, node_fields, "")
    return evolved


def _evolve(obj: Any, settings: Mapping[str, Any], prefix: str) -> Any:
    cls = type(obj)
    fields = {f.name: f for f in attrs.fields(cls)}
    hints = typing.get_type_hints(cls)
    changes: dict[str, Any] = {}
    for name, value in settings.items():
        where = f"{prefix}{name}"
        field = fields.get(name)
        if field is None or name in _NOT_FROM_TEXT:
            known = ", ".join(sorted(n for n in fields if n not in _NOT_FROM_TEXT))
            raise ConfigError(f"unknown setting {where!r}; known here: {known}")
        current = getattr(obj, name)
        if attrs.has(type(current)):
            if not isinstance(value, dict):
                raise ConfigError(f"setting {where!r} is a section: give it a table")
            changes[name] = _evolve(current, value, f"{where}.")
            continue
        changes[name] = coerce(where, hints[name], value)
    try:
        return attrs.evolve(obj, **changes)
    except ConfigError as exc:
        if not prefix:
            raise  # top-level checks name their setting already
        raise ConfigError(f"invalid settings under {prefix!r}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid settings under {prefix or 'the top level'!r}: {exc}") from None


def coerce(where: str, hint: Any, value: Any) -> Any:
    """`value` (from TOML, or a `SetValue`) as the type `hint` names, or `ConfigError`."""
    if isinstance(value, dict):
        raise ConfigError(f"setting {where!r} takes a value, not a table")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in args if a is not type(None)]
        if len(options) != 1:
            raise ConfigError(f"setting {where!r} cannot be set from text")
        return coerce(where, options[0], value)
    if isinstance(value, SetValue):
        wants_text = hint in (str, Path) or origin is typing.Literal
        value = value.text if wants_text else value.value
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"setting {where!r} takes one of {list(args)}, not {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"setting {where!r} takes true or false, not {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"setting {where!r} takes a number, not {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"setting {where!r} takes an integer, not {value!r}")
        return value
    if hint in (str, Path):
        if not isinstance(value, str):
            raise ConfigError(f"setting {where!r} takes a string, not {value!r}")
        return value
    if origin is tuple and args and all(a is str for a in args if a is not Ellipsis):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"setting {where!r} takes a list of strings, not {value!r}")
        return tuple(value)
    raise ConfigError(f"setting {where!r} cannot be set from text")
