"""BatchSender on the real broker: a batch resolves only when the broker took all of it;
records it refused are produced again (and only those) until it takes them."""

from __future__ import annotations

import asyncio
import os
import uuid

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
)

from sources.kafka_producer import BatchSender, OutRecord, ReliableProducer
from streams.settings import Settings
from streams.topics import TopicSpec, ensure_topics


def _read_all(settings: Settings, topic: str, expected: int) -> list[tuple[bytes, bytes, dict]]:
    consumer = Consumer(
        {
            **settings.librdkafka_common(),
            "group.id": f"batch-sender-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(2)])
    out: list[tuple[bytes, bytes, dict]] = []
    try:
        for _ in range(120):
            for msg in consumer.consume(500, 0.5):
                if not msg.error():
                    out.append((msg.key(), msg.value(), dict(msg.headers() or [])))
            if len(out) >= expected:
                break
        return out
    finally:
        consumer.close()


async def test_refused_records_are_sent_again_until_the_broker_takes_them(
    settings: Settings, unique: str
) -> None:
    topic = f"test-batch-sender-{unique}"
    ensure_topics(settings, [TopicSpec(topic, 2, {"max.message.bytes": "2000"})])
    sender = BatchSender(ReliableProducer(settings), max_backoff=0.5)
    records: list[OutRecord] = [
        (topic, f"small-{i}".encode(), f"k{i}".encode(), [("h", str(i).encode())])
        for i in range(50)
    ]
    big: OutRecord = (topic, os.urandom(10_000), b"big", [("h", b"big")])  # incompressible
    records.insert(25, big)
    task = asyncio.create_task(sender.send(records))
    # The broker refuses the big record while the topic's limit stands.
    done, _ = await asyncio.wait({task}, timeout=3)
    assert not done, "the batch resolved although the broker refused one of its records"
    admin = AdminClient(settings.librdkafka_common())
    resource = ConfigResource(
        ConfigResource.Type.TOPIC,
        topic,
        incremental_configs=[
            ConfigEntry("max.message.bytes", "100000", incremental_operation=AlterConfigOpType.SET)
        ],
    )
    for fut in admin.incremental_alter_configs([resource]).values():
        fut.result(30)
    await asyncio.wait_for(task, timeout=120)
    written = await asyncio.to_thread(_read_all, settings, topic, len(records))
    assert sorted(written) == sorted(
        (key, value, {"h": headers[0][1]})
        for _, value, key, headers in records  # type: ignore[index]
    )


async def test_empty_batch_resolves(settings: Settings) -> None:
    sender = BatchSender(ReliableProducer(settings))
    await asyncio.wait_for(sender.send([]), timeout=10)
