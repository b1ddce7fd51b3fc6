"""Avro in the Confluent wire format (magic 0, 4-byte big-endian schema id, Avro binary).

Encoding and decoding run on fastavro with schemas cached by id: the registry is
asked once per schema, never per event. Decode failures are typed, each with the
DLQ reason code it maps to, so callers dead-letter without string matching.
"""

from __future__ import annotations

import io
import json
import struct
import threading
from collections.abc import Callable
from typing import Any

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro._read_common import SchemaResolutionError
from fastavro.schema import to_parsing_canonical_form

from streams import schemas
from streams.topics import subject_for

MAGIC_BYTE = 0
HEADER = struct.Struct(">bI")
DEFAULT_COMPATIBILITY = "BACKWARD"


class DecodeError(Exception):
    """An input that can never decode, whatever we retry. Dead-letter it."""

    reason_code = "DECODE_FAILED"


class NotWireFormat(DecodeError):
    reason_code = "NOT_WIRE_FORMAT"


class UnknownSchemaId(DecodeError):
    reason_code = "UNKNOWN_SCHEMA_ID"


class SchemaMismatch(DecodeError):
    reason_code = "SCHEMA_MISMATCH"


class MalformedAvro(DecodeError):
    reason_code = "MALFORMED_AVRO"


class RegistryUnavailable(RuntimeError):
    """The registry could not be asked (network, 5xx). Transient: retry, never dead-letter."""


class IncompatibleSchema(ValueError):
    """The registry refused a schema under the subject's compatibility rule."""


class SchemaRegistry:
    """Registry access with per-id and per-subject caches (thread-safe)."""

    def __init__(self, url: str, client: SchemaRegistryClient | None = None) -> None:
        self.url = url
        self.client = client or SchemaRegistryClient({"url": url})
        self._by_id: dict[int, Any] = {}
        self._lock = threading.Lock()

    def register(
        self, subject: str, schema_text: str, compatibility: str | None = DEFAULT_COMPATIBILITY
    ) -> int:
        """Register (idempotent) and return the schema id; set the subject's compatibility first."""
        try:
            if compatibility is not None:
                self._ensure_compatibility(subject, compatibility)
            return int(self.client.register_schema(subject, Schema(schema_text, "AVRO")))
        except SchemaRegistryError as exc:
            if exc.http_status_code == 409:
                raise IncompatibleSchema(
                    f"schema for subject {subject!r} is not {compatibility}-compatible with the "
                    f"registered versions: {exc.error_message}"
                ) from exc
            if exc.http_status_code in (422, 400):
                raise IncompatibleSchema(
                    f"registry rejected schema for {subject!r}: {exc.error_message}"
                ) from exc
            raise RegistryUnavailable(f"registry error for {subject!r}: {exc}") from exc
        except (OSError, ConnectionError) as exc:
            raise RegistryUnavailable(f"schema registry {self.url} unreachable: {exc}") from exc

    def _ensure_compatibility(self, subject: str, level: str) -> None:
        try:
            current = self.client.get_compatibility(subject)
        except SchemaRegistryError:
            current = None
        if str(current).upper() != level:
            self.client.set_compatibility(subject_name=subject, level=level)

    def writer_schema(self, schema_id: int) -> Any:
        """The parsed writer schema for an id, fetched once."""
        cached = self._by_id.get(schema_id)
        if cached is not None:
            return cached
        try:
            schema = self.client.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                raise UnknownSchemaId(f"schema id {schema_id} is not in the registry") from exc
            raise RegistryUnavailable(f"registry error for id {schema_id}: {exc}") from exc
        except Exception as exc:
            raise RegistryUnavailable(f"schema registry {self.url} unreachable: {exc}") from exc
        if schema.schema_type not in (None, "AVRO") or schema.schema_str is None:
            raise SchemaMismatch(f"schema id {schema_id} is {schema.schema_type}, not AVRO")
        parsed = parse_schema(json.loads(schema.schema_str))
        with self._lock:
            self._by_id[schema_id] = parsed
        return parsed


Encoder = Callable[[dict[str, Any]], bytes]


class AvroSerde:
    """Encode a topic's records and decode any record, through one registry cache."""

    def __init__(self, registry: SchemaRegistry) -> None:
        self.registry = registry
        self._topic_ids: dict[str, int] = {}
        self._readers: dict[tuple[int, str | None], tuple[Any, Any]] = {}

    @classmethod
    def from_url(cls, url: str) -> AvroSerde:
        return cls(SchemaRegistry(url))

    def schema_id(self, topic: str) -> int:
        """Register the topic's current schema once; cache its id."""
        sid = self._topic_ids.get(topic)
        if sid is None:
            full_name = schemas.TOPIC_SCHEMAS[topic]
            sid = self.registry.register(subject_for(topic), schemas.schema_text(full_name))
            self._topic_ids[topic] = sid
        return sid

    def encoder(self, topic: str) -> Encoder:
        """A function dict -> wire-format bytes for this topic's schema."""
        header = HEADER.pack(MAGIC_BYTE, self.schema_id(topic))
        parsed = schemas.parsed(schemas.TOPIC_SCHEMAS[topic])

        def encode(record: dict[str, Any]) -> bytes:
            buf = io.BytesIO()
            buf.write(header)
            schemaless_writer(buf, parsed, record)
            return buf.getvalue()

        return encode

    def encode(self, topic: str, record: dict[str, Any]) -> bytes:
        return self.encoder(topic)(record)

    def decode(self, data: bytes | None, reader: str | None = None) -> tuple[int, dict[str, Any]]:
        """Decode wire-format bytes; with ``reader`` (a schema full name), resolve into it.

        Resolution is what lets old records decode with the current schema (and
        refuses records of an unrelated type written to the wrong topic).
        """
        if data is None or len(data) < HEADER.size + 1:
            raise NotWireFormat("value is empty or shorter than the 5-byte wire-format header")
        magic, schema_id = HEADER.unpack_from(data)
        if magic != MAGIC_BYTE:
            raise NotWireFormat(f"magic byte is {magic}, expected 0 (Confluent wire format)")
        writer, reader_parsed = self._reader_pair(schema_id, reader)
        buf = io.BytesIO(data)
        buf.seek(HEADER.size)
        try:
            record = schemaless_reader(buf, writer, reader_parsed)
        except SchemaResolutionError as exc:
            raise SchemaMismatch(
                f"schema id {schema_id} cannot be read as {reader}: {exc}"
            ) from exc
        except Exception as exc:
            raise MalformedAvro(f"Avro body does not match schema id {schema_id}: {exc}") from exc
        if buf.tell() != len(data):
            raise MalformedAvro(
                f"{len(data) - buf.tell()} trailing bytes after the Avro body "
                f"(schema id {schema_id})"
            )
        if not isinstance(record, dict):
            raise SchemaMismatch(f"schema id {schema_id} is not a record schema")
        return schema_id, record

    def writes_as_reader(self, schema_id: int, reader: str) -> bool:
        """True when records of ``schema_id`` are encoded exactly as ``reader`` encodes them.

        Same parsing canonical form means the same binary layout, so the Avro body
        of such a record can be embedded verbatim where ``reader`` is expected (see
        :mod:`streams.profiles.splice`). Call after a successful :meth:`decode`.
        """
        return self._reader_pair(schema_id, reader)[1] is None

    def _reader_pair(self, schema_id: int, reader: str | None) -> tuple[Any, Any]:
        key = (schema_id, reader)
        pair = self._readers.get(key)
        if pair is None:
            writer = self.registry.writer_schema(schema_id)
            reader_parsed = None
            if reader is not None:
                reader_parsed = schemas.parsed(reader)
                if writer.get("name") != reader_parsed.get("name"):
                    raise SchemaMismatch(
                        f"schema id {schema_id} is {writer.get('name')}, expected {reader}"
                    )
                if to_parsing_canonical_form(writer) == to_parsing_canonical_form(reader_parsed):
                    reader_parsed = None  # same schema: skip per-record resolution
            pair = (writer, reader_parsed)
            self._readers[key] = pair
        return pair
