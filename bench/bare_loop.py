"""Scenario (b): cdpflow's work in a bare confluent-kafka consume/produce loop.

The Python reference limit: one process owns every partition, so the identity
links, traits and recommendations are plain dicts, and there is a single hop
(raw -> enriched) instead of the worker's two (three for aliases and mis-keyed
events). The per-event work is
cdpflow's own (:mod:`bench.work`); the delivery guarantee is the worker's:
outputs are produced with the collector's idempotent acks=all producer and a
batch's input offsets are committed only after the broker acknowledged all of
its outputs (failed deliveries are produced again), so a crash replays but never
loses.

Run as ``python -m bench.bare_loop --bootstrap ... --registry ... --group ...``
(until SIGTERM), or embed :class:`BareLoop` (the smoke test does).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer as KafkaConsumer
from confluent_kafka import KafkaError, Message, Producer, TopicPartition

from bench import work
from streams import schemas, topics
from streams.events import EventRejected, Limits, Reason, check_rules, dead_letter, now_ms
from streams.serde import AvroSerde, DecodeError, RegistryUnavailable
from streams.settings import Settings

STAGE = "validate"


@dataclass(frozen=True)
class LoopTopics:
    raw: str = topics.EVENTS_RAW
    recommendations: str = topics.RECOMMENDATIONS_UPDATES
    enriched: str = topics.EVENTS_ENRICHED
    dlq: str = topics.EVENTS_DLQ


Record = tuple[str, bytes, bytes | None]


class _Batch:
    """One consumed batch: the offsets it may commit once all its outputs are acked."""

    __slots__ = ("failed", "offsets", "remaining")

    def __init__(self) -> None:
        self.offsets: dict[tuple[str, int], int] = {}
        self.remaining = 0
        self.failed: list[Record] = []

    def on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.failed.append((str(msg.topic()), msg.value() or b"", msg.key()))
        self.remaining -= 1


class BareLoop:
    """decode -> validate -> stitch -> enrich -> encode -> produce, in one loop."""

    def __init__(
        self,
        settings: Settings,
        group: str,
        *,
        loop_topics: LoopTopics = LoopTopics(),
        serde: AvroSerde | None = None,
        batch_size: int = 500,
        poll_timeout_s: float = 0.005,
        commit_interval_s: float = 1.0,
    ) -> None:
        self.topics = loop_topics
        self.batch_size = batch_size
        self.poll_timeout_s = poll_timeout_s
        self.commit_interval_s = commit_interval_s
        self.limits = Limits.from_settings(settings)
        self.serde = serde or AvroSerde.from_url(settings.schema_registry_url)
        self.encode_enriched = self.serde.encoder(topics.EVENTS_ENRICHED)
        self.encode_dead_letter = self.serde.encoder(topics.EVENTS_DLQ)
        self.worker_id = f"bench-bare@{socket.gethostname()}:{os.getpid()}"
        self.links: dict[str, str] = {}
        self.traits: dict[str, dict[str, Any]] = {}
        self.recommendations: dict[str, dict[str, Any]] = {}
        self.processed = 0
        self.dead_letters = 0
        self.consumer = KafkaConsumer(
            {
                **settings.librdkafka_common(),
                "group.id": group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        self.consumer.subscribe([loop_topics.raw, loop_topics.recommendations])
        self.producer = Producer(settings.reliable_producer_config())

    # ------------------------------------------------------------------ the loop

    def run(self, should_stop: Callable[[], bool]) -> None:
        inflight: deque[_Batch] = deque()
        ready: dict[tuple[str, int], int] = {}
        last_commit = time.monotonic()
        while not should_stop():
            msgs = self.consumer.consume(self.batch_size, self.poll_timeout_s)
            if msgs:
                inflight.append(self.process(msgs))
            self.producer.poll(0)
            self._retire(inflight, ready)
            if ready and time.monotonic() - last_commit >= self.commit_interval_s:
                self._commit(ready, asynchronous=True)
                ready = {}
                last_commit = time.monotonic()
        while inflight:
            self.producer.flush(1.0)
            self._retire(inflight, ready)
        if ready:
            self._commit(ready, asynchronous=False)

    def close(self) -> None:
        self.producer.flush(30)
        self.consumer.close()

    def _retire(self, inflight: deque[_Batch], ready: dict[tuple[str, int], int]) -> None:
        """Batches whose outputs are all acknowledged, in consumption order."""
        while inflight and inflight[0].remaining == 0:
            batch = inflight[0]
            if batch.failed:  # the broker refused some after librdkafka's retries: again
                failed, batch.failed = batch.failed, []
                for record in failed:
                    self._produce(batch, record)
                return
            inflight.popleft()
            ready.update(batch.offsets)

    def _commit(self, ready: dict[tuple[str, int], int], *, asynchronous: bool) -> None:
        offsets = [TopicPartition(t, p, o) for (t, p), o in ready.items()]
        if asynchronous:
            self.consumer.commit(offsets=offsets, asynchronous=True)
        else:
            self.consumer.commit(offsets=offsets, asynchronous=False)

    def _produce(self, batch: _Batch, record: Record) -> None:
        topic, value, key = record
        batch.remaining += 1
        while True:
            try:
                self.producer.produce(topic, value, key, on_delivery=batch.on_delivery)
                return
            except BufferError:
                self.producer.poll(0.01)

    # --------------------------------------------------------- per-event work

    def _decode(self, value: bytes | None, reader: str) -> dict[str, Any]:
        delay = 0.5
        while True:
            try:
                return self.serde.decode(value, reader=reader)[1]
            except RegistryUnavailable:
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def process(self, msgs: list[Message]) -> _Batch:
        batch = _Batch()
        now = now_ms()
        recs_topic = self.topics.recommendations
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.fatal():
                    raise RuntimeError(f"consumer error: {err}")
                continue
            topic, partition, offset = str(msg.topic()), msg.partition() or 0, msg.offset() or 0
            batch.offsets[(topic, partition)] = offset + 1
            value = msg.value()
            if topic == recs_topic:
                self._recommendation(batch, msg, value)
            else:
                self._event(batch, msg, value, now)
        return batch

    def _dead_letter(
        self,
        batch: _Batch,
        msg: Message,
        value: bytes | None,
        stage: str,
        reason: Reason | str,
        detail: str,
        message_id: str | None = None,
    ) -> None:
        letter = dead_letter(
            value or b"",
            stage=stage,
            reason=reason,
            message=detail,
            topic=msg.topic(),
            partition=msg.partition(),
            offset=msg.offset(),
            message_id=message_id,
        )
        self.dead_letters += 1
        key = message_id.encode() if message_id else None
        self._produce(batch, (self.topics.dlq, self.encode_dead_letter(letter), key))

    def _recommendation(self, batch: _Batch, msg: Message, value: bytes | None) -> None:
        try:
            record = self._decode(value, schemas.RECOMMENDATION_UPDATE)
            work.check_recommendation(record)
        except (DecodeError, EventRejected) as exc:
            reason = exc.reason if isinstance(exc, EventRejected) else exc.reason_code
            self._dead_letter(batch, msg, value, "recommendations", reason, str(exc))
            return
        customer = record["customerId"]
        state = work.newer_recommendations(self.recommendations.get(customer), record)
        if state is not None:
            self.recommendations[customer] = state

    def _event(self, batch: _Batch, msg: Message, value: bytes | None, now: int) -> None:
        message_id = None
        try:
            record = self._decode(value, schemas.CUSTOMER_EVENT)
            message_id = record.get("messageId")
            check_rules(record, now=now, limits=self.limits)
        except DecodeError as exc:
            self._dead_letter(batch, msg, value, STAGE, exc.reason_code, str(exc))
            return
        except EventRejected as exc:
            self._dead_letter(batch, msg, value, STAGE, exc.reason, exc.detail, message_id)
            return
        links = self.links
        profile_id, stitched = work.resolve_profile(record, links.get, links.__setitem__)
        traits, changed = work.update_traits(record, self.traits.get(profile_id))
        if changed and traits is not None:
            self.traits[profile_id] = traits
        enriched = work.enrich(
            record,
            profile_id=profile_id,
            stitched=stitched,
            traits=traits,
            recommendations=self.recommendations.get(profile_id),
            worker_id=self.worker_id,
            processed_at_ms=now,
            source_partition=msg.partition(),
            source_offset=msg.offset(),
        )
        self.processed += 1
        out = (self.topics.enriched, self.encode_enriched(enriched), profile_id.encode())
        self._produce(batch, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--registry", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args(argv)
    settings = Settings(kafka_bootstrap_servers=args.bootstrap, schema_registry_url=args.registry)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    loop = BareLoop(settings, args.group, batch_size=args.batch_size)
    print(f"bare loop {loop.worker_id} consuming as group {args.group}", flush=True)
    try:
        loop.run(stop.is_set)
    finally:
        loop.close()
    print(f"bare loop stopped: {loop.processed} enriched, {loop.dead_letters} dead", flush=True)


if __name__ == "__main__":
    main()
