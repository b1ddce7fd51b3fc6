"""Analytics access: a bounded read of a cdpflow topic into pandas / Arrow.

Analysts want "the enriched events of last Tuesday" as a DataFrame without
running a consumer group, learning the wire format or waiting on a stream that
never ends. So a read here is a *snapshot*:

* The range is fixed when the read starts: per partition, the first offset at or
  after ``since`` (the broker's ``offsets_for_times``, i.e. the Kafka record
  timestamp, which for cdpflow topics is when the pipeline wrote the record, not
  the event's own ``timestamp``) up to the first offset at or after ``until``,
  capped at the high watermark *at call time*. Records appended meanwhile are not
  read, so a read always ends. Records whose timestamp is out of order (a
  producer's clock) are filtered by timestamp as well, so the range is exact.
* It never touches the pipeline's consumer groups: partitions are assigned, not
  subscribed, under a throw-away group id, and nothing is committed.
* It never blocks forever: a partition that makes no progress for
  ``idle_timeout_s`` raises :class:`ReadTimeout` instead of returning a silently
  partial frame.

Values are decoded through the registry with the topic's current schema as the
reader schema (old records are resolved into it, so every chunk has the same
columns), straight into Arrow, then into pandas with stable dtypes: timestamps
``datetime64[ms, UTC]``, nullable ``Int32``/``Int64``/``boolean``, ``string``.
Nested records become dotted columns (``event.context.page.url``); the JSON text
fields (``properties``, ``traits``, ``profileTraits``, ``context.extraJson``...)
are parsed to Python objects and can be spread into columns with ``flatten``.
"""

from __future__ import annotations

import base64
import contextlib
import heapq
import io
import json
import re
import struct
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any, Final, Literal

import orjson
import pandas as pd
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
from confluent_kafka import Consumer, KafkaError, TopicPartition
from confluent_kafka.schema_registry.error import SchemaRegistryError
from fastavro import parse_schema, schemaless_reader
from fastavro.schema import to_parsing_canonical_form

from streams import schemas, topics
from streams.serde import (
    HEADER,
    MAGIC_BYTE,
    DecodeError,
    MalformedAvro,
    NotWireFormat,
    SchemaMismatch,
    SchemaRegistry,
)
from streams.settings import Settings, get_settings

#: The topics this module is meant for (any Avro topic in the registry works).
ANALYTICS_TOPICS: Final = (
    topics.EVENTS_ENRICHED,
    topics.EVENTS_DLQ,
    topics.RECOMMENDATIONS_UPDATES,
    topics.AUDIENCES_UPDATES,
)
DEFAULT_CHUNK_SIZE: Final = 50_000
#: Top-level struct holding where each record came from; flattened to ``kafka.*``.
KAFKA_COLUMN: Final = "kafka"
#: Avro string fields holding JSON text: cdpflow documents them as "JSON object...".
JSON_DOC_PREFIX: Final = "JSON"

TimeArg = datetime | str | int | float
Errors = Literal["raise", "skip"]
Progress = Callable[[int, int], None]

_TIMESTAMP_UNITS: Final = {
    "timestamp-millis": ("ms", "UTC"),
    "timestamp-micros": ("us", "UTC"),
    "local-timestamp-millis": ("ms", None),
    "local-timestamp-micros": ("us", None),
}
#: Logical types read as their plain Avro value: Arrow converts those integers
#: (or text) itself, far faster than fastavro building datetime/UUID objects.
_PLAIN_LOGICAL: Final = frozenset({*_TIMESTAMP_UNITS, "date", "time-millis", "time-micros", "uuid"})
_RELATIVE = re.compile(r"^-?\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class AnalyticsError(RuntimeError):
    """A read that cannot be done as asked (unknown topic, schema, time)."""


class ReadTimeout(AnalyticsError):
    """Partitions made no progress for ``idle_timeout_s``: the broker is gone or stuck."""


class UnsupportedSchema(AnalyticsError):
    """An Avro construct without a faithful Arrow column (a union of several types)."""


# --------------------------------------------------------------------------- time


def to_epoch_ms(value: TimeArg, *, now: datetime | None = None) -> int:
    """Milliseconds since the epoch for a datetime, ISO text, relative text or number.

    Naive datetimes and ISO strings without offset are UTC: a range taken in the
    analyst's local zone would shift silently with the machine it runs on.
    Relative text (``"-2h"``, ``"30m"``, ``"7d"``) counts back from ``now``;
    ``"now"`` is now. Numbers are epoch milliseconds.
    """
    if isinstance(value, datetime):
        dt = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return int(dt.timestamp() * 1000)
    if isinstance(value, bool):
        raise AnalyticsError("a time must be a datetime, ISO-8601 text or epoch millis")
    if isinstance(value, int | float):
        return int(value)
    text = value.strip()
    current = now or datetime.now(UTC)
    if text.lower() == "now":
        return int(current.timestamp() * 1000)
    rel = _RELATIVE.match(text.lower())
    if rel:
        seconds = float(rel.group(1)) * _UNIT_SECONDS[rel.group(2)]
        return int((current - timedelta(seconds=seconds)).timestamp() * 1000)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise AnalyticsError(
            f"{value!r} is not a time: use ISO-8601 (2026-11-27T10:00:00Z), "
            "a relative time (-2h, 30m, 7d) or 'now'"
        ) from None
    return to_epoch_ms(parsed)


# --------------------------------------------------------------------------- schemas


def _strip_plain_logical(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_strip_plain_logical(s) for s in schema]
    if isinstance(schema, dict):
        out = {
            k: _strip_plain_logical(v)
            for k, v in schema.items()
            if not (k == "logicalType" and v in _PLAIN_LOGICAL)
        }
        return out
    return schema


def _full_name(schema: dict[str, Any], namespace: str | None) -> str:
    name = str(schema["name"])
    if "." in name:
        return name
    ns = schema.get("namespace", namespace)
    return f"{ns}.{name}" if ns else name


@dataclass
class _ArrowMapping:
    """What walking an Avro schema tells about its Arrow shape."""

    json_paths: list[tuple[str, ...]] = field(default_factory=list)
    named: dict[str, Any] = field(default_factory=dict)


def _arrow_type(
    schema: Any, mapping: _ArrowMapping, namespace: str | None, path: tuple[str, ...] | None
) -> tuple[pa.DataType, bool]:
    """(Arrow type, nullable) of an Avro schema; ``path`` is None inside arrays/maps."""
    if isinstance(schema, str):
        primitive = _PRIMITIVES.get(schema)
        if primitive is not None:
            return primitive, schema == "null"
        named = mapping.named.get(schema) or mapping.named.get(f"{namespace}.{schema}")
        if named is None:
            raise UnsupportedSchema(f"unknown Avro type {schema!r}")
        return named, False
    if isinstance(schema, list):
        branches = [b for b in schema if b != "null"]
        if len(branches) != 1:
            raise UnsupportedSchema(
                f"union {json.dumps(schema)[:120]} has several non-null branches; "
                "only [null, T] unions map to one Arrow column"
            )
        inner, _ = _arrow_type(branches[0], mapping, namespace, path)
        return inner, len(branches) != len(schema)
    kind = schema["type"]
    logical = schema.get("logicalType")
    if logical in _TIMESTAMP_UNITS:
        unit, tz = _TIMESTAMP_UNITS[logical]
        return pa.timestamp(unit, tz=tz), False
    if logical == "date":
        return pa.date32(), False
    if logical == "time-millis":
        return pa.time32("ms"), False
    if logical == "time-micros":
        return pa.time64("us"), False
    if logical == "decimal":
        return pa.decimal128(int(schema["precision"]), int(schema.get("scale", 0))), False
    if kind == "record" or kind == "error":
        full = _full_name(schema, namespace)
        ns = full.rpartition(".")[0] or None
        fields = []
        for f in schema["fields"]:
            child_path = (*path, f["name"]) if path is not None else None
            ftype, nullable = _arrow_type(f["type"], mapping, ns, child_path)
            meta = {}
            if f.get("doc"):
                meta[b"doc"] = str(f["doc"]).encode()
            if (
                ftype == pa.string()
                and str(f.get("doc", "")).startswith(JSON_DOC_PREFIX)
                and child_path is not None
            ):
                mapping.json_paths.append(child_path)
                meta[b"cdpflow.json"] = b"true"
            fields.append(pa.field(f["name"], ftype, nullable=nullable, metadata=meta or None))
        struct = pa.struct(fields)
        mapping.named[full] = struct
        return struct, False
    if kind == "enum":
        mapping.named[_full_name(schema, namespace)] = pa.string()
        return pa.string(), False
    if kind == "fixed":
        fixed = pa.binary(int(schema["size"]))
        mapping.named[_full_name(schema, namespace)] = fixed
        return fixed, False
    if kind == "array":
        item, nullable = _arrow_type(schema["items"], mapping, namespace, None)
        return pa.list_(pa.field("item", item, nullable=nullable)), False
    if kind == "map":
        value, nullable = _arrow_type(schema["values"], mapping, namespace, None)
        return pa.map_(pa.string(), pa.field("value", value, nullable=nullable)), False
    return _arrow_type(kind, mapping, namespace, path)


_PRIMITIVES: Final[dict[str, pa.DataType]] = {
    "null": pa.null(),
    "boolean": pa.bool_(),
    "int": pa.int32(),
    "long": pa.int64(),
    "float": pa.float32(),
    "double": pa.float64(),
    "bytes": pa.binary(),
    "string": pa.string(),
}

KAFKA_STRUCT: Final = pa.struct(
    [
        pa.field("partition", pa.int32(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("timestamp", pa.timestamp("ms", tz="UTC")),
        pa.field("key", pa.string()),
    ]
)


@dataclass(frozen=True)
class FrameSchema:
    """The Arrow shape of a topic's records, derived from its Avro reader schema."""

    avro: dict[str, Any]
    nested: pa.Schema
    json_paths: tuple[tuple[str, ...], ...]

    @classmethod
    def from_avro(cls, avro: dict[str, Any], topic: str) -> FrameSchema:
        mapping = _ArrowMapping()
        struct, _ = _arrow_type(avro, mapping, None, ())
        if not isinstance(struct, pa.StructType):
            raise UnsupportedSchema(f"{topic} values are not Avro records")
        fields = [struct.field(i) for i in range(struct.num_fields)]
        fields.append(pa.field(KAFKA_COLUMN, KAFKA_STRUCT, nullable=False))
        meta = {
            b"cdpflow.topic": topic.encode(),
            b"cdpflow.avro_schema": json.dumps(avro, separators=(",", ":")).encode(),
        }
        return cls(avro, pa.schema(fields, metadata=meta), tuple(mapping.json_paths))

    @cached_property
    def flat(self) -> pa.Schema:
        """Dotted columns: what Parquet/CSV exports and DataFrames have."""
        return flatten_table(self.nested.empty_table()).schema

    @cached_property
    def json_columns(self) -> tuple[str, ...]:
        return tuple(".".join(p) for p in self.json_paths)


def flatten_table(table: pa.Table) -> pa.Table:
    """Struct columns to dotted columns, all levels (lists and maps stay nested)."""
    while any(pa.types.is_struct(f.type) for f in table.schema):
        table = table.flatten()
    return table


# --------------------------------------------------------------------------- decoding


@dataclass
class RawRecord:
    """A consumed record before decoding (only what a frame keeps of a Message)."""

    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    value: bytes | None


_UNPACK_DOUBLE: Final = struct.Struct("<d").unpack_from
_UNPACK_FLOAT: Final = struct.Struct("<f").unpack_from
_AVRO_PRIMITIVES: Final = frozenset(_PRIMITIVES)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """An unsigned LEB128 varint of two or more bytes (one-byte ones are inlined)."""
    n = 0
    shift = 0
    while True:
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, pos
        shift += 7


def _length(buf: bytes, pos: int) -> tuple[int, int]:
    """A string/bytes length of two or more bytes; a negative one is malformed data."""
    n, pos = _varint(buf, pos)
    if n & 1:
        raise ValueError("negative length")
    return n >> 1, pos


@dataclass(frozen=True)
class _Columns:
    """A compiled decoder: wire values in, one Python list per leaf column out."""

    decode: Callable[[Sequence[bytes | None], int], list[list[Any]]]
    leaves: dict[tuple[str, ...], int]
    #: Nullable records: the column telling whether the record is there.
    present: dict[tuple[str, ...], int]
    #: String leaves kept as raw UTF-8 slices: Arrow validates and converts them
    #: in bulk, several times faster than a ``bytes.decode`` per value.
    raw_strings: frozenset[int]


class _ColumnCompiler:
    """Writes the Python source of a decoder specialised to one record schema.

    Why generate code: fastavro interprets the schema for every field of every
    record and builds nested dicts that Arrow then takes apart again; for the
    65-field EnrichedEvent that is ~100 us a record. Straight-line code that
    appends each field to its column list is ~2.5x faster, and the columns go
    into Arrow without an intermediate dict. The source only ever contains
    column indexes and constants from a table, never names from the schema.
    """

    def __init__(self) -> None:
        self.consts: list[Any] = []
        self.named: dict[str, tuple[Any, str | None]] = {}
        self.ncols = 0
        self.ntmp = 0
        self.leaves: dict[tuple[str, ...], int] = {}
        self.present: dict[tuple[str, ...], int] = {}
        self.raw_strings: set[int] = set()

    def compile(self, schema: dict[str, Any]) -> _Columns:
        body: list[str] = []
        self._columns(schema, None, "        ", (), body)
        src = [
            "def decode(values, start):",
            f"    cols = [[] for _ in range({self.ncols})]",
            *(f"    a{i} = cols[{i}].append" for i in range(self.ncols)),
            "    for buf in values:",
            "        pos = start",
            *body,
            "        if pos != len(buf):",
            "            raise ValueError('trailing bytes after the Avro body')",
            "    return cols",
        ]
        scope: dict[str, Any] = {
            "_varint": _varint,
            "_length": _length,
            "_D": _UNPACK_DOUBLE,
            "_F": _UNPACK_FLOAT,
            "K": self.consts,
        }
        exec(compile("\n".join(src), "<cdpflow-avro-columns>", "exec"), scope)  # noqa: S102
        return _Columns(
            scope["decode"], dict(self.leaves), dict(self.present), frozenset(self.raw_strings)
        )

    # -- helpers --

    def _const(self, value: Any) -> str:
        self.consts.append(value)
        return f"K[{len(self.consts) - 1}]"

    def _tmp(self) -> str:
        self.ntmp += 1
        return f"t{self.ntmp}"

    def _col(self) -> int:
        self.ncols += 1
        return self.ncols - 1

    def _resolve(self, schema: Any, ns: str | None) -> tuple[Any, str | None]:
        """Named references to their definition; definitions registered on first sight."""
        if isinstance(schema, str) and schema not in _AVRO_PRIMITIVES:
            found = self.named.get(schema) or self.named.get(f"{ns}.{schema}")
            if found is None:
                raise UnsupportedSchema(f"unknown Avro type {schema!r}")
            return found
        if isinstance(schema, dict):
            kind = schema.get("type")
            if kind in ("record", "error", "enum", "fixed"):
                full = _full_name(schema, ns)
                entry = (schema, full.rpartition(".")[0] or None)
                self.named.setdefault(full, entry)
                return entry
            if kind in _AVRO_PRIMITIVES and "logicalType" not in schema:
                return kind, ns
            if schema.get("logicalType") == "decimal":
                raise UnsupportedSchema("decimal is decoded by fastavro")
        return schema, ns

    @staticmethod
    def _long(out: list[str], ind: str, target: str) -> None:
        out += [
            f"{ind}{target} = buf[pos]",
            f"{ind}if {target} < 128:",
            f"{ind}    pos += 1",
            f"{ind}else:",
            f"{ind}    {target}, pos = _varint(buf, pos)",
            f"{ind}{target} = ({target} >> 1) ^ -({target} & 1)",
        ]

    @staticmethod
    def _length(out: list[str], ind: str, target: str) -> None:
        """A string/bytes length: one even byte (< 64) is the common case."""
        out += [
            f"{ind}{target} = buf[pos]",
            f"{ind}if {target} < 128 and not {target} & 1:",
            f"{ind}    {target} >>= 1",
            f"{ind}    pos += 1",
            f"{ind}else:",
            f"{ind}    {target}, pos = _length(buf, pos)",
        ]

    # -- values (anything inside arrays and maps, and every leaf) --

    def _value(self, schema: Any, ns: str | None, ind: str, target: str, out: list[str]) -> None:
        schema, ns = self._resolve(schema, ns)
        if isinstance(schema, str):
            self._primitive(schema, ind, target, out)
        elif isinstance(schema, list):
            branch = self._tmp()
            out.append(f"{ind}{branch} = buf[pos]")
            out.append(f"{ind}pos += 1")
            for i, option in enumerate(schema):
                out.append(f"{ind}{'if' if i == 0 else 'elif'} {branch} == {2 * i}:")
                self._value(option, ns, ind + "    ", target, out)
            out.append(f"{ind}else:")
            out.append(f"{ind}    raise ValueError('union branch out of range')")
        elif schema["type"] in ("record", "error"):
            parts = []
            for f in schema["fields"]:
                tmp = self._tmp()
                self._value(f["type"], ns, ind, tmp, out)
                parts.append(f"{self._const(f['name'])}: {tmp}")
            out.append(f"{ind}{target} = {{{', '.join(parts)}}}")
        elif schema["type"] == "enum":
            index = self._tmp()
            self._long(out, ind, index)
            out.append(f"{ind}{target} = {self._const(tuple(schema['symbols']))}[{index}]")
        elif schema["type"] == "fixed":
            size = int(schema["size"])
            out.append(f"{ind}{target} = buf[pos:pos + {size}]")
            out.append(f"{ind}pos += {size}")
        elif schema["type"] in ("array", "map"):
            self._container(schema, ns, ind, target, out)
        else:
            self._value(schema["type"], ns, ind, target, out)

    def _primitive(
        self, kind: str, ind: str, target: str, out: list[str], raw: bool = False
    ) -> None:
        if kind == "null":
            out.append(f"{ind}{target} = None")
        elif kind == "boolean":
            out += [f"{ind}{target} = buf[pos] == 1", f"{ind}pos += 1"]
        elif kind in ("int", "long"):
            self._long(out, ind, target)
        elif kind in ("double", "float"):
            size, fn = (8, "_D") if kind == "double" else (4, "_F")
            out += [f"{ind}{target} = {fn}(buf, pos)[0]", f"{ind}pos += {size}"]
        else:  # string, bytes
            n = self._tmp()
            self._length(out, ind, n)
            decode = ".decode()" if kind == "string" and not raw else ""
            out += [f"{ind}{target} = buf[pos:pos + {n}]{decode}", f"{ind}pos += {n}"]

    def _container(
        self, schema: Any, ns: str | None, ind: str, target: str, out: list[str]
    ) -> None:
        is_map = schema["type"] == "map"
        count, size, item, key = self._tmp(), self._tmp(), self._tmp(), self._tmp()
        out.append(f"{ind}{target} = {{}}" if is_map else f"{ind}{target} = []")
        out.append(f"{ind}while True:")
        inner = ind + "    "
        self._long(out, inner, count)
        out += [f"{inner}if {count} == 0:", f"{inner}    break", f"{inner}if {count} < 0:"]
        self._long(out, inner + "    ", size)  # a negative count is followed by a byte size
        out += [f"{inner}    {count} = -{count}", f"{inner}for _ in range({count}):"]
        body = inner + "    "
        if is_map:
            self._primitive("string", body, key, out)
            self._value(schema["values"], ns, body, item, out)
            out.append(f"{body}{target}[{key}] = {item}")
        else:
            self._value(schema["items"], ns, body, item, out)
            out.append(f"{body}{target}.append({item})")

    # -- columns (records flattened to dotted leaves) --

    def _columns(
        self, schema: Any, ns: str | None, ind: str, path: tuple[str, ...], out: list[str]
    ) -> list[int]:
        """Emit the appends for ``schema`` at ``path``; return the columns created."""
        schema, ns = self._resolve(schema, ns)
        if isinstance(schema, dict) and schema.get("type") in ("record", "error"):
            created: list[int] = []
            for f in schema["fields"]:
                created += self._columns(f["type"], ns, ind, (*path, f["name"]), out)
            return created
        if isinstance(schema, list) and len(schema) == 2 and "null" in schema:
            return self._nullable(schema, ns, ind, path, out)
        col = self._leaf(schema, ns, ind, path, out)
        return [col]

    def _leaf(
        self, schema: Any, ns: str | None, ind: str, path: tuple[str, ...], out: list[str]
    ) -> int:
        col = self._col()
        self.leaves[path] = col
        tmp = self._tmp()
        if schema == "string":
            self.raw_strings.add(col)
            self._primitive("string", ind, tmp, out, raw=True)
        else:
            self._value(schema, ns, ind, tmp, out)
        out.append(f"{ind}a{col}({tmp})")
        return col

    def _nullable(
        self, schema: list[Any], ns: str | None, ind: str, path: tuple[str, ...], out: list[str]
    ) -> list[int]:
        null_byte = 2 * schema.index("null")
        value_byte = 2 * (1 - schema.index("null"))
        other, other_ns = self._resolve(schema[1 - schema.index("null")], ns)
        is_record = isinstance(other, dict) and other.get("type") in ("record", "error")
        created: list[int] = []
        branch: list[str] = []
        if is_record:
            flag = self._col()
            self.present[path] = flag
            created.append(flag)
            branch.append(f"{ind}    a{flag}(True)")
            created += self._columns(other, other_ns, ind + "    ", path, branch)
        else:
            created.append(self._leaf(other, other_ns, ind + "    ", path, branch))
        flags = set(self.present.values())
        branch_byte = self._tmp()
        out += [
            f"{ind}{branch_byte} = buf[pos]",
            f"{ind}pos += 1",
            f"{ind}if {branch_byte} == {null_byte}:",
        ]
        out += [f"{ind}    a{c}({'False' if c in flags else 'None'})" for c in created]
        out += [f"{ind}elif {branch_byte} == {value_byte}:", *branch]
        out += [f"{ind}else:", f"{ind}    raise ValueError('union branch out of range')"]
        return created


def _assemble(
    struct_type: pa.StructType,
    cols: list[list[Any]],
    compiled: _Columns,
    path: tuple[str, ...] = (),
) -> list[pa.Array]:
    """Column lists to the Arrow arrays of ``struct_type``'s fields, nulls included."""
    arrays = []
    for f in struct_type:
        here = (*path, f.name)
        if pa.types.is_struct(f.type):
            children = _assemble(f.type, cols, compiled, here)
            flag = compiled.present.get(here)
            mask = None if flag is None else pc.invert(pa.array(cols[flag], pa.bool_()))
            arrays.append(pa.StructArray.from_arrays(children, fields=list(f.type), mask=mask))
        else:
            col = compiled.leaves[here]
            if col in compiled.raw_strings:
                arrays.append(pa.array(cols[col], pa.binary()).cast(f.type))
            else:
                arrays.append(pa.array(cols[col], type=f.type))
    return arrays


DecodeFailure = tuple[int, DecodeError]


class _Decoder:
    """Wire-format values to Arrow, resolved into the reader schema; per-id work cached."""

    def __init__(self, registry: SchemaRegistry, reader: dict[str, Any], arrow: pa.Schema) -> None:
        self.registry = registry
        self.reader_parsed: Any = parse_schema(_strip_plain_logical(reader))
        self.reader_canonical = to_parsing_canonical_form(self.reader_parsed)
        self.arrow = arrow
        self.struct = pa.struct(list(arrow))
        self._pairs: dict[int, tuple[Any, Any, _Columns | None]] = {}

    def _pair(self, schema_id: int) -> tuple[Any, Any, _Columns | None]:
        pair = self._pairs.get(schema_id)
        if pair is None:
            # Through the shared registry cache first: typed errors (unknown id, outage).
            if self.registry.writer_schema(schema_id).get("name") != self.reader_parsed["name"]:
                raise SchemaMismatch(
                    f"schema id {schema_id} is not {self.reader_parsed['name']}: "
                    "a record of another type was written to this topic"
                )
            writer = json.loads(self.registry.client.get_schema(schema_id).schema_str or "{}")
            plain = _strip_plain_logical(writer)
            writer_parsed = parse_schema(plain)
            compiled = None
            if to_parsing_canonical_form(writer_parsed) == self.reader_canonical:
                try:
                    compiled = _ColumnCompiler().compile(plain)
                except UnsupportedSchema:
                    compiled = None
                pair = (writer_parsed, None, compiled)  # same schema: no resolution
            else:
                pair = (writer_parsed, self.reader_parsed, None)
            self._pairs[schema_id] = pair
        return pair

    def record(self, value: bytes | None) -> dict[str, Any]:
        """One value as a dict (timestamps as plain numbers), with typed errors."""
        schema_id = _schema_id(value)
        writer, reader, _ = self._pair(schema_id)
        assert value is not None
        buf = io.BytesIO(value)
        buf.seek(HEADER.size)
        try:
            record = schemaless_reader(buf, writer, reader)
        except Exception as exc:
            raise MalformedAvro(f"Avro body does not match schema id {schema_id}: {exc}") from exc
        if buf.tell() != len(value):
            raise MalformedAvro(f"trailing bytes after the Avro body (schema id {schema_id})")
        if not isinstance(record, dict):
            raise SchemaMismatch(f"schema id {schema_id} is not a record schema")
        return record

    def table(
        self, schema_id: int | None, values: Sequence[bytes | None]
    ) -> tuple[pa.Table, list[DecodeFailure]]:
        """Values sharing one schema id; failures are (index in ``values``, error)."""
        compiled = None
        if schema_id is not None:
            try:
                compiled = self._pair(schema_id)[2]
            except DecodeError as exc:
                return self.arrow.empty_table(), [(i, exc) for i in range(len(values))]
        if compiled is not None:
            try:
                arrays = _assemble(self.struct, compiled.decode(values, HEADER.size), compiled)
            except (IndexError, ValueError, struct.error, pa.ArrowInvalid):
                pass  # a malformed value: the per-record path below says which
            else:
                return pa.Table.from_arrays(arrays, schema=self.arrow), []
        decoded: list[dict[str, Any]] = []
        failures: list[DecodeFailure] = []
        for i, value in enumerate(values):
            try:
                decoded.append(self.record(value))
            except DecodeError as exc:
                failures.append((i, exc))
        struct_array = pa.array(decoded, type=self.struct)
        return pa.Table.from_arrays(struct_array.flatten(), schema=self.arrow), failures


def _schema_id(value: bytes | None) -> int:
    if value is None or len(value) < HEADER.size + 1:
        raise NotWireFormat("value is empty or shorter than the 5-byte wire-format header")
    magic, schema_id = HEADER.unpack_from(value)
    if magic != MAGIC_BYTE:
        raise NotWireFormat(f"magic byte is {magic}, expected 0 (Confluent wire format)")
    return int(schema_id)


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class PartitionRange:
    partition: int
    start: int
    end: int  #: exclusive

    @property
    def size(self) -> int:
        return max(0, self.end - self.start)


@dataclass(frozen=True)
class ReadPlan:
    """Which offsets a read covers, fixed before the first record is fetched."""

    topic: str
    ranges: tuple[PartitionRange, ...]
    since_ms: int | None
    until_ms: int | None
    last: int | None

    @property
    def max_records(self) -> int:
        """Upper bound of records to read (compaction and control records make it less)."""
        return sum(r.size for r in self.ranges)

    @property
    def expected_records(self) -> int:
        return min(self.max_records, self.last) if self.last is not None else self.max_records


def _consumer(settings: Settings, **extra: Any) -> Consumer:
    """An assign-only consumer: a fresh group id that never joins, never commits."""
    return Consumer(
        {
            **settings.librdkafka_common(),
            "group.id": f"cdpflow-analytics-{uuid.uuid4().hex}",
            "client.id": "cdpflow-analytics",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 100,
            "queued.max.messages.kbytes": 65536,
            **extra,
        }
    )


def plan_read(
    topic: str,
    *,
    since: TimeArg | None = None,
    until: TimeArg | None = None,
    last: int | None = None,
    partitions: Iterable[int] | None = None,
    settings: Settings | None = None,
    timeout_s: float = 15.0,
) -> ReadPlan:
    """Resolve a time range (or "last N") to per-partition offsets, right now."""
    settings = settings or get_settings()
    if last is not None and (since is not None or until is not None):
        raise AnalyticsError("give either a time range (since/until) or last, not both")
    if last is not None and last < 0:
        raise AnalyticsError("last must be >= 0")
    since_ms = to_epoch_ms(since) if since is not None else None
    until_ms = to_epoch_ms(until) if until is not None else None
    if since_ms is not None and until_ms is not None and until_ms < since_ms:
        raise AnalyticsError("until is before since")
    consumer = _consumer(settings)
    try:
        md = consumer.list_topics(topic, timeout=timeout_s)
        meta = md.topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise AnalyticsError(f"topic {topic!r} does not exist")
        wanted = sorted(meta.partitions if partitions is None else set(partitions))
        unknown = set(wanted) - set(meta.partitions)
        if unknown:
            raise AnalyticsError(f"{topic} has no partition(s) {sorted(unknown)}")
        marks = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
            for p in wanted
        }

        def at(ms: int) -> dict[int, int]:
            found = consumer.offsets_for_times(
                [TopicPartition(topic, p, ms) for p in wanted], timeout=timeout_s
            )
            out = {}
            for tp in found:
                lo, hi = marks[tp.partition]
                # -1: no record at or after that time, i.e. the end of the partition.
                out[tp.partition] = hi if tp.offset < 0 else min(max(tp.offset, lo), hi)
            return out

        starts = at(since_ms) if since_ms is not None else {p: marks[p][0] for p in wanted}
        ends = at(until_ms) if until_ms is not None else {p: marks[p][1] for p in wanted}
        if last is not None:
            starts = {p: max(marks[p][0], marks[p][1] - last) for p in wanted}
        ranges = tuple(PartitionRange(p, starts[p], max(starts[p], ends[p])) for p in wanted)
    finally:
        consumer.close()
    return ReadPlan(topic, ranges, since_ms, until_ms, last)


# --------------------------------------------------------------------------- reading


def _reader_schema(topic: str, registry: SchemaRegistry) -> dict[str, Any] | None:
    """This code's schema for a cdpflow topic, else the registry's latest for the subject."""
    full_name = schemas.TOPIC_SCHEMAS.get(topic)
    if full_name is not None:
        return schemas.schema_dict(full_name)
    try:
        latest = registry.client.get_latest_version(topics.subject_for(topic))
    except SchemaRegistryError as exc:
        if exc.http_status_code == 404:
            return None
        raise
    text = latest.schema.schema_str
    loaded = json.loads(text) if text else None
    return loaded if isinstance(loaded, dict) else None


class TopicScan:
    """One bounded read of a topic: its plan, its Arrow schema and its chunks.

    Create it, look at :attr:`plan` (e.g. for a progress total), then iterate
    :meth:`tables`, :meth:`dataframes` or :meth:`records` once.
    """

    def __init__(
        self,
        topic: str,
        *,
        since: TimeArg | None = None,
        until: TimeArg | None = None,
        last: int | None = None,
        partitions: Iterable[int] | None = None,
        settings: Settings | None = None,
        registry: SchemaRegistry | None = None,
        errors: Errors = "raise",
        idle_timeout_s: float = 30.0,
    ) -> None:
        if errors not in ("raise", "skip"):
            raise ValueError("errors must be 'raise' or 'skip'")
        self.settings = settings or get_settings()
        self.registry = registry or SchemaRegistry(self.settings.schema_registry_url)
        self.topic = topic
        self.errors: Errors = errors
        self.idle_timeout_s = idle_timeout_s
        self.plan = plan_read(
            topic,
            since=since,
            until=until,
            last=last,
            partitions=partitions,
            settings=self.settings,
        )
        avro = _reader_schema(topic, self.registry)
        self._schema = FrameSchema.from_avro(avro, topic) if avro is not None else None
        self._decoder: _Decoder | None = None
        if avro is not None and self._schema is not None:
            nested = self._schema.nested
            values = pa.schema(list(nested)[:-1], metadata=nested.metadata)
            self._decoder = _Decoder(self.registry, avro, values)
        #: Offsets of the plan consumed (kept or filtered by timestamp), bytes of their
        #: keys and values, and undecodable records skipped (``errors="skip"``).
        self.records_read = 0
        self.bytes_read = 0
        self.skipped = 0

    @property
    def schema(self) -> FrameSchema:
        if self._schema is None:
            raise AnalyticsError(
                f"no schema for {self.topic}: it is not a cdpflow topic and the registry has "
                f"no subject {topics.subject_for(self.topic)!r}"
            )
        return self._schema

    # -- raw records --

    def raw_batches(
        self,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        progress: Progress | None = None,
        match: Callable[[RawRecord], bool] | None = None,
    ) -> Iterator[list[RawRecord]]:
        """Consumed records in chunks, each partition in offset order.

        ``match`` is a cheap filter on the raw record (key, value bytes) applied
        before anything is decoded.
        """
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        if self.plan.last is not None:
            yield from self._last_batches(chunk_size, progress, match)
            return
        batch: list[RawRecord] = []
        for msgs in self._consume(progress):
            for rec in msgs:
                if match is not None and not match(rec):
                    continue
                batch.append(rec)
                if len(batch) >= chunk_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def _last_batches(
        self,
        chunk_size: int,
        progress: Progress | None,
        match: Callable[[RawRecord], bool] | None,
    ) -> Iterator[list[RawRecord]]:
        """The N newest by record timestamp across partitions, oldest first."""
        n = self.plan.last or 0
        heap: list[tuple[int, int, int, RawRecord]] = []
        for msgs in self._consume(progress):
            for rec in msgs:
                if match is not None and not match(rec):
                    continue
                item = (rec.timestamp_ms or 0, rec.partition, rec.offset, rec)
                if len(heap) < n:
                    heapq.heappush(heap, item)
                elif item[:3] > heap[0][:3]:
                    heapq.heapreplace(heap, item)
        ordered = [item[3] for item in sorted(heap, key=lambda i: i[:3])]
        for i in range(0, len(ordered), chunk_size):
            yield ordered[i : i + chunk_size]

    def _consume(self, progress: Progress | None) -> Iterator[list[RawRecord]]:
        plan = self.plan
        todo = {r.partition: r for r in plan.ranges if r.size > 0}
        if not todo:
            return
        since, until = plan.since_ms, plan.until_ms
        consumer = _consumer(self.settings)
        try:
            consumer.assign([TopicPartition(plan.topic, p, r.start) for p, r in todo.items()])
            last_progress = time.monotonic()
            while todo:
                msgs = consumer.consume(10_000, 0.5)
                out: list[RawRecord] = []
                consumed = nbytes = 0  # offsets of the plan read, kept or not
                finished: list[int] = []
                for msg in msgs:
                    p = msg.partition()
                    rng = todo.get(p) if p is not None else None
                    if p is None or rng is None:
                        continue
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            finished.append(p)  # at the high watermark, which is >= our end
                            continue
                        raise AnalyticsError(f"reading {plan.topic}[{p}]: {err}")
                    offset = msg.offset() or 0
                    if offset >= rng.end:
                        finished.append(p)
                        continue
                    if offset == rng.end - 1:
                        finished.append(p)
                    value, key = msg.value(), msg.key()
                    consumed += 1
                    nbytes += len(value or b"") + len(key or b"")
                    ts_type, ts = msg.timestamp()
                    ts_ms = ts if ts_type != 0 else None
                    if ts_ms is not None and (
                        (since is not None and ts_ms < since)
                        or (until is not None and ts_ms >= until)
                    ):
                        continue
                    out.append(RawRecord(p, offset, ts_ms, key, value))
                for p in finished:
                    if todo.pop(p, None) is not None:
                        consumer.pause([TopicPartition(plan.topic, p)])
                if msgs:
                    last_progress = time.monotonic()
                elif time.monotonic() - last_progress > self.idle_timeout_s:
                    raise ReadTimeout(
                        f"{plan.topic}: no progress for {self.idle_timeout_s:.0f}s on "
                        f"partition(s) {sorted(todo)}; the broker may be unreachable"
                    )
                self.records_read += consumed
                self.bytes_read += nbytes
                if progress is not None and consumed:
                    progress(consumed, nbytes)
                if out:
                    yield out
        finally:
            consumer.close()

    # -- decoded --

    def _require_decoder(self) -> _Decoder:
        if self._decoder is None:
            raise AnalyticsError(
                f"{self.topic} has records but no schema under "
                f"{topics.subject_for(self.topic)!r}; cannot decode them"
            )
        return self._decoder

    def _failed(self, rec: RawRecord, exc: DecodeError) -> None:
        if self.errors == "raise":
            raise AnalyticsError(
                f"{self.topic}[{rec.partition}]@{rec.offset}: {exc.reason_code}: {exc} "
                "(errors='skip' reads past undecodable records)"
            ) from exc
        self.skipped += 1

    def nested_table(self, batch: Sequence[RawRecord]) -> pa.Table:
        """Decode a chunk into an Arrow table of the topic's nested schema (+ ``kafka``)."""
        decoder = self._require_decoder()
        by_id: dict[int | None, list[int]] = {}
        for i, rec in enumerate(batch):
            try:
                schema_id: int | None = _schema_id(rec.value)
            except DecodeError:
                schema_id = None
            by_id.setdefault(schema_id, []).append(i)
        parts: list[pa.Table] = []
        positions: list[int] = []
        for schema_id, indexes in by_id.items():
            if schema_id is None:
                for i in indexes:
                    try:
                        _schema_id(batch[i].value)
                    except DecodeError as exc:
                        self._failed(batch[i], exc)
                continue
            table, failures = decoder.table(schema_id, [batch[i].value for i in indexes])
            failed = {j for j, _ in failures}
            for j, error in failures:
                self._failed(batch[indexes[j]], error)
            parts.append(table)
            positions += [i for j, i in enumerate(indexes) if j not in failed]
        values = pa.concat_tables(parts) if parts else decoder.arrow.empty_table()
        if positions != sorted(positions):  # several schema ids: back to consumption order
            order = sorted(range(len(positions)), key=positions.__getitem__)
            values = values.take(pa.array(order, pa.int64()))
            positions = sorted(positions)
        kept = [batch[i] for i in positions]
        kafka = pa.StructArray.from_arrays(
            [
                pa.array([r.partition for r in kept], pa.int32()),
                pa.array([r.offset for r in kept], pa.int64()),
                pa.array([r.timestamp_ms for r in kept], pa.timestamp("ms", tz="UTC")),
                pa.array(
                    [None if r.key is None else r.key.decode("utf-8", "replace") for r in kept],
                    pa.string(),
                ),
            ],
            fields=list(KAFKA_STRUCT),
        )
        return pa.Table.from_arrays([*values.columns, kafka], schema=self.schema.nested)

    def nested_tables(
        self, chunk_size: int = DEFAULT_CHUNK_SIZE, progress: Progress | None = None
    ) -> Iterator[pa.Table]:
        """Arrow tables in the Avro shape (records as structs), JSON fields as text."""
        for batch in self.raw_batches(chunk_size, progress):
            yield self.nested_table(batch)

    def tables(
        self, chunk_size: int = DEFAULT_CHUNK_SIZE, progress: Progress | None = None
    ) -> Iterator[pa.Table]:
        """Flat Arrow tables (dotted columns, JSON fields as text): the export shape."""
        for table in self.nested_tables(chunk_size, progress):
            yield flatten_table(table)

    def dataframes(
        self,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        *,
        flatten: Sequence[str] = (),
        parse_json: bool = True,
        progress: Progress | None = None,
    ) -> Iterator[pd.DataFrame]:
        columns = self._json_columns_to_flatten(flatten, parse_json)
        for table in self.tables(chunk_size, progress):
            yield self.to_frame(table, flatten=columns, parse_json=parse_json)

    def records(
        self,
        chunk_size: int = 5_000,
        match: Callable[[RawRecord], bool] | None = None,
        progress: Progress | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Decoded records as dicts (Avro shape, timestamps as epoch numbers) + ``kafka``.

        For lookups that keep a few records of many: ``match`` skips the rest
        before they cost a decode.
        """
        decoder = self._require_decoder()
        for batch in self.raw_batches(chunk_size, progress, match):
            for raw in batch:
                try:
                    rec = decoder.record(raw.value)
                except DecodeError as exc:
                    self._failed(raw, exc)
                    continue
                rec[KAFKA_COLUMN] = {
                    "partition": raw.partition,
                    "offset": raw.offset,
                    "timestamp": raw.timestamp_ms,
                    "key": None if raw.key is None else raw.key.decode("utf-8", "replace"),
                }
                yield rec

    # -- frames --

    def _json_columns_to_flatten(self, flatten: Sequence[str], parse_json: bool) -> list[str]:
        if not flatten:
            return []
        if not parse_json:
            raise AnalyticsError("flatten needs parse_json=True")
        json_columns = self.schema.json_columns
        chosen: list[str] = []
        for name in flatten:
            matches = [c for c in json_columns if c == name or c.endswith("." + name)]
            if not matches:
                raise AnalyticsError(
                    f"{name!r} is not a JSON field of {self.topic}; "
                    f"JSON fields: {', '.join(json_columns) or 'none'}"
                )
            chosen.extend(m for m in matches if m not in chosen)
        return chosen

    def to_frame(
        self, table: pa.Table, *, flatten: Sequence[str] = (), parse_json: bool = True
    ) -> pd.DataFrame:
        """A flat Arrow chunk as a DataFrame, JSON text fields parsed (and spread)."""
        json_columns = [c for c in self.schema.json_columns if c in table.column_names]
        parsed = {}
        if parse_json:
            for column in json_columns:
                parsed[column] = [_parse_json_text(v) for v in table.column(column).to_pylist()]
            table = table.drop_columns(json_columns)
        frame = arrow_to_pandas(table)
        if parsed:
            # Put the parsed columns back where they were, as object columns.
            frame = frame.assign(**{c: pd.Series(v, dtype=object) for c, v in parsed.items()})
            frame = frame[[n for n in self.schema.flat.names if n in frame.columns]]
        for column in flatten:
            frame = flatten_json_column(frame, column)
        return frame


# --------------------------------------------------------------------------- pandas


def _pandas_type(dtype: pa.DataType) -> Any:
    """Nullable pandas dtypes, so a chunk with or without nulls has the same dtypes."""
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return pd.StringDtype("pyarrow")
    if pa.types.is_boolean(dtype):
        return pd.BooleanDtype()
    if pa.types.is_int32(dtype):
        return pd.Int32Dtype()
    if pa.types.is_int64(dtype):
        return pd.Int64Dtype()
    return None


def arrow_to_pandas(table: pa.Table) -> pd.DataFrame:
    """Arrow to pandas with cdpflow's dtypes; maps become dicts, lists Python lists."""
    frame: pd.DataFrame = table.to_pandas(types_mapper=_pandas_type, maps_as_pydicts="strict")
    for f in table.schema:
        if pa.types.is_list(f.type) or pa.types.is_large_list(f.type):
            frame[f.name] = pd.Series(table.column(f.name).to_pylist(), dtype=object)
    return frame


def loads_json(text: str) -> Any:
    """JSON text to Python; integers beyond 64 bits (which orjson refuses) stay exact."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _parse_json_text(text: str | None) -> Any:
    if text is None:
        return None
    if text == "{}":
        return {}  # the common case; a fresh dict per row, callers may mutate it
    return loads_json(text)


def flatten_json_column(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Spread a column of dicts into ``column.key`` (nested: ``column.a.b``) columns."""
    values = [v if isinstance(v, dict) else {} for v in frame[column]]
    spread = pd.json_normalize(values, sep=".")
    spread.columns = [f"{column}.{c}" for c in spread.columns]
    spread.index = frame.index
    position = frame.columns.get_loc(column)
    assert isinstance(position, int)
    left = frame.iloc[:, :position]
    right = frame.iloc[:, position + 1 :]
    return pd.concat([left, spread, right], axis=1)


# --------------------------------------------------------------------------- public API


def iter_dataframes(
    topic: str,
    *,
    since: TimeArg | None = None,
    until: TimeArg | None = None,
    last: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    flatten: Sequence[str] = (),
    parse_json: bool = True,
    errors: Errors = "raise",
    settings: Settings | None = None,
    idle_timeout_s: float = 30.0,
) -> Iterator[pd.DataFrame]:
    """Read a topic range as DataFrames of at most ``chunk_size`` rows.

    Memory stays bounded by one chunk (plus librdkafka's fetch queue, capped at
    64 MB), so a month of events can be aggregated chunk by chunk. Chunks follow
    consumption order: each partition in offset order, partitions interleaved.
    With ``last`` the rows are the ``last`` newest records by record timestamp,
    oldest first. Columns and dtypes are the same in every chunk, except the
    ones ``flatten`` creates (they follow the JSON keys present in that chunk).
    """
    scan = TopicScan(
        topic,
        since=since,
        until=until,
        last=last,
        settings=settings,
        errors=errors,
        idle_timeout_s=idle_timeout_s,
    )
    yield from scan.dataframes(chunk_size, flatten=flatten, parse_json=parse_json)


def read_topic(
    topic: str,
    *,
    since: TimeArg | None = None,
    until: TimeArg | None = None,
    last: int | None = None,
    flatten: Sequence[str] = (),
    parse_json: bool = True,
    errors: Errors = "raise",
    settings: Settings | None = None,
    idle_timeout_s: float = 30.0,
) -> pd.DataFrame:
    """Read a topic range into one DataFrame, rows ordered by record timestamp.

    ``since`` is inclusive and ``until`` exclusive, both on the Kafka record
    timestamp (see the module doc). Without ``since`` the read starts at the
    oldest retained record; without ``until`` it ends at the high watermark of
    the moment of the call. ``flatten`` names JSON fields to spread into
    columns, by full column name or its last part (``"properties"`` matches
    ``event.properties`` and yields ``event.properties.price``...).
    """
    scan = TopicScan(
        topic,
        since=since,
        until=until,
        last=last,
        settings=settings,
        errors=errors,
        idle_timeout_s=idle_timeout_s,
    )
    chunks = list(scan.dataframes(DEFAULT_CHUNK_SIZE, flatten=flatten, parse_json=parse_json))
    if not chunks:
        if scan._schema is None:
            return pd.DataFrame()
        return scan.to_frame(
            scan.schema.flat.empty_table(),
            flatten=scan._json_columns_to_flatten(flatten, parse_json),
            parse_json=parse_json,
        )
    frame = chunks[0] if len(chunks) == 1 else pd.concat(chunks, ignore_index=True)
    order = ["kafka.timestamp", "kafka.partition", "kafka.offset"]
    return frame.sort_values(order, kind="stable", ignore_index=True)


def arrow_schema(topic: str, settings: Settings | None = None) -> pa.Schema:
    """The flat Arrow schema a topic's DataFrames / Parquet files have."""
    settings = settings or get_settings()
    avro = _reader_schema(topic, SchemaRegistry(settings.schema_registry_url))
    if avro is None:
        raise AnalyticsError(f"no schema for {topic}")
    return FrameSchema.from_avro(avro, topic).flat


def jsonable(value: Any) -> Any:
    """orjson ``default`` for export: bytes as base64, pandas NA as null."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if value is pd.NA:
        return None
    with contextlib.suppress(AttributeError):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


__all__ = [
    "ANALYTICS_TOPICS",
    "DEFAULT_CHUNK_SIZE",
    "AnalyticsError",
    "FrameSchema",
    "PartitionRange",
    "RawRecord",
    "ReadPlan",
    "ReadTimeout",
    "TopicScan",
    "UnsupportedSchema",
    "arrow_schema",
    "arrow_to_pandas",
    "flatten_json_column",
    "flatten_table",
    "iter_dataframes",
    "jsonable",
    "loads_json",
    "plan_read",
    "read_topic",
    "to_epoch_ms",
]
