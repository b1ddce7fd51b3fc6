"""Wiring of the stream topology shared by every domain's agents.

Topology (every hop keyed so that the state it needs is local to the worker):

    cdp.events.raw ─ingest (validate + stitch, table identity_links)──────────┐
          │   │  (key: anonymousId, else userId: the identity key)            │
          │   └─only alias / mis-keyed─▶ <group>-identity-repartition         │
          ▼                              (key: previousId|anonymousId|userId) │
    cdp.events.dlq                        │ identity (same table, same        │
                                          │ partitions: co-partitioned)       │
                                          ▼                                   ▼
    cdp.recommendations.updates ─recs─▶ <group>-profile-repartition (key: canonical profile id)
                                          │ profiles (tables profile_traits,
                                          ▼           profile_recommendations)
                                   cdp.events.enriched (key: profile id)

The collector keys raw events by their identity key, so an event's identity
link is in the table partition co-partitioned with its raw partition and it is
stitched in the ingest pass; only records whose identity key hashes elsewhere
take the identity hop. Internal hops forward the producer's original Avro bytes
and carry the few routing fields in headers, so only ``ingest`` and ``profiles``
decode Avro. Each agent processes a batch (``take_events``), produces its output
through librdkafka (:class:`BatchSender`), awaits the broker's acknowledgement of
all of it, and only then lets Faust ack (and later commit) the batch's offsets:
a SIGKILL at any point loses nothing, it only replays the unacked batch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import faust

from sources.kafka_producer import BatchSender, OutRecord, ReliableProducer
from streams import topics
from streams.app import (
    IDENTITY_LINKS_TABLE,
    PROFILE_RECOMMENDATIONS_TABLE,
    PROFILE_TRAITS_TABLE,
    create_app,
)
from streams.events import Limits, Reason, dead_letter
from streams.metrics import PipelineMetrics, register_metrics
from streams.partitioning import KeyPartitioner
from streams.profiles.enrich import parse_user_agent
from streams.profiles.splice import EnrichedLayout
from streams.serde import AvroSerde, Encoder, RegistryUnavailable
from streams.settings import Settings

log = logging.getLogger(__name__)

PIPELINE_VERSION = "0.1.0"

# Routing headers on internal topics.
H_TYPE = "cdp-type"
H_USER = "cdp-uid"
H_ANON = "cdp-aid"
H_PREVIOUS = "cdp-prev"
H_PROFILE = "cdp-pid"
H_STITCHED = "cdp-stitched"
H_KIND = "cdp-kind"
H_SRC_PARTITION = "cdp-src-p"
H_SRC_OFFSET = "cdp-src-o"
#: Present only when the record's Avro body is in the CustomerEvent schema the
#: EnrichedEvent embeds, so the profile stage can splice it (streams.profiles.splice):
H_RECEIVED = "cdp-recv"  # receivedAt, epoch ms (ASCII)
H_CONTEXT = "cdp-ctx"  # the EnrichedEvent's userAgent + campaign fields, Avro
H_TRAITS = "cdp-traits"  # an identify's traits JSON (absent when there are none)
KIND_EVENT = b"event"
KIND_RECOMMENDATION = b"rec"


def header_map(headers: Any) -> dict[str, bytes]:
    """Faust hands headers as a list of pairs or a mapping, depending on the path."""
    if not headers:
        return {}
    if isinstance(headers, Mapping):
        return {str(k): v for k, v in headers.items()}
    return {str(k): v for k, v in headers}


@dataclass
class Pipeline:
    app: faust.App
    settings: Settings
    serde: AvroSerde
    limits: Limits
    worker_label: str
    raw_topic: Any
    identity_topic: Any
    profile_topic: Any
    recommendations_topic: Any
    identity_links: Any
    profile_traits: Any
    profile_recommendations: Any
    encode_enriched: Encoder
    encode_dead_letter: Encoder
    sender: BatchSender
    metrics: PipelineMetrics
    #: Partition of a key in the (co-partitioned) pipeline topics, as producers place it.
    partition_of: KeyPartitioner = field(init=False)
    #: Encoders of the EnrichedEvent's parts around the raw CustomerEvent bytes.
    layout: EnrichedLayout = field(init=False)

    def __post_init__(self) -> None:
        self.partition_of = KeyPartitioner(self.settings.cdp_topic_partitions)
        self.layout = EnrichedLayout()
        # ua-parser compiles its regexes on first use (~0.4 s): at start-up, not mid-batch.
        parse_user_agent("Mozilla/5.0 (X11; Linux x86_64)")

    @property
    def identity_topic_name(self) -> str:
        return str(self.identity_topic.get_topic_name())

    @property
    def profile_topic_name(self) -> str:
        return str(self.profile_topic.get_topic_name())

    def dead_letter_record(
        self,
        original: bytes | None,
        *,
        stage: str,
        reason: Reason | str,
        message: str,
        event: Any | None = None,
        message_id: str | None = None,
    ) -> OutRecord:
        """The DLQ record for an input, to be sent with the rest of its batch."""
        msg = event.message if event is not None else None
        record = dead_letter(
            original or b"",
            stage=stage,
            reason=reason,
            message=message,
            topic=msg.topic if msg is not None else None,
            partition=msg.partition if msg is not None else None,
            offset=msg.offset if msg is not None else None,
            message_id=message_id,
        )
        self.metrics.dead_letters.labels(stage, str(reason)).inc()
        key = message_id.encode() if message_id else None
        return (topics.EVENTS_DLQ, self.encode_dead_letter(record), key, None)

    def observe_batch(self, stage: str, events: list[Any], out: list[OutRecord]) -> None:
        """Per-batch metrics: counted once per batch, not per event."""
        if events:
            self.metrics.events_in.labels(stage, events[0].message.topic).inc(len(events))
        per_topic: dict[str, int] = {}
        for record in out:
            per_topic[record[0]] = per_topic.get(record[0], 0) + 1
        for topic, n in per_topic.items():
            self.metrics.events_out.labels(stage, topic).inc(n)

    async def decode(self, data: bytes | None, reader: str) -> tuple[int, dict[str, Any]]:
        """Decode, waiting out registry outages instead of dead-lettering good records."""
        delay = 0.5
        while True:
            try:
                return self.serde.decode(data, reader=reader)
            except RegistryUnavailable as exc:
                log.warning("schema registry unavailable, retrying in %.1fs: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)


BatchHandler = Callable[[Any, Sequence[Any]], Awaitable[list[OutRecord]]]


async def run_batches(p: Pipeline, stream: Any, stage: str, handle: BatchHandler) -> None:
    """The loop every agent shares: take a batch, let ``handle`` turn it into output
    records, deliver them (awaiting the broker's acks), then ack the batch to Faust."""
    settings = p.settings
    async for events in take_batches(
        stream, settings.cdp_worker_batch_size, settings.cdp_worker_batch_within_s
    ):
        started = time.perf_counter()
        out = await handle(stream, events)
        await p.sender.send(out)
        p.observe_batch(stage, events, out)
        p.metrics.batch_seconds.labels(stage).observe(time.perf_counter() - started)


async def take_batches(stream: Any, max_: int, linger: float) -> AsyncIterator[list[Any]]:
    """Batches of a Faust stream's events, acked only once the consumer asks for more.

    Faust's ``Stream.take_events`` stops filling its buffer while a batch is
    processed (and its outputs acknowledged), then waits up to ``within`` from
    the start of the next wait even when events are there. Here the stream keeps
    filling the next batch meanwhile, and a batch is handed over ``linger``
    seconds after its first event (or at once when ``max_`` events are waiting):
    under load a batch is what arrived during the previous one, below capacity an
    event waits at most ``linger`` per hop.

    A batch is acked only when the caller asks for the next one; if the caller
    fails or is cancelled, nothing of it is acked (Faust's version acks in a
    ``finally``), so at-least-once holds on shutdown too. Table writes must follow
    :func:`bind_event` with no ``await`` in between: the stream's filler runs
    whenever the caller awaits (it runs in its own task, so it does not change the
    caller's current event).
    """
    buffer: list[Any] = []
    arrived = asyncio.Event()
    full = asyncio.Event()
    taken = asyncio.Event()
    clock = asyncio.get_running_loop().time
    first_at = 0.0

    async def add_to_buffer(value: Any) -> Any:
        nonlocal first_at
        try:
            event = stream.current_event
            if event is None:
                raise RuntimeError("take buffer found current_event is None")
            if not buffer:
                first_at = clock()
            buffer.append(event)
            arrived.set()
            if len(buffer) >= max_:
                full.set()
                taken.clear()
                await stream.wait(taken)  # never more than max_ waiting
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("Error adding to take buffer: %r", exc)
            await stream.crash(exc)
        return value

    enable_acks = stream.enable_acks
    stream.enable_acks = False  # acked here, after the batch is delivered
    stream.add_processor(add_to_buffer)
    stream._enable_passive(aiter(stream.channel))
    try:
        while not stream.should_stop:
            if not buffer:
                await stream.wait_for_stopped(arrived)
            wait = first_at + linger - clock()
            if buffer and len(buffer) < max_ and wait > 0:
                await stream.wait_for_stopped(full, timeout=wait)
            if not buffer:
                arrived.clear()
                continue
            batch = buffer[:]
            buffer.clear()
            arrived.clear()
            full.clear()
            taken.set()
            yield batch
            for event in batch:
                await stream.ack(event)
    finally:
        stream.enable_acks = enable_acks
        stream._processors.remove(add_to_buffer)


def bind_event(stream: Any, event: Any) -> None:
    """Make ``event`` Faust's current event while a batch from ``take_events`` is processed.

    Table writes find the changelog partition through the current event; in a
    batch Faust does not set it per event, so a write would otherwise fail (or
    land in the wrong changelog partition).
    """
    stream._set_current_event(event)


def worker_label(settings: Settings) -> str:
    return f"{settings.cdp_worker_id}@{socket.gethostname()}:{os.getpid()}"


def build_pipeline(
    settings: Settings,
    *,
    serde: AvroSerde | None = None,
    app: faust.App | None = None,
    web_enabled: bool = True,
) -> Pipeline:
    from streams.audiences import agents as audience_agents
    from streams.identity import agents as identity_agents
    from streams.ingest import agents as ingest_agents
    from streams.profiles import agents as profile_agents
    from streams.profiles.api import register_profile_api
    from streams.recommendations import agents as recommendation_agents

    serde = serde or AvroSerde.from_url(settings.schema_registry_url)
    app = app or create_app(settings, web_enabled=web_enabled)
    p = settings.cdp_topic_partitions

    def raw_topic(name: str) -> Any:
        return app.topic(
            name, partitions=p, key_serializer="raw", value_serializer="raw", allow_empty=True
        )

    for topic in (topics.EVENTS_RAW, topics.RECOMMENDATIONS_UPDATES):
        serde.schema_id(topic)  # register value schemas up front (fail fast on a bad registry)
    pipeline = Pipeline(
        app=app,
        settings=settings,
        serde=serde,
        limits=Limits.from_settings(settings),
        worker_label=worker_label(settings),
        raw_topic=raw_topic(topics.EVENTS_RAW),
        identity_topic=raw_topic(
            topics.internal_topic(settings.cdp_worker_id, topics.INTERNAL_IDENTITY_SUFFIX)
        ),
        profile_topic=raw_topic(
            topics.internal_topic(settings.cdp_worker_id, topics.INTERNAL_PROFILE_SUFFIX)
        ),
        recommendations_topic=raw_topic(topics.RECOMMENDATIONS_UPDATES),
        identity_links=app.Table(IDENTITY_LINKS_TABLE, default=None, partitions=p),
        profile_traits=app.Table(PROFILE_TRAITS_TABLE, default=None, partitions=p),
        profile_recommendations=app.Table(
            PROFILE_RECOMMENDATIONS_TABLE, default=None, partitions=p
        ),
        encode_enriched=serde.encoder(topics.EVENTS_ENRICHED),
        encode_dead_letter=serde.encoder(topics.EVENTS_DLQ),
        sender=BatchSender(ReliableProducer(settings)),
        metrics=PipelineMetrics(),
    )
    ingest_agents.register(pipeline)
    identity_agents.register(pipeline)
    recommendation_agents.register(pipeline)
    profile_agents.register(pipeline)
    audience_agents.register(pipeline)  # no-op unless CDP_AUDIENCES_CONFIG is set
    if web_enabled:
        register_metrics(pipeline)
    register_profile_api(pipeline)
    return pipeline
