"""Helpers for the source tests: reading back what landed on the shared topics.

The pipeline topics are shared by every test (and other suites), so a tail
remembers each partition's end offset when it is created and later reads only
what was appended since, decoding with confluent-kafka's own AvroDeserializer
so the wire format is checked by a client other than ours.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.serialization import MessageField, SerializationContext

from tests.kafka_helpers import confluent_deserializer


@dataclass(frozen=True)
class Record:
    key: bytes | None
    value: dict[str, Any]
    partition: int
    offset: int


class TopicTail:
    """Everything appended to ``topic`` after this object was created."""

    def __init__(self, bootstrap: str, registry_url: str, topic: str) -> None:
        self.topic = topic
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"test-tail-{uuid.uuid4().hex[:10]}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        md = self.consumer.list_topics(topic, timeout=15)
        self.partitions = sorted(md.topics[topic].partitions)
        assert self.partitions, f"topic {topic} has no partitions"
        self.start = self._ends()
        self.deserialize = confluent_deserializer(registry_url)

    def _ends(self) -> dict[int, int]:
        return {
            p: self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=15)[1]
            for p in self.partitions
        }

    def read_new(self, timeout: float = 30.0) -> list[Record]:
        """Records between the start offsets and the current end (acked records are there)."""
        end = self._ends()
        pending = {p for p in self.partitions if end[p] > self.start[p]}
        if not pending:
            return []
        self.consumer.assign([TopicPartition(self.topic, p, self.start[p]) for p in pending])
        out: list[Record] = []
        deadline = time.monotonic() + timeout
        try:
            while pending:
                assert time.monotonic() < deadline, f"timed out reading {self.topic}"
                msg = self.consumer.poll(0.5)
                if msg is None:
                    continue
                assert msg.error() is None, msg.error()
                p, offset = msg.partition(), msg.offset()
                if p in pending and offset < end[p]:
                    ctx = SerializationContext(self.topic, MessageField.VALUE)
                    out.append(Record(msg.key(), self.deserialize(msg.value(), ctx), p, offset))
                if offset >= end[p] - 1:
                    pending.discard(p)
        finally:
            self.consumer.unassign()
        return out

    def by_message_id(self, ids: set[str] | None = None) -> dict[str, Record]:
        """New records keyed by messageId, only ``ids`` when given (fails on duplicates)."""
        found: dict[str, Record] = {}
        for record in self.read_new():
            mid = record.value.get("messageId")
            if mid is None or (ids is not None and mid not in ids):
                continue
            assert mid not in found, f"messageId {mid} written twice to {self.topic}"
            found[mid] = record
        return found

    def close(self) -> None:
        self.consumer.close()
