"""The local key -> partition function agrees with where librdkafka (the worker's and the
collector's producer, murmur2_random) puts keys."""

from __future__ import annotations

import uuid

from sources.kafka_producer import ReliableProducer
from streams.partitioning import KeyPartitioner, key_partition
from streams.settings import Settings
from streams.topics import TopicSpec, ensure_topics


def test_keys_land_where_the_partitioner_says(settings: Settings, unique: str) -> None:
    topic = f"test-partitioning-{unique}"
    partitions = 6
    ensure_topics(settings, [TopicSpec(topic, partitions, {})])
    keys = [f"{kind}-{uuid.uuid4().hex}" for kind in ("anon", "user", "é-ü") for _ in range(60)]
    keys += ["", "a", "ab", "abc", "abcd", "abcde"]  # every murmur2 tail length
    producer = ReliableProducer(settings)
    try:
        futures = {key: producer.produce(topic, b"x", key=key.encode()) for key in keys}
        placed = {key: fut.result(30).partition() for key, fut in futures.items()}
    finally:
        producer.close()
    partition_of = KeyPartitioner(partitions)
    for key in keys:
        assert partition_of(key.encode()) == placed[key], key
        assert partition_of(key.encode()) == placed[key]  # cached answer too
    assert len(set(placed.values())) == partitions


def test_cache_is_bounded() -> None:
    partition_of = KeyPartitioner(3, cache_size=10)
    answers = [partition_of(f"k{i}".encode()) for i in range(25)]
    assert answers == [key_partition(f"k{i}".encode(), 3) for i in range(25)]
    assert len(partition_of._cache) <= 10
