"""Avro schemas from Python type hints, with converters both ways compiled once per hint.

Supported: ``bool``, ``int`` (Avro long), ``float`` (double), ``str``, ``bytes``, ``None``,
``datetime`` (timestamp-micros; timezone-aware only), ``date``, ``UUID``, ``Enum`` (by
member name), ``X | None``, ``list``/``tuple``/``Sequence``/``set`` of a supported type,
``dict``/``Mapping`` with ``str`` keys, dataclasses and Pydantic models whose fields are
supported. Anything else raises :class:`NoAvroMapping`, which makes a task fall back to JSON.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import datetime as dt
import enum
import re
import sys
import types
import typing
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["AvroType", "NoAvroMapping", "avro_name", "compile_hint", "field_default"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class NoAvroMapping(Exception):
    """A type hint has no Avro form; the message says which and why."""


Convert = Callable[[Any], Any]


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True, slots=True)
class AvroType:
    """The Avro schema of one type hint and how its values cross into Avro and back."""

    schema: Any
    to_avro: Convert = _same
    from_avro: Convert = _same

    @property
    def plain(self) -> bool:
        """Both converters are the identity (scalars): callers may skip them."""
        return self.to_avro is _same and self.from_avro is _same


def avro_name(text: str) -> str:
    """``text`` as a valid Avro name: invalid characters become ``_``."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", text)
    return name if name and not name[0].isdigit() else f"_{name}"


def _namespace(text: str) -> str:
    return ".".join(avro_name(part) for part in text.split(".") if part)


def _check_int(value: Any) -> Any:
    # bool is an int subclass; an Avro long must not silently take True.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an int, got {type(value).__name__}")
    return value


def _to_float(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a float, got {type(value).__name__}")
    return float(value)


def _aware(value: Any) -> Any:
    if not isinstance(value, dt.datetime):
        raise TypeError(f"expected a datetime, got {type(value).__name__}")
    if value.tzinfo is None:
        raise TypeError("a datetime must be timezone-aware to travel as Avro timestamp-micros")
    return value


_SCALARS: dict[Any, AvroType] = {
    bool: AvroType("boolean"),
    int: AvroType("long", to_avro=_check_int),
    float: AvroType("double", to_avro=_to_float),
    str: AvroType("string"),
    bytes: AvroType("bytes"),
    type(None): AvroType("null"),
    None: AvroType("null"),
    dt.datetime: AvroType({"type": "long", "logicalType": "timestamp-micros"}, to_avro=_aware),
    dt.date: AvroType({"type": "int", "logicalType": "date"}),
    uuid.UUID: AvroType({"type": "string", "logicalType": "uuid"}),
}

_SEQUENCES = (list, tuple, set, frozenset, collections.abc.Sequence, collections.abc.Set)
_MAPPINGS = (dict, collections.abc.Mapping)


def compile_hint(hint: Any, defined: dict[str, Any], where: str) -> AvroType:
    """The Avro form of ``hint``.

    ``defined`` maps the full names of records and enums already written in the schema
    being built to their Python class: Avro allows one definition per name, later uses
    refer to it by name. ``where`` names the spot for error messages.
    """
    if isinstance(hint, typing.TypeVar | str | typing.ForwardRef):
        raise NoAvroMapping(f"{where}: unresolved type {hint!r}")
    scalar = _SCALARS.get(hint) if _hashable(hint) else None
    if scalar is not None:
        return scalar
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return _optional(hint, defined, where)
    if origin is typing.Annotated:
        return compile_hint(typing.get_args(hint)[0], defined, where)
    if origin in _SEQUENCES:
        return _array(hint, origin, defined, where)
    if origin in _MAPPINGS:
        return _map(hint, defined, where)
    if isinstance(hint, type):
        if issubclass(hint, enum.Enum):
            return _enum(hint, defined)
        if dataclasses.is_dataclass(hint):
            names = {f.name: f for f in dataclasses.fields(hint)}
            defaults = {
                n: f.default for n, f in names.items() if f.default is not dataclasses.MISSING
            }
            return _record(hint, list(names), defaults, defined, where)
        if _is_pydantic(hint):
            model_fields = hint.model_fields  # type: ignore[attr-defined]
            defaults = {n: f.default for n, f in model_fields.items() if not f.is_required()}
            return _record(hint, list(model_fields), defaults, defined, where)
    raise NoAvroMapping(f"{where}: {_show(hint)} has no Avro mapping")


def _hashable(hint: Any) -> bool:
    try:
        hash(hint)
    except TypeError:
        return False
    return True


def _show(hint: Any) -> str:
    return hint.__qualname__ if isinstance(hint, type) else repr(hint)


def _is_pydantic(cls: type) -> bool:
    pydantic = sys.modules.get("pydantic")  # only a model's module can have imported it
    return pydantic is not None and issubclass(cls, pydantic.BaseModel)


def _optional(hint: Any, defined: dict[str, Any], where: str) -> AvroType:
    members = [m for m in typing.get_args(hint) if m is not type(None)]
    if len(members) != 1 or len(typing.get_args(hint)) != 2:
        raise NoAvroMapping(f"{where}: {hint!r}: only `X | None` unions are mapped")
    inner = compile_hint(members[0], defined, where)
    if inner.plain:
        return AvroType(["null", inner.schema])
    to_inner, from_inner = inner.to_avro, inner.from_avro
    return AvroType(
        ["null", inner.schema],
        to_avro=lambda v: None if v is None else to_inner(v),
        from_avro=lambda v: None if v is None else from_inner(v),
    )


def _array(hint: Any, origin: Any, defined: dict[str, Any], where: str) -> AvroType:
    args = [a for a in typing.get_args(hint) if a is not Ellipsis]
    if origin is tuple and (len(typing.get_args(hint)) != 2 or typing.get_args(hint)[1] is not ...):
        raise NoAvroMapping(f"{where}: {hint!r}: only `tuple[X, ...]` is mapped")
    if len(args) != 1:
        raise NoAvroMapping(f"{where}: {hint!r} needs its item type")
    item = compile_hint(args[0], defined, where)
    to_item, from_item = item.to_avro, item.from_avro
    build: Callable[[Any], Any] = (
        origin if origin in (tuple, set, frozenset) else list  # abstract types come back as list
    )

    def to_avro(value: Any) -> Any:
        if isinstance(value, str | bytes) or not isinstance(value, collections.abc.Iterable):
            raise TypeError(f"expected a sequence, got {type(value).__name__}")
        return [to_item(v) for v in value]

    return AvroType(
        {"type": "array", "items": item.schema},
        to_avro=to_avro,
        from_avro=lambda v: build(from_item(x) for x in v),
    )


def _map(hint: Any, defined: dict[str, Any], where: str) -> AvroType:
    args = typing.get_args(hint)
    if len(args) != 2 or args[0] is not str:
        raise NoAvroMapping(f"{where}: {hint!r}: only mappings with str keys are mapped")
    value = compile_hint(args[1], defined, where)
    to_value, from_value = value.to_avro, value.from_avro

    def to_avro(v: Any) -> Any:
        if not isinstance(v, collections.abc.Mapping):
            raise TypeError(f"expected a mapping, got {type(v).__name__}")
        return {k: to_value(x) for k, x in v.items()}

    return AvroType(
        {"type": "map", "values": value.schema},
        to_avro=to_avro,
        from_avro=lambda v: {k: from_value(x) for k, x in v.items()},
    )


def _full_name(cls: type) -> tuple[str, str]:
    return _namespace(cls.__module__), avro_name(cls.__qualname__.replace(".", "_"))


def _enum(cls: type[enum.Enum], defined: dict[str, Any]) -> AvroType:
    namespace, name = _full_name(cls)
    full = f"{namespace}.{name}"
    members = list(cls)

    def to_avro(v: Any) -> Any:
        return cls(v).name  # accepts a member or its value

    def from_avro(v: Any) -> Any:
        return cls[v]

    if defined.get(full) is cls:
        return AvroType(full, to_avro, from_avro)
    _claim(defined, full, cls)
    symbols = [m.name for m in members]
    bad = [s for s in symbols if not _NAME.match(s)]
    if bad:
        raise NoAvroMapping(f"enum {cls.__qualname__}: members {bad} are not valid Avro symbols")
    schema = {"type": "enum", "name": name, "namespace": namespace, "symbols": symbols}
    return AvroType(schema, to_avro, from_avro)


def _claim(defined: dict[str, Any], full: str, cls: type) -> None:
    if full in defined and defined[full] is not cls:
        raise NoAvroMapping(f"two types share the Avro name {full!r}")
    defined[full] = cls


def _record(
    cls: type, names: list[str], defaults: dict[str, Any], defined: dict[str, Any], where: str
) -> AvroType:
    namespace, name = _full_name(cls)
    full = f"{namespace}.{name}"
    if defined.get(full) is cls:
        # Already written above, or being written (a recursive type): refer to it by name.
        converters = defined[f"{full}#converters"]
        return AvroType(full, converters[0], converters[1])
    _claim(defined, full, cls)
    hints = typing.get_type_hints(cls, include_extras=True)
    compiled: dict[str, AvroType] = {}
    fields: list[dict[str, Any]] = []

    def to_avro(value: Any) -> Any:
        if isinstance(value, cls):
            return {n: compiled[n].to_avro(getattr(value, n)) for n in names}
        if isinstance(value, collections.abc.Mapping):
            return {n: compiled[n].to_avro(value[n]) if n in value else _missing(n) for n in names}
        raise TypeError(f"expected a {cls.__qualname__}, got {type(value).__name__}")

    def from_avro(value: Any) -> Any:
        return cls(**{n: compiled[n].from_avro(value[n]) for n in names})

    # Registered before the fields compile, so a field of the record's own type refers back.
    defined[f"{full}#converters"] = (to_avro, from_avro)
    for field_name in names:
        if not _NAME.match(field_name):
            raise NoAvroMapping(f"{cls.__qualname__}.{field_name}: not a valid Avro field name")
        compiled[field_name] = compile_hint(
            hints.get(field_name, Any), defined, f"{where} → {cls.__qualname__}.{field_name}"
        )
        field: dict[str, Any] = {"name": field_name, "type": compiled[field_name].schema}
        if field_name in defaults:
            field_default(field, defaults[field_name])
        fields.append(field)
    schema = {"type": "record", "name": name, "namespace": namespace, "fields": fields}
    doc = cls.__doc__
    if doc and not doc.startswith(f"{cls.__name__}("):  # dataclasses' generated doc is noise
        schema["doc"] = doc.strip()
    return AvroType(schema, to_avro, from_avro)


def _missing(name: str) -> Any:
    raise TypeError(f"missing field {name!r}")


def field_default(field: dict[str, Any], value: Any) -> None:
    """Give ``field`` the Avro default ``value`` when Avro can express it, else none.

    A default is what lets a later version add the field compatibly; an inexpressible one
    (an object, a factory) is left out rather than guessed.
    """
    schema = field["type"]
    if isinstance(schema, list):
        if value is None and schema[0] == "null":
            field["default"] = None
        elif value is not None and "null" in schema and _fits(schema[1], value):
            # An Avro union's default must match its first branch.
            field["type"] = [schema[1], "null"]
            field["default"] = value
        return
    if _fits(schema, value):
        field["default"] = value


def _fits(schema: Any, value: Any) -> bool:
    if isinstance(value, bool):
        return bool(schema == "boolean")
    if isinstance(value, int):
        return schema in ("long", "double")
    if isinstance(value, float):
        return bool(schema == "double")
    if isinstance(value, str):
        return bool(schema == "string")
    return False
