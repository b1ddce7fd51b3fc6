"""Producing inputs for pipeline tests straight to the raw topics."""

from __future__ import annotations

import io
import struct
import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from fastavro import schemaless_writer

from sources.kafka_producer import ReliableProducer
from streams import schemas, topics
from streams.events import from_segment, identity_key, now_ms
from streams.serde import AvroSerde
from streams.settings import Settings
from tests.kafka_helpers import end_offsets

#: key, value, headers (bytes values only)
RawRecord = tuple[bytes | None, bytes, dict[str, bytes]]


class RawProducer:
    def __init__(self, settings: Settings, serde: AvroSerde) -> None:
        self.producer = ReliableProducer(settings)
        self.serde = serde
        self.encode = serde.encoder(topics.EVENTS_RAW)
        self.encode_rec = serde.encoder(topics.RECOMMENDATIONS_UPDATES)
        self.pending: list[Any] = []

    def segment(self, msg: dict[str, Any], *, key: str | None = None) -> str:
        """Validate and produce like the collector (keyed by the identity key unless ``key``)."""
        record = from_segment(msg, received_at_ms=now_ms())
        self.pending.append(
            self.producer.produce(
                topics.EVENTS_RAW, self.encode(record), key=key or identity_key(record)
            )
        )
        return str(record["messageId"])

    def record(self, record: dict[str, Any]) -> str:
        """An already-built record, bypassing the client-side rules (a rogue producer)."""
        self.pending.append(
            self.producer.produce(topics.EVENTS_RAW, self.encode(record), key=b"rogue")
        )
        return str(record["messageId"])

    def raw_bytes(self, value: bytes) -> None:
        self.pending.append(self.producer.produce(topics.EVENTS_RAW, value, key=b"rogue"))

    def recommendations(self, customer: str, products: list[tuple[str, float]]) -> str:
        update_id = str(uuid.uuid4())
        rec = {
            "updateId": update_id,
            "customerId": customer,
            "products": [
                {
                    "productId": pid,
                    "score": score,
                    "rank": i + 1,
                    "reason": "test",
                    "category": None,
                }
                for i, (pid, score) in enumerate(products)
            ],
            "modelVersion": "test-model-1",
            "generatedAt": now_ms(),
        }
        self.pending.append(
            self.producer.produce(
                topics.RECOMMENDATIONS_UPDATES, self.encode_rec(rec), key=customer
            )
        )
        return update_id

    def flush(self) -> None:
        for fut in self.pending:
            fut.result(30)
        self.pending.clear()

    def close(self) -> None:
        self.flush()
        self.producer.close()


def rogue_record(**fields: Any) -> dict[str, Any]:
    """A schema-valid CustomerEvent that breaks the pipeline's rules."""
    base = from_segment(
        {"type": "track", "userId": "placeholder", "event": "x"}, received_at_ms=now_ms()
    )
    base.update(fields)
    return base


def unknown_schema_id_bytes(valid: bytes) -> bytes:
    return struct.pack(">bI", 0, 2_000_000_000) + valid[5:]


def other_schema_bytes(serde: AvroSerde) -> bytes:
    """A well-formed record of another registered schema (DeadLetter) on the raw topic."""
    return serde.encode(
        topics.EVENTS_DLQ,
        {"originalBytes": b"", "stage": "x", "reasonCode": "X", "message": "", "failedAt": 0},
    )


def avro_with_bad_body(serde: AvroSerde) -> bytes:
    header = struct.pack(">bI", 0, serde.schema_id(topics.EVENTS_RAW))
    buf = io.BytesIO()
    schemaless_writer(
        buf,
        schemas.parsed(schemas.DEAD_LETTER),
        {"originalBytes": b"\xff" * 3, "stage": "", "reasonCode": "", "message": "", "failedAt": 0},
    )
    return header + buf.getvalue()[:4]


class RawTopicReader:
    """Undecoded records a topic receives from now on (e.g. an internal topic)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"raw-reader-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
            }
        )
        self._consumer.assign(
            [TopicPartition(topic, p, o) for p, o in end_offsets(bootstrap, topic).items()]
        )
        self._positions: dict[int, int] = {}
        self.records: list[RawRecord] = []

    def _consume(self) -> None:
        for msg in self._consumer.consume(500, 0.5):
            if msg.error():
                continue
            headers = {k: v for k, v in msg.headers() or [] if isinstance(v, bytes)}
            self.records.append((msg.key(), msg.value() or b"", headers))
            self._positions[msg.partition() or 0] = (msg.offset() or 0) + 1

    def poll_until(
        self, done: Callable[[list[RawRecord]], bool], timeout: float = 60.0
    ) -> list[RawRecord]:
        deadline = time.monotonic() + timeout
        while not done(self.records):
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.topic}: condition not met in {timeout} s")
            self._consume()
        return self.records

    def read_to_end(self, timeout: float = 60.0) -> list[RawRecord]:
        """Everything appended since the reader was created, up to the current end."""
        ends = end_offsets(self.bootstrap, self.topic)
        return self.poll_until(
            lambda _: all(self._positions.get(p, 0) >= end for p, end in ends.items()), timeout
        )

    def close(self) -> None:
        self._consumer.close()
