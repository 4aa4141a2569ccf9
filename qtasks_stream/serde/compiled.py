"""Avro writers and readers compiled for one parsed schema: Python source generated per
schema, one statement per field, no per-value dispatch on the schema.

fastavro's schemaless codecs walk the schema for every value (a type test per field, a
scan of the branches per union); for the project's own schemas these do the same work
2-3x faster and give the same bytes and values (tests/unit/test_compiled_avro.py checks
every schema against fastavro). Shapes they do not cover (logical types, recursive
types, unions other than ``null`` and one type or of records only) compile to ``None``,
and the caller uses fastavro.

A writer fails (``TypeError``, ``AttributeError``, ``KeyError``, ``ValueError``) on a
value that does not fit (an int out of its type's range included) without naming the
field: :func:`~qtasks_stream.serde.wire.write` then writes as before it, which does. A
reader fails with ``IndexError``, ``ValueError`` (``UnicodeDecodeError``) or ``KeyError`` on
corrupt bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Reader", "Writer", "compile_reader", "compile_writer"]

#: Appends the Avro body of a value to the buffer.
Writer = Callable[[Any, bytearray], None]
#: The value whose body starts at ``pos`` in ``data``, and the position after it.
Reader = Callable[[bytes, int], tuple[Any, int]]

_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
_SMALL = tuple(bytes([i]) for i in range(128))


class _Unsupported(Exception):
    """A schema shape these codecs do not cover: fastavro handles it."""


def _varint(n: int) -> bytes | bytearray:
    """The Avro varint of an already zig-zagged ``n``."""
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return out


def _long(data: bytes, pos: int) -> tuple[int, int]:
    """The zig-zag varint at ``pos``, and the position after it."""
    b = data[pos]
    pos += 1
    n = b & 0x7F
    shift = 7
    while b & 0x80:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
    return (n >> 1) ^ -(n & 1), pos


class _Source:
    """Generated source with fresh variable names, and the globals it refers to."""

    def __init__(self, parsed: Any) -> None:
        self.named: Mapping[str, Any] = (
            parsed.get("__named_schemas", {}) if isinstance(parsed, dict) else {}
        )
        self.env: dict[str, Any] = {
            "_varint": _varint,
            "_long": _long,
            "_SMALL": _SMALL,
            "_pack_d": struct.Struct("<d").pack,
            "_pack_f": struct.Struct("<f").pack,
            "_unpack_d": struct.Struct("<d").unpack_from,
            "_unpack_f": struct.Struct("<f").unpack_from,
            "_TypeError": TypeError,
            "_ValueError": ValueError,
        }
        self._count = 0
        self._expanding: set[str] = set()

    def var(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"

    def constant(self, prefix: str, value: Any) -> str:
        name = self.var(f"_{prefix}")
        self.env[name] = value
        return name

    def resolve(self, schema: Any) -> Any:
        """A named type's definition (a primitive name stays as it is)."""
        if isinstance(schema, str) and schema not in _PRIMITIVES:
            if schema not in self.named:
                raise _Unsupported(f"unknown type {schema!r}")
            if schema in self._expanding:
                raise _Unsupported("recursive type")
            return self.named[schema]
        if isinstance(schema, dict) and schema.get("type") in _PRIMITIVES:
            if "logicalType" in schema:
                raise _Unsupported("logical type")
            return schema["type"]
        return schema

    def entering(self, schema: Any) -> str | None:
        """Marks a named record as being expanded (a reference to it inside is recursion)."""
        name = schema.get("name") if isinstance(schema, dict) else None
        if name is not None:
            if name in self._expanding:
                raise _Unsupported("recursive type")
            self._expanding.add(name)
        return name

    def left(self, name: str | None) -> None:
        if name is not None:
            self._expanding.discard(name)

    def build(self, source: str, name: str) -> Any:
        exec(compile(source, f"<avro {name}>", "exec"), self.env)  # our own generated source
        return self.env[name]


def _records_union(src: _Source, union: list[Any]) -> list[dict[str, Any]] | None:
    """The branches of a union of two or more records (and nothing else), else None."""
    branches = [src.resolve(b) for b in union]
    if len(branches) >= 2 and all(
        isinstance(b, dict) and b.get("type") == "record" for b in branches
    ):
        return branches
    return None


# -- writers ----------------------------------------------------------------------------------


def compile_writer(parsed: Any) -> Writer | None:
    """A writer of values of ``parsed`` (a fastavro-parsed schema), or None if its shape
    is not covered. Unions of records take fastavro's tuple form, ``(full name, fields)``."""
    src = _Source(parsed)
    try:
        return _writer_function(src, parsed, "write")  # type: ignore[no-any-return]
    except _Unsupported:
        return None


def _writer_function(src: _Source, schema: Any, name: str) -> Any:
    lines: list[str] = []
    _write(src, schema, "value", lines, "    ")
    return src.build(f"def {name}(value, out):\n" + "\n".join(lines or ["    pass"]), name)


def _write(src: _Source, schema: Any, value: str, lines: list[str], pad: str) -> None:
    schema = src.resolve(schema)
    if isinstance(schema, str):
        _write_primitive(src, schema, value, lines, pad)
        return
    if isinstance(schema, list):
        _write_union(src, schema, value, lines, pad)
        return
    kind = schema.get("type")
    if kind == "record":
        name = src.entering(schema)
        for field in schema["fields"]:
            if "default" in field:
                default = src.constant("default", field["default"])
                got = f"{value}.get({field['name']!r}, {default})"
            else:
                got = f"{value}[{field['name']!r}]"
            _write(src, field["type"], got, lines, pad)
        src.left(name)
    elif kind in ("array", "map"):
        items, item, key = src.var("items"), src.var("item"), src.var("key")
        lines.append(f"{pad}{items} = {value}")
        lines.append(f"{pad}if {items}:")
        lines.append(f"{pad}    out += _varint(len({items}) << 1)")
        if kind == "array":
            lines.append(f"{pad}    for {item} in {items}:")
            _write(src, schema["items"], item, lines, pad + "        ")
        else:
            lines.append(f"{pad}    for {key}, {item} in {items}.items():")
            _write_primitive(src, "string", key, lines, pad + "        ")
            _write(src, schema["values"], item, lines, pad + "        ")
        lines.append(f"{pad}out += b'\\x00'")
    elif kind == "enum":
        table = src.constant(
            "symbols", {s: _varint(i << 1) for i, s in enumerate(schema["symbols"])}
        )
        lines.append(f"{pad}out += {table}[{value}]")
    elif kind == "fixed":
        data = src.var("fixed")
        lines.append(f"{pad}{data} = {value}")
        lines.append(f"{pad}if len({data}) != {int(schema['size'])}: raise _ValueError('size')")
        lines.append(f"{pad}out += {data}")
    else:
        raise _Unsupported(f"type {kind!r}")


def _write_primitive(src: _Source, kind: str, value: str, lines: list[str], pad: str) -> None:
    if kind == "null":
        lines.append(f"{pad}if {value} is not None: raise _TypeError('not null')")
    elif kind in ("string", "bytes"):
        data = src.var("data")
        lines.append(
            f"{pad}{data} = {value}.encode()" if kind == "string" else f"{pad}{data} = {value}"
        )
        size = src.var("size")
        lines.append(f"{pad}{size} = len({data}) << 1")
        lines.append(f"{pad}if {size} < 0x80:")
        lines.append(f"{pad}    out.append({size})")
        lines.append(f"{pad}else:")
        lines.append(f"{pad}    out += _varint({size})")
        lines.append(f"{pad}out += {data}")
    elif kind in ("int", "long"):
        # fastavro writes an int past the type's range silently wrong: refused here, and
        # wire.write's fallback names the field. A bool is an int, written as fastavro does.
        number, zigzag = src.var("number"), src.var("zigzag")
        low, high = (-(2**31), 2**31 - 1) if kind == "int" else (-(2**63), 2**63 - 1)
        lines.append(f"{pad}{number} = {value}")
        lines.append(f"{pad}if not {low} <= {number} <= {high}:")
        lines.append(f"{pad}    raise _ValueError('out of range')")
        lines.append(f"{pad}{zigzag} = ({number} << 1) ^ ({number} >> 63)")
        lines.append(f"{pad}if {zigzag} < 0x80:")
        lines.append(f"{pad}    out.append({zigzag})")
        lines.append(f"{pad}else:")
        lines.append(f"{pad}    out += _varint({zigzag})")
    elif kind == "double":
        lines.append(f"{pad}out += _pack_d({value})")
    elif kind == "float":
        lines.append(f"{pad}out += _pack_f({value})")
    elif kind == "boolean":
        lines.append(f"{pad}out += b'\\x01' if {value} else b'\\x00'")
    else:
        raise _Unsupported(f"type {kind!r}")


def _write_union(src: _Source, union: list[Any], value: str, lines: list[str], pad: str) -> None:
    others = [b for b in union if b != "null"]
    if len(union) == 2 and len(others) == 1:
        got = src.var("optional")
        null_index = union.index("null")
        lines.append(f"{pad}{got} = {value}")
        lines.append(f"{pad}if {got} is None:")
        lines.append(f"{pad}    out += _SMALL[{null_index * 2}]")
        lines.append(f"{pad}else:")
        lines.append(f"{pad}    out += _SMALL[{(1 - null_index) * 2}]")
        _write(src, others[0], got, lines, pad + "    ")
        return
    records = _records_union(src, union)
    if records is None:
        raise _Unsupported("union")
    table: dict[str, tuple[bytes | bytearray, Any]] = {}
    for index, record in enumerate(records):
        writer = _writer_function(src, record, src.var("write_branch"))
        table[record["name"]] = (_varint(index << 1), writer)
    branches = src.constant("branches", table)
    name, body, branch = src.var("name"), src.var("body"), src.var("branch")
    lines.append(f"{pad}{name}, {body} = {value}")  # not a (name, fields) tuple: fails
    lines.append(f"{pad}{branch} = {branches}[{name}]")
    lines.append(f"{pad}out += {branch}[0]")
    lines.append(f"{pad}{branch}[1]({body}, out)")


# -- readers ----------------------------------------------------------------------------------


def compile_reader(parsed: Any) -> Reader | None:
    """A reader of bodies written with ``parsed`` (the writer's schema, read as itself), or
    None if its shape is not covered. Values are fastavro's with ``return_record_name`` and
    ``return_record_name_override``: a union of records gives ``(full name, fields)``."""
    src = _Source(parsed)
    lines: list[str] = []
    try:
        _read(src, parsed, "value", lines, "    ")
    except _Unsupported:
        return None
    source = "def read(data, pos):\n" + "\n".join(lines) + "\n    return value, pos"
    return src.build(source, "read")  # type: ignore[no-any-return]


def _read_varint(target: str, lines: list[str], pad: str) -> None:
    # One byte (small numbers, lengths and union indexes) without a call.
    lines.append(f"{pad}{target} = data[pos]")
    lines.append(f"{pad}if {target} < 0x80:")
    lines.append(f"{pad}    {target} = ({target} >> 1) ^ -({target} & 1)")
    lines.append(f"{pad}    pos += 1")
    lines.append(f"{pad}else:")
    lines.append(f"{pad}    {target}, pos = _long(data, pos)")


def _read(src: _Source, schema: Any, target: str, lines: list[str], pad: str) -> None:
    schema = src.resolve(schema)
    if isinstance(schema, str):
        _read_primitive(src, schema, target, lines, pad)
        return
    if isinstance(schema, list):
        _read_union(src, schema, target, lines, pad)
        return
    kind = schema.get("type")
    if kind == "record":
        name = src.entering(schema)
        fields = []
        for field in schema["fields"]:
            got = src.var("field")
            _read(src, field["type"], got, lines, pad)
            fields.append(f"{field['name']!r}: {got}")
        src.left(name)
        lines.append(f"{pad}{target} = {{{', '.join(fields)}}}")
    elif kind in ("array", "map"):
        count, item, key = src.var("count"), src.var("item"), src.var("key")
        lines.append(f"{pad}{target} = {'[]' if kind == 'array' else '{}'}")
        lines.append(f"{pad}while True:")
        _read_varint(count, lines, pad + "    ")
        lines.append(f"{pad}    if {count} == 0:")
        lines.append(f"{pad}        break")
        lines.append(f"{pad}    if {count} < 0:  # a block with its size in bytes")
        lines.append(f"{pad}        {count} = -{count}")
        lines.append(f"{pad}        _, pos = _long(data, pos)")
        lines.append(f"{pad}    for _ in range({count}):")
        if kind == "array":
            _read(src, schema["items"], item, lines, pad + "        ")
            lines.append(f"{pad}        {target}.append({item})")
        else:
            _read_primitive(src, "string", key, lines, pad + "        ")
            _read(src, schema["values"], item, lines, pad + "        ")
            lines.append(f"{pad}        {target}[{key}] = {item}")
    elif kind == "enum":
        symbols = src.constant("symbols", tuple(schema["symbols"]))
        index = src.var("index")
        _read_varint(index, lines, pad)
        lines.append(f"{pad}if {index} < 0: raise _ValueError('enum index')")
        lines.append(f"{pad}{target} = {symbols}[{index}]")
    elif kind == "fixed":
        size = int(schema["size"])
        lines.append(f"{pad}{target} = data[pos:pos + {size}]")
        lines.append(f"{pad}pos += {size}")
    else:
        raise _Unsupported(f"type {kind!r}")


def _read_primitive(src: _Source, kind: str, target: str, lines: list[str], pad: str) -> None:
    if kind == "null":
        lines.append(f"{pad}{target} = None")
    elif kind in ("string", "bytes"):
        size = src.var("size")
        _read_varint(size, lines, pad)
        lines.append(f"{pad}if {size} < 0: raise _ValueError('negative length')")
        decode = ".decode()" if kind == "string" else ""
        lines.append(f"{pad}{target} = data[pos:pos + {size}]{decode}")
        lines.append(f"{pad}pos += {size}")
    elif kind in ("int", "long"):
        _read_varint(target, lines, pad)
    elif kind == "double":
        lines.append(f"{pad}{target}, = _unpack_d(data, pos)")
        lines.append(f"{pad}pos += 8")
    elif kind == "float":
        lines.append(f"{pad}{target}, = _unpack_f(data, pos)")
        lines.append(f"{pad}pos += 4")
    elif kind == "boolean":
        lines.append(f"{pad}{target} = data[pos] == 1")
        lines.append(f"{pad}pos += 1")
    else:
        raise _Unsupported(f"type {kind!r}")


def _read_union(src: _Source, union: list[Any], target: str, lines: list[str], pad: str) -> None:
    resolved = [src.resolve(b) for b in union]
    is_record = [isinstance(b, dict) and b.get("type") == "record" for b in resolved]
    # As fastavro's return_record_name_override: names only where two or more records are.
    named = sum(is_record) >= 2
    index = src.var("index")
    _read_varint(index, lines, pad)
    for i, branch in enumerate(union):
        lines.append(f"{pad}{'if' if i == 0 else 'elif'} {index} == {i}:")
        if named and is_record[i]:
            record = resolved[i]
            body = src.var("body")
            _read(src, record, body, lines, pad + "    ")
            lines.append(f"{pad}    {target} = ({record['name']!r}, {body})")
        else:
            _read(src, branch, target, lines, pad + "    ")
    lines.append(f"{pad}else:")
    lines.append(f"{pad}    raise _ValueError(f'union index {{{index}}} out of range')")
