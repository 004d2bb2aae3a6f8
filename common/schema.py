"""Typed-config machinery: declare fields with ranges/choices, build dataclasses from dicts.

Stage packages declare their config dataclasses with `option(...)`; `pipeline.config`
composes them into the run config. Every validation failure raises `ConfigError` with one
line that names the dotted key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A config key is unknown, of the wrong type or out of range (message is one line)."""


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str = "",
    min: float | None = None,
    max: float | None = None,
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field carrying validation metadata.

    `choices` may be a callable so that a registry filled at import time (stage-1 methods,
    projectors, task sets) is consulted when the config is validated, not when declared.
    """
    meta = {"help": help, "min": min, "max": max, "choices": choices}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: _copy(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _copy(v: Any) -> Any:
    import copy

    return copy.deepcopy(v)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`, converting lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            # `eval.tasks=pope,gqa` on the command line.
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp!r}")


def _check_meta(value: Any, meta: dict, key: str) -> None:
    if value is None:
        return
    lo, hi = meta.get("min"), meta.get("max")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and value < lo:
            raise ConfigError(f"{key}: must be >= {lo}, got {value!r}")
        if hi is not None and value > hi:
            raise ConfigError(f"{key}: must be <= {hi}, got {value!r}")
    choices = meta.get("choices")
    if choices is not None:
        allowed = list(choices() if callable(choices) else choices)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v not in allowed:
                raise ConfigError(f"{key}: {v!r} is not one of {', '.join(map(str, allowed))}")


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a (possibly partial) mapping, validating every key."""
    name = prefix or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in data.items():
        if k not in fields:
            full = f"{prefix}.{k}" if prefix else str(k)
            # Name the whole dotted key the user wrote (`nonsense.key`), not just its first part.
            while isinstance(v, dict) and len(v) == 1:
                (sub, v), = v.items()
                full = f"{full}.{sub}"
            raise ConfigError(f"{full}: unknown key (allowed at {prefix or 'top level'}: {', '.join(fields)})")
    kwargs = {}
    for fname, f in fields.items():
        full = f"{prefix}.{fname}" if prefix else fname
        tp = hints[fname]
        if dataclasses.is_dataclass(tp) and f.default_factory is not dataclasses.MISSING:
            # Start nested sections from their factory default (e.g. the finetune phase's own
            # defaults), so a partial YAML section only changes the keys it names.
            base = to_dict(f.default_factory())
            value = build(tp, {**base, **(data.get(fname) or {})} if isinstance(data.get(fname, {}), dict)
                          else data[fname], full)
        elif fname in data:
            value = _coerce(data[fname], tp, full)
        else:
            continue
        _check_meta(value, f.metadata, full)
        kwargs[fname] = value
    obj = cls(**kwargs)
    for fname, f in fields.items():
        if fname not in kwargs:
            _check_meta(getattr(obj, fname), f.metadata, f"{prefix}.{fname}" if prefix else fname)
    check = getattr(obj, "validate", None)
    if callable(check):
        check(prefix)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config (for YAML/JSON and hashing)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) rows for `--help` output and docs."""
    rows = []
    hints = typing.get_type_hints(cls)
    default_obj = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key))
        else:
            rows.append((key, _type_name(tp), getattr(default_obj, f.name), f.metadata.get("help", "")))
    return rows
