"""Which partition a key lands in: Kafka's default partitioner, computed locally.

The worker's producer (librdkafka, ``partitioner=murmur2_random``), Faust's
(aiokafka) and Java's all place a non-null key at
``(murmur2(key) & 0x7fffffff) % partitions``. Knowing that placement lets the
ingest stage decide, per record, whether the state it needs (the identity link
of the record's identity key) already lives in the partition the record was
consumed from, so only the records whose key points elsewhere take a
repartition hop.
"""

from __future__ import annotations

from aiokafka.partitioner import murmur2


class KeyPartitioner:
    """Partition of a key for a topic of ``partitions`` partitions, memoised.

    Identity keys repeat (one per device or user), and murmur2 in Python costs a
    few microseconds, so results are cached; the cache is dropped when it grows
    past ``cache_size`` keys (cheaper than LRU bookkeeping on the hot path).
    """

    __slots__ = ("_cache", "_cache_size", "partitions")

    def __init__(self, partitions: int, cache_size: int = 200_000) -> None:
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        self.partitions = partitions
        self._cache: dict[bytes, int] = {}
        self._cache_size = cache_size

    def __call__(self, key: bytes) -> int:
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        partition = key_partition(key, self.partitions)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[key] = partition
        return partition


def key_partition(key: bytes, partitions: int) -> int:
    """Kafka's default partition of a non-null key."""
    return int(murmur2(key) & 0x7FFFFFFF) % partitions
