"""Typed config sections on pydantic v2, with the project's own one-line errors.

A stage declares its config as a `Section` (a pydantic model) whose fields come from `option(...)`:
default, help, range (`min`/`max`, pydantic's `ge`/`le`) and `choices` (a tuple, or a callable so that a
registry filled at import time is consulted when the config is validated). The roof (`pipeline.config`)
composes the sections into the run config and builds it with `build`.

What pydantic does: types (strict: no "3" for an int, no 2.0 for an int, no "yes" for a bool; an int is
accepted for a float and stored as one), ranges, unknown keys (`extra="forbid"`), defaults, dumping.
What is ours: numbers accepted where a string is expected (`name=5`), a comma-separated string accepted
for a list (`eval.tasks=pope,gqa`), a partial nested section starting from that field's own default
(the finetune phase's defaults survive a YAML that sets one finetune key), the cross-field checks
(`Section.check(prefix)`, run after the whole tree is built, children first), and the error text:
every failure is a `ConfigError` with one line that names the dotted key and what is allowed.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator


class ConfigError(ValueError):
    """A config key is unknown, of the wrong type or out of range (message is one line)."""


def option(
    default: Any = ...,
    *,
    help: str = "",
    min: float | None = None,
    max: float | None = None,
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A config field: default (or default_factory), help text, range and allowed values."""
    extra = {"choices": choices} if choices is not None else None
    if default_factory is None and isinstance(default, (list, dict, set)):
        value = default
        default_factory = lambda: _copy(value)  # noqa: E731
    if default_factory is not None:
        return Field(default_factory=default_factory, description=help, ge=min, le=max, json_schema_extra=extra)
    return Field(default, description=help, ge=min, le=max, json_schema_extra=extra)


def _copy(v: Any) -> Any:
    import copy

    return copy.deepcopy(v)


def _choices(field) -> list | None:
    extra = field.json_schema_extra
    choices = extra.get("choices") if isinstance(extra, dict) else None
    if choices is None:
        return None
    return list(choices() if callable(choices) else choices)


def _args(tp: Any) -> tuple:
    return typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Section)


class Section(BaseModel):
    """Base of every config section (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _start_from_field_defaults(cls, data: Any) -> Any:
        """A partial nested section is laid over that field's own default (e.g. the finetune phase's)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name, field in cls.model_fields.items():
            if _is_section(field.annotation) and field.default_factory is not None:
                given = data.get(name)
                if given is None:
                    data.pop(name, None)
                elif isinstance(given, dict):
                    data[name] = {**field.default_factory().model_dump(), **given}
        return data

    @field_validator("*", mode="before")
    @classmethod
    def _command_line_forms(cls, value: Any, info: ValidationInfo) -> Any:
        args = _args(cls.model_fields[info.field_name].annotation)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and str in args:
            return str(value)
        lists = [a for a in args if typing.get_origin(a) in (list, tuple)]
        if lists and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if lists and isinstance(value, list) and str in typing.get_args(lists[0]):
            return [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in value]
        if isinstance(value, dict) and any(typing.get_origin(a) is dict for a in args):
            return {str(k): v for k, v in value.items()}
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _in_choices(cls, value: Any, info: ValidationInfo) -> Any:
        allowed = _choices(cls.model_fields[info.field_name])
        if allowed is not None and value is not None:
            for v in value if isinstance(value, list) else [value]:
                if v not in allowed:
                    raise ValueError(f"{v!r} is not one of {', '.join(map(str, allowed))}")
        return value

    def check(self, prefix: str) -> None:
        """Cross-field checks of this section (raise ConfigError naming `prefix.key`); none by default."""


# ---------------------------------------------------------------------------------------------- errors


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict or _is_section(tp):
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_EXPECTED = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _walk(cls: type, loc: tuple) -> tuple[type | None, Any]:
    """(section holding the last key of `loc`, that key's annotation); the annotation is None for an unknown
    key or a position inside a plain value (a list item, a mapping key)."""
    owner, tp = None, cls
    for part in loc:
        section = next((a for a in _args(tp) if _is_section(a)), None)
        if section is None or part not in section.model_fields:
            return section, None
        owner, tp = section, section.model_fields[part].annotation
    return owner, tp


def _key(prefix: str, loc: tuple) -> str:
    out = prefix
    for part in loc:
        out = f"{out}[{part}]" if isinstance(part, int) else (f"{out}.{part}" if out else str(part))
    return out


def _message(cls: type, err: dict, prefix: str) -> str:
    loc, value, kind = tuple(err["loc"]), err.get("input"), err["type"]
    key = _key(prefix, loc)
    owner, tp = _walk(cls, loc) if loc else (None, cls)
    if kind == "extra_forbidden":
        while isinstance(value, dict) and len(value) == 1:  # name the whole dotted key the user wrote
            (sub, value), = value.items()
            key = f"{key}.{sub}"
        where = _key(prefix, loc[:-1]) or "top level"
        return f"{key}: unknown key (allowed at {where}: {', '.join(owner.model_fields)})"
    if kind == "value_error":
        return f"{key}: {err['ctx']['error']}"
    if kind == "greater_than_equal":
        return f"{key}: must be >= {err['ctx']['ge']}, got {value!r}"
    if kind == "less_than_equal":
        return f"{key}: must be <= {err['ctx']['le']}, got {value!r}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{key}: expected a mapping, got {value!r}"
    if tp is not None and tp in _EXPECTED:
        return f"{key}: expected {_EXPECTED[tp]}, got {value!r}"
    if tp is not None:
        return f"{key}: expected {_type_name(tp)}, got {value!r}"
    return f"{key}: {err['msg']}, got {value!r}"


def _check_tree(obj: Section, prefix: str) -> None:
    for name in type(obj).model_fields:
        value = getattr(obj, name)
        if isinstance(value, Section):
            _check_tree(value, f"{prefix}.{name}" if prefix else name)
    obj.check(prefix)


def build(cls: type[Section], data: Any, prefix: str = "") -> Any:
    """Build section `cls` from a (possibly partial) mapping; any failure is a one-line ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    try:
        obj = cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_message(cls, e.errors()[0], prefix)) from None
    _check_tree(obj, prefix)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config (for YAML/JSON and hashing)."""
    if isinstance(obj, BaseModel):
        return obj.model_dump()
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def describe(cls: type[Section], prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) rows for `ito-mllm config keys`."""
    rows = []
    default_obj = cls()
    for name, field in cls.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if _is_section(field.annotation):
            rows.extend(describe(field.annotation, key))
        else:
            rows.append((key, _type_name(field.annotation), getattr(default_obj, name), field.description or ""))
    return rows
