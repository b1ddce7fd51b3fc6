"""Dead letters of the sinks: ``cdp.sink.dlq.<destination>``, Avro ``cdpflow.SinkDeadLetter``.

A dead letter carries everything needed to understand and to replay a refusal:
the reason, the response, the request it was part of, and the enriched record
exactly as it was read. Credentials never get in: secret headers and query
parameters are replaced, every free-text field goes through the log redactor
(emails, ``key=...``, Basic/Bearer tokens) and through an exact-match scrub of
the destination's own secret values.

The schema is not one of the pipeline's topic schemas (``streams.schemas``), so it
is registered here, under ``cdp.sink.dlq.<destination>-value``, and encoded with
fastavro behind the Confluent 5-byte header like every other cdpflow record.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from confluent_kafka import Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
)
from fastavro import schemaless_writer
from pydantic import SecretStr
from pydantic_settings import BaseSettings

from sinks.base import DeliveryError, HttpRequest, HttpResponse
from sources.kafka_producer import DeliveryFailed, QueueFull, ReliableProducer
from streams import schemas
from streams.events import now_ms
from streams.logs import redact
from streams.serde import HEADER, MAGIC_BYTE, AvroSerde
from streams.settings import Settings
from streams.topics import TopicSpec, ensure_topics, sink_dlq_topic, subject_for

log = logging.getLogger("cdpflow.sink.dlq")

SINK_DEAD_LETTER = "cdpflow.SinkDeadLetter"
REDACTED = "<redacted>"
MAX_RESPONSE_BODY = 4096
MAX_MESSAGE = 2000
#: Dead letters are evidence and replay input: keep them a month, like cdp.events.dlq.
DLQ_RETENTION_MS = 30 * 24 * 3600 * 1000
#: A dead letter carries the original record plus a few KB; allow far more than the
#: 1 MB broker default so an oversize event (the classic reason) still fits.
DLQ_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DLQ_PRODUCER_OVERRIDES = {"message.max.bytes": DLQ_MAX_MESSAGE_BYTES}
BY_REFERENCE_NOTE = " [original record too large for the DLQ topic: kept by reference]"


@dataclass(slots=True)
class SourceRecord:
    """Where an event came from, kept with it through delivery (``MappedEvent.source``)."""

    topic: str
    partition: int | None
    offset: int | None
    value: bytes
    message_id: str | None = None
    event_type: str | None = None
    event_name: str | None = None
    timestamp_ms: int | None = None
    received_at_ms: int | None = None
    #: ``partition:offset`` of the dead letter this record is a replay of.
    replay_of: str | None = None


# --------------------------------------------------------------------------- topics, codec


def dlq_topic_specs(settings: Settings, destinations: Iterable[str]) -> list[TopicSpec]:
    return [
        TopicSpec(
            sink_dlq_topic(name),
            settings.cdp_topic_partitions,
            {
                "retention.ms": str(DLQ_RETENTION_MS),
                "max.message.bytes": str(DLQ_MAX_MESSAGE_BYTES),
            },
        )
        for name in destinations
    ]


def ensure_dlq_topics(settings: Settings, destinations: Iterable[str]) -> list[str]:
    """Create missing DLQ topics; raise ``max.message.bytes`` on existing ones that are lower.

    (Topics created before the limit was raised would otherwise refuse the dead
    letters of oversize events; those are still kept, by reference.)
    """
    specs = dlq_topic_specs(settings, destinations)
    created = ensure_topics(settings, specs)
    existing = [s.name for s in specs if s.name not in created]
    if existing:
        try:
            _raise_max_message_bytes(settings, existing)
        except Exception as exc:  # not allowed to alter configs: the fallback covers it
            log.warning("could not check max.message.bytes of %s: %s", existing, exc)
    return created


def _raise_max_message_bytes(settings: Settings, names: list[str]) -> None:
    admin = AdminClient(settings.librdkafka_common())
    key = "max.message.bytes"
    resources = [ConfigResource(ConfigResource.Type.TOPIC, n) for n in names]
    low = []
    for resource, fut in admin.describe_configs(resources, request_timeout=15).items():
        entry = fut.result().get(key)
        if entry is None or int(entry.value) < DLQ_MAX_MESSAGE_BYTES:
            low.append(resource.name)
    if not low:
        return
    changes = [
        ConfigResource(
            ConfigResource.Type.TOPIC,
            n,
            incremental_configs=[
                ConfigEntry(
                    key, str(DLQ_MAX_MESSAGE_BYTES), incremental_operation=AlterConfigOpType.SET
                )
            ],
        )
        for n in low
    ]
    for fut in admin.incremental_alter_configs(changes, request_timeout=15).values():
        fut.result()
    log.info("raised %s of %s to %d", key, ", ".join(low), DLQ_MAX_MESSAGE_BYTES)


class DlqCodec:
    """Encode dead letters for one destination's topic; decode any dead letter."""

    def __init__(self, serde: AvroSerde) -> None:
        self.serde = serde
        self._encoders: dict[str, Callable[[dict[str, Any]], bytes]] = {}

    def encoder(self, destination: str) -> Callable[[dict[str, Any]], bytes]:
        enc = self._encoders.get(destination)
        if enc is None:
            subject = subject_for(sink_dlq_topic(destination))
            schema_id = self.serde.registry.register(subject, schemas.schema_text(SINK_DEAD_LETTER))
            header = HEADER.pack(MAGIC_BYTE, schema_id)
            parsed = schemas.parsed(SINK_DEAD_LETTER)

            def enc(record: dict[str, Any]) -> bytes:
                buf = io.BytesIO()
                buf.write(header)
                schemaless_writer(buf, parsed, record)
                return buf.getvalue()

            self._encoders[destination] = enc
        return enc

    def decode(self, data: bytes) -> dict[str, Any]:
        return self.serde.decode(data, reader=SINK_DEAD_LETTER)[1]


# --------------------------------------------------------------------------- redaction


def secret_values(settings: BaseSettings | None) -> tuple[str, ...]:
    """Every SecretStr value of a settings object (scrubbed verbatim from dead letters)."""
    if settings is None:
        return ()
    out: list[str] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name, None)
        if isinstance(value, SecretStr):
            raw = value.get_secret_value()
            if len(raw) >= 4:
                out.append(raw)
    return tuple(out)


class Scrubber:
    """Log redaction plus exact removal of known secret values."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = tuple(sorted(set(secrets), key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return redact(text)


def redact_url(url: str, secret_params: Iterable[str], scrub: Scrubber) -> str:
    secret = {p.lower() for p in secret_params}
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:  # user:password@host
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, REDACTED if k.lower() in secret else v) for k, v in pairs], safe="<>"
        )
    return scrub(urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment)))


def redact_headers(
    headers: Mapping[str, str], secret_headers: Iterable[str], scrub: Scrubber
) -> dict[str, str]:
    secret = {h.lower() for h in secret_headers} | {"authorization", "proxy-authorization"}
    return {k: REDACTED if k.lower() in secret else scrub(str(v)) for k, v in headers.items()}


def request_summary(request: HttpRequest, scrub: Scrubber) -> dict[str, Any]:
    return {
        "method": request.method,
        "url": redact_url(request.url, request.secret_params, scrub),
        "headers": redact_headers(request.headers, request.secret_headers, scrub),
        "itemCount": len(request.items),
        "bodyBytes": len(request.body),
    }


def response_text(body: bytes, scrub: Scrubber) -> str:
    text = body[:MAX_RESPONSE_BODY].decode("utf-8", errors="replace")
    return scrub(text)


def build_dead_letter(
    destination: str,
    source: SourceRecord,
    error: DeliveryError,
    scrub: Scrubber,
    *,
    request: HttpRequest | None = None,
    response: HttpResponse | None = None,
    attempts: int = 0,
    failed_at_ms: int | None = None,
) -> dict[str, Any]:
    message = error.detail or error.reason
    return {
        "destination": destination,
        "reasonCode": error.reason,
        "message": scrub(message)[:MAX_MESSAGE],
        "messageId": source.message_id,
        "eventType": source.event_type,
        "eventName": scrub(source.event_name)[:200] if source.event_name else None,
        "eventTimestamp": source.timestamp_ms,
        "originalBytes": source.value,
        "sourceTopic": source.topic,
        "sourcePartition": source.partition,
        "sourceOffset": source.offset,
        "request": request_summary(request, scrub) if request is not None else None,
        "responseStatus": response.status if response is not None else None,
        "responseBody": response_text(response.body, scrub) if response is not None else None,
        "attempts": attempts,
        "failedAt": now_ms() if failed_at_ms is None else failed_at_ms,
        "replayOf": source.replay_of,
    }


# --------------------------------------------------------------------------- writing


class DeadLetterWriter:
    """Produce dead letters and return only once the broker has every one (acks=all).

    The caller marks the events' offsets done afterwards; if the broker is down
    this keeps retrying (with backoff) instead of losing a dead letter, so the
    partition's commit simply waits. A dead letter the topic cannot hold (the
    original record is over its ``max.message.bytes``) is written without the
    original, which stays reachable by source partition and offset.
    """

    def __init__(self, producer: ReliableProducer, codec: DlqCodec) -> None:
        self.producer = producer
        self.codec = codec

    async def write(self, destination: str, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        topic = sink_dlq_topic(destination)
        encode = self.codec.encoder(destination)
        pending = list(records)
        backoff = 0.5
        while pending:
            futures: list[asyncio.Future[Any]] = []
            for record in pending:
                futures.append(await self._produce(topic, encode, record))
            results = await asyncio.gather(*futures, return_exceptions=True)
            failed: list[dict[str, Any]] = []
            transient: BaseException | None = None
            for record, result in zip(pending, results, strict=True):
                if not isinstance(result, BaseException):
                    continue
                if _too_large(result) and record["originalBytes"]:
                    failed.append(_by_reference(record))
                    continue
                if not isinstance(result, DeliveryFailed):
                    raise result
                transient = result
                failed.append(record)
            if transient is not None:
                log.warning(
                    "dead letters for %s not acknowledged (%d), retrying in %.1fs: %s",
                    destination,
                    len(failed),
                    backoff,
                    transient,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
            pending = failed

    async def _produce(
        self, topic: str, encode: Callable[[dict[str, Any]], bytes], record: dict[str, Any]
    ) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        value = encode(record)
        key = record.get("messageId")
        while True:
            try:
                return asyncio.wrap_future(
                    self.producer.produce(topic, value, key=key, block=False)
                )
            except QueueFull:
                await asyncio.sleep(0.05)
            except DeliveryFailed as exc:  # refused locally (e.g. too large): same path
                failed: asyncio.Future[Any] = loop.create_future()
                failed.set_exception(exc)
                return failed


def _too_large(exc: BaseException) -> bool:
    error = getattr(exc, "error", None)
    return isinstance(error, KafkaError) and error.code() == KafkaError.MSG_SIZE_TOO_LARGE


def _by_reference(record: dict[str, Any]) -> dict[str, Any]:
    return {
        **record,
        "originalBytes": b"",
        "message": (record["message"] + BY_REFERENCE_NOTE)[: MAX_MESSAGE + len(BY_REFERENCE_NOTE)],
    }


def fetch_original(settings: Settings, topic: str, partition: int, offset: int) -> bytes | None:
    """The source record of a dead letter kept by reference (None once retention removed it)."""
    consumer = Consumer(
        {
            **settings.librdkafka_common(),
            "group.id": f"cdpflow-dlq-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, partition, offset)])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error() is not None:
                continue
            if msg.offset() == offset:
                return msg.value()
            return None  # the offset is gone (compacted or expired)
        return None
    finally:
        consumer.close()


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    partition: int
    offset: int
    record: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.partition}:{self.offset}"


def dlq_bounds(
    settings: Settings, destination: str, since_ms: int | None, until_ms: int | None
) -> dict[int, tuple[int, int]]:
    """Per partition, [first, end) offsets of dead letters written in [since, until).

    Uses the broker's time index (offsets_for_times); the end never goes past the
    high watermark at call time, so records written meanwhile (by a replay) are
    not read again.
    """
    topic = sink_dlq_topic(destination)
    consumer = Consumer(
        {**settings.librdkafka_common(), "group.id": f"cdpflow-dlq-{uuid.uuid4().hex}"}
    )
    try:
        md = consumer.list_topics(topic, timeout=15)
        meta = md.topics.get(topic)
        if meta is None or meta.error is not None:
            return {}
        parts = sorted(meta.partitions)
        marks = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15) for p in parts
        }

        def lookup(ts: int | None, default: Callable[[int], int]) -> dict[int, int]:
            if ts is None:
                return {p: default(p) for p in parts}
            found = consumer.offsets_for_times(
                [TopicPartition(topic, p, ts) for p in parts], timeout=15
            )
            return {
                tp.partition: tp.offset if tp.offset >= 0 else marks[tp.partition][1]
                for tp in found
            }

        start = lookup(since_ms, lambda p: marks[p][0])
        end = lookup(until_ms, lambda p: marks[p][1])
        return {
            p: (max(start[p], marks[p][0]), min(end[p], marks[p][1]))
            for p in parts
            if min(end[p], marks[p][1]) > max(start[p], marks[p][0])
        }
    finally:
        consumer.close()


def read_dead_letters(
    settings: Settings,
    codec: DlqCodec,
    destination: str,
    bounds: dict[int, tuple[int, int]],
) -> Generator[DeadLetterEntry, None, None]:
    """Every dead letter within ``bounds`` (see :func:`dlq_bounds`), decoded, in offset order
    per partition."""
    if not bounds:
        return
    topic = sink_dlq_topic(destination)
    consumer = Consumer(
        {
            **settings.librdkafka_common(),
            "group.id": f"cdpflow-dlq-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, p, lo) for p, (lo, _) in bounds.items()])
        remaining = {p: hi for p, (_, hi) in bounds.items()}
        idle = 0
        while remaining and idle < 40:
            batch = consumer.consume(1000, 0.5)
            idle = 0 if batch else idle + 1
            for msg in batch:
                if msg.error():
                    continue
                p, offset = msg.partition(), msg.offset()
                if p not in remaining or offset is None or offset >= remaining[p]:
                    continue
                if offset >= remaining[p] - 1:
                    remaining.pop(p)
                yield DeadLetterEntry(p, offset, codec.decode(msg.value() or b""))
    finally:
        consumer.close()
