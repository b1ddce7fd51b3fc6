"""The fixed input: seeded realistic shoppers, validated and Avro-encoded once.

Events come from :func:`sources.generator.generate_events`, pass through
:func:`streams.events.from_segment` (what the collector does), and are encoded
in the Confluent wire format under ``cdp.events.raw-value`` and keyed by
:func:`streams.events.identity_key`, exactly as the collector writes them.
Recommendation lists for the users who identify (:func:`generate_recommendations`)
go to ``cdp.recommendations.updates`` keyed by customer id, as the publisher does.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Producer
from fastavro import schemaless_writer

from sources.generator import generate_events, generate_recommendations
from sources.publisher import recommendation_record
from streams import schemas, topics
from streams.events import EventRejected, from_segment, identity_key, now_ms
from streams.serde import HEADER, MAGIC_BYTE, AvroSerde, Encoder
from streams.settings import Settings

#: (key, value) as produced.
KeyValue = tuple[bytes, bytes]


@dataclass
class Corpus:
    """Encoded events (with their messageIds, in order) and recommendation updates."""

    events: list[KeyValue] = field(default_factory=list)
    message_ids: list[str] = field(default_factory=list)
    recommendations: list[KeyValue] = field(default_factory=list)
    rejected: int = 0
    build_s: float = 0.0

    @property
    def value_bytes(self) -> int:
        return sum(len(v) for _, v in self.events)

    def stamp(self, serde: AvroSerde) -> None:
        """Put the registered schema ids into records built by :func:`unregistered_encoder`."""
        for topic, records in (
            (topics.EVENTS_RAW, self.events),
            (topics.RECOMMENDATIONS_UPDATES, self.recommendations),
        ):
            header = HEADER.pack(MAGIC_BYTE, serde.schema_id(topic))
            records[:] = [(key, header + value[HEADER.size :]) for key, value in records]

    def head(self, n: int) -> Corpus:
        """The first ``n`` events (same recommendations)."""
        return Corpus(
            self.events[:n], self.message_ids[:n], self.recommendations, self.rejected, 0.0
        )


def unregistered_encoder(topic: str) -> Encoder:
    """Wire format with schema id 0, for building a corpus before the registry is up
    (:meth:`Corpus.stamp` puts the registered ids in afterwards)."""
    header = HEADER.pack(MAGIC_BYTE, 0)
    parsed = schemas.parsed(schemas.TOPIC_SCHEMAS[topic])

    def encode(record: dict[str, Any]) -> bytes:
        buf = io.BytesIO()
        buf.write(header)
        schemaless_writer(buf, parsed, record)
        return buf.getvalue()

    return encode


def build_corpus(
    serde: AvroSerde | None,
    count: int,
    users: int,
    seed: int,
    *,
    bad_ratio: float = 0.0,
    recommendations: bool = True,
) -> Corpus:
    """Generate, validate (``from_segment``) and encode ``count`` events.

    Without a ``serde`` the records carry schema id 0 until :meth:`Corpus.stamp`.
    """
    started = time.perf_counter()
    encoder = serde.encoder if serde is not None else unregistered_encoder
    encode = encoder(topics.EVENTS_RAW)
    corpus = Corpus()
    for msg in generate_events(count, users, seed, bad_ratio=bad_ratio):
        try:
            record = from_segment(msg, received_at_ms=now_ms())
        except EventRejected:
            corpus.rejected += 1
            continue
        corpus.events.append((identity_key(record).encode(), encode(record)))
        corpus.message_ids.append(str(record["messageId"]))
    if recommendations:
        encode_rec = encoder(topics.RECOMMENDATIONS_UPDATES)
        for kwargs in generate_recommendations(users, seed):
            record = recommendation_record(**kwargs)
            corpus.recommendations.append((record["customerId"].encode(), encode_rec(record)))
    corpus.build_s = time.perf_counter() - started
    return corpus


def bulk_producer(settings: Settings) -> Producer:
    """The collector's producer settings (idempotent, acks=all, murmur2), tuned for bulk."""
    return Producer(
        settings.reliable_producer_config(
            **{
                "linger.ms": 20,
                "batch.size": 1_000_000,
                "queue.buffering.max.messages": 1_000_000,
                "queue.buffering.max.kbytes": 2_000_000,
            }
        )
    )


def produce_all(producer: Producer, topic: str, records: Iterable[KeyValue]) -> None:
    """Queue every record (waiting out a full local queue); the caller flushes."""
    for key, value in records:
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)


def release(
    settings: Settings,
    corpus: Corpus,
    *,
    raw_topic: str = topics.EVENTS_RAW,
    recs_topic: str = topics.RECOMMENDATIONS_UPDATES,
) -> float:
    """Append the recommendations, then the events, at full speed; seconds until all acked."""
    started = time.perf_counter()
    producer = bulk_producer(settings)
    produce_all(producer, recs_topic, corpus.recommendations)
    if producer.flush(60):
        raise RuntimeError("recommendation updates were not acknowledged within 60 s")
    produce_all(producer, raw_topic, corpus.events)
    if producer.flush(120):
        raise RuntimeError("corpus events were not acknowledged within 120 s")
    return time.perf_counter() - started


def paced_send(
    settings: Settings,
    events: Sequence[KeyValue],
    message_ids: Sequence[str],
    rate: float,
    *,
    raw_topic: str = topics.EVENTS_RAW,
) -> dict[str, int]:
    """Produce ``events`` at ``rate``/s; return messageId -> wall-clock ms of its produce call.

    A 1 ms tick sends whatever the schedule says is due, so the offered rate is
    exact over any interval longer than a few ms. ``linger.ms=0``: the bench's own
    producer adds no batching delay to the latency it measures.
    """
    producer = Producer(settings.reliable_producer_config(**{"linger.ms": 0}))
    sent_at: dict[str, int] = {}
    started = time.perf_counter()
    i, n = 0, len(events)
    while i < n:
        due = min(n, int((time.perf_counter() - started) * rate) + 1)
        while i < due:
            key, value = events[i]
            now = time.time_ns() // 1_000_000
            try:
                producer.produce(raw_topic, value, key)
            except BufferError:
                producer.poll(0.01)
                continue
            sent_at[message_ids[i]] = now
            i += 1
        producer.poll(0)
        time.sleep(0.001)
    if producer.flush(60):
        raise RuntimeError("paced events were not acknowledged within 60 s")
    return sent_at
