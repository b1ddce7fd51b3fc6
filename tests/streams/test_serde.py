"""Wire-format serde against the real registry, and interop with Confluent's own serde."""

from __future__ import annotations

import json
import struct

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient, topic_subject_name_strategy
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from streams import schemas, topics
from streams.events import from_segment, now_ms
from streams.serde import (
    AvroSerde,
    IncompatibleSchema,
    MalformedAvro,
    NotWireFormat,
    SchemaMismatch,
    UnknownSchemaId,
)
from tests.conftest import StackEndpoints
from tests.kafka_helpers import confluent_deserializer

ARBITRARY = {
    "nested": {"a": [1, 2.5, None, True, False, {"deep": ["x", {"y": -0.0}]}]},
    "int": 3,
    "float": 3.0,
    "big": 2**63 + 5,
    "unicode": "naïve ☕",
    "empty": {},
    "list": [],
    "null": None,
}


def _event(**overrides: object) -> dict[str, object]:
    msg = {
        "type": "track",
        "userId": "u-serde",
        "event": "Order Completed",
        "properties": ARBITRARY,
        "context": {"ip": "10.0.0.1", "traits": {"email": "x@example.com"}, "custom": [1, 2]},
    }
    msg.update(overrides)
    return from_segment(msg, received_at_ms=now_ms())


def test_round_trip_keeps_arbitrary_json_exactly(serde: AvroSerde) -> None:
    record = _event()
    _, decoded = serde.decode(serde.encode(topics.EVENTS_RAW, record), schemas.CUSTOMER_EVENT)
    assert json.loads(decoded["properties"]) == ARBITRARY
    # int stays int, float stays float, -0.0 keeps its type
    props = json.loads(decoded["properties"])
    assert isinstance(props["int"], int) and isinstance(props["float"], float)
    assert props["big"] == 2**63 + 5
    assert decoded["messageId"] == record["messageId"]


def test_confluent_deserializer_reads_our_bytes(serde: AvroSerde, stack: StackEndpoints) -> None:
    record = _event()
    data = serde.encode(topics.EVENTS_RAW, record)
    deser = confluent_deserializer(stack.registry_url)
    value = deser(data, SerializationContext(topics.EVENTS_RAW, MessageField.VALUE))
    assert value["messageId"] == record["messageId"]
    assert json.loads(value["properties"]) == ARBITRARY
    assert value["context"]["ip"] == "10.0.0.1"


def test_we_read_confluent_serializer_bytes(serde: AvroSerde, stack: StackEndpoints) -> None:
    client = SchemaRegistryClient({"url": stack.registry_url})
    ser = AvroSerializer(
        client,
        schemas.schema_text(schemas.CUSTOMER_EVENT),
        conf={
            "auto.register.schemas": True,
            "normalize.schemas": False,
            "subject.name.strategy": topic_subject_name_strategy,
        },
    )
    record = _event()
    data = ser(record, SerializationContext(topics.EVENTS_RAW, MessageField.VALUE))
    assert data is not None and data[0] == 0
    _, decoded = serde.decode(data, schemas.CUSTOMER_EVENT)
    assert decoded["messageId"] == record["messageId"]
    assert json.loads(decoded["properties"]) == ARBITRARY


def test_decode_errors_are_typed(serde: AvroSerde) -> None:
    good = serde.encode(topics.EVENTS_RAW, _event())
    with pytest.raises(NotWireFormat):
        serde.decode(b'{"json": true}', schemas.CUSTOMER_EVENT)
    with pytest.raises(NotWireFormat):
        serde.decode(b"", schemas.CUSTOMER_EVENT)
    with pytest.raises(UnknownSchemaId):
        serde.decode(struct.pack(">bI", 0, 987_654_321) + good[5:], schemas.CUSTOMER_EVENT)
    with pytest.raises(MalformedAvro):
        serde.decode(good[:-7], schemas.CUSTOMER_EVENT)
    dead = serde.encode(
        topics.EVENTS_DLQ,
        {
            "originalBytes": b"x",
            "stage": "t",
            "reasonCode": "R",
            "message": "m",
            "failedAt": now_ms(),
        },
    )
    with pytest.raises(SchemaMismatch):
        serde.decode(dead, schemas.CUSTOMER_EVENT)


def _record_schema(name: str, fields: list[dict[str, object]]) -> str:
    return json.dumps(
        {"type": "record", "name": name, "namespace": "cdpflow.test", "fields": fields}
    )


def test_backward_compatible_evolution_and_rejection(serde: AvroSerde, unique: str) -> None:
    subject = f"test.evolution.{unique}-value"
    v1 = _record_schema("Evolving", [{"name": "id", "type": "string"}])
    v2 = _record_schema(
        "Evolving",
        [
            {"name": "id", "type": "string"},
            {"name": "note", "type": ["null", "string"], "default": None},
        ],
    )
    broken = _record_schema("Evolving", [{"name": "id", "type": "long"}])
    id1 = serde.registry.register(subject, v1)
    assert serde.registry.client.get_compatibility(subject).upper() == "BACKWARD"
    import io

    from fastavro import parse_schema, schemaless_writer

    buf = io.BytesIO()
    buf.write(struct.pack(">bI", 0, id1))
    schemaless_writer(buf, parse_schema(json.loads(v1)), {"id": "old-record"})
    old_bytes = buf.getvalue()

    id2 = serde.registry.register(subject, v2)
    assert id2 != id1
    # An old record still decodes, and resolves into the new schema with the default.
    sid, old = serde.decode(old_bytes)
    assert sid == id1 and old == {"id": "old-record"}
    from fastavro import schemaless_reader

    resolved = schemaless_reader(
        io.BytesIO(old_bytes[5:]),
        serde.registry.writer_schema(id1),
        parse_schema(json.loads(v2)),
    )
    assert resolved == {"id": "old-record", "note": None}

    with pytest.raises(IncompatibleSchema) as info:
        serde.registry.register(subject, broken)
    assert "BACKWARD" in str(info.value) or "compatib" in str(info.value).lower()
