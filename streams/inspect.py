"""Reading the tail of a topic, decoded (for ``cdpflow consume`` and the demo)."""

from __future__ import annotations

import uuid
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from streams.serde import AvroSerde, DecodeError
from streams.settings import Settings


def topic_size(settings: Settings, topic: str) -> int:
    """Records currently in the topic (sum of high minus low watermarks)."""
    consumer = Consumer(
        {**settings.librdkafka_common(), "group.id": f"cdpflow-inspect-{uuid.uuid4().hex}"}
    )
    try:
        md = consumer.list_topics(topic, timeout=15)
        total = 0
        for p in md.topics[topic].partitions:
            lo, hi = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15)
            total += hi - lo
        return total
    finally:
        consumer.close()


def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    consumer = Consumer(
        {**settings.librdkafka_common(), "group.id": f"cdpflow-inspect-{uuid.uuid4().hex}"}
    )
    try:
        md = consumer.list_topics(topic, timeout=15)
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15)[1]
            for p in md.topics[topic].partitions
        }
    finally:
        consumer.close()


def read_from(
    settings: Settings, topic: str, start: dict[int, int], serde: AvroSerde | None = None
) -> list[dict[str, Any]]:
    """Every record from ``start`` offsets to the current end, decoded; never blocks forever."""
    serde = serde or AvroSerde.from_url(settings.schema_registry_url)
    end = end_offsets(settings, topic)
    todo = {p: (start.get(p, 0), hi) for p, hi in end.items() if hi > start.get(p, 0)}
    if not todo:
        return []
    consumer = Consumer(
        {
            **settings.librdkafka_common(),
            "group.id": f"cdpflow-inspect-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    out: list[dict[str, Any]] = []
    try:
        consumer.assign([TopicPartition(topic, p, lo) for p, (lo, _) in todo.items()])
        remaining = {p: hi for p, (_, hi) in todo.items()}
        idle = 0
        while remaining and idle < 20:
            batch = consumer.consume(1000, 0.5)
            idle = 0 if batch else idle + 1
            for msg in batch:
                if msg.error():
                    continue
                p = msg.partition()
                offset = msg.offset()
                if p in remaining and offset is not None and offset >= remaining[p] - 1:
                    remaining.pop(p)
                try:
                    out.append(serde.decode(msg.value())[1])
                except DecodeError as exc:
                    out.append({"_undecodable": exc.reason_code, "_error": str(exc)})
    finally:
        consumer.close()
    return out


def last_records(settings: Settings, topic: str, limit: int) -> list[dict[str, Any]]:
    end = end_offsets(settings, topic)
    per_partition = max(1, limit)
    start = {p: max(0, hi - per_partition) for p, hi in end.items()}
    records = read_from(settings, topic, start)
    return records[-limit:]
