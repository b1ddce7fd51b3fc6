"""The producer library for teams that write Segment-spec events straight to Kafka.

It judges every call with the same :func:`streams.events.from_segment` the
collector and the worker use, so a call the pipeline would dead-letter fails at
the call site instead of surfacing hours later in ``cdp.events.dlq``. What passes
is encoded once with the topic's cached Avro encoder (the registry is asked once
per schema, never per event) and produced with the idempotent ``acks=all``
:class:`~sources.kafka_producer.ReliableProducer`.

Every call returns a :class:`concurrent.futures.Future` that resolves to the
message's id only once the broker has the record; the ``a*`` variants await the
same thing from asyncio. :meth:`EventPublisher.flush` tells, per flush window,
how many records the broker took and which ones it did not.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, Self

from confluent_kafka import Message

from sources.kafka_producer import DeliveryFailed, QueueFull, ReliableProducer
from streams import topics
from streams.events import (
    EventRejected,
    Limits,
    Reason,
    dumps_json,
    from_segment,
    identity_key,
)
from streams.serde import AvroSerde, Encoder
from streams.settings import Settings, get_settings

__all__ = [
    "DEFAULT_SOURCE_ID",
    "LIBRARY",
    "PINNED_PRODUCER_SETTINGS",
    "DeliveryFailed",
    "DeliveryTracker",
    "EventPublisher",
    "EventRejected",
    "FailedMessage",
    "FlushResult",
    "ProductInput",
    "QueueFull",
    "Timestamp",
    "recommendation_record",
]

DEFAULT_SOURCE_ID: Final = "publisher"
#: Stamped into ``context.library`` by the Segment-style calls, as Segment's SDKs
#: do, so a bad event in the DLQ can be traced back to the library that sent it.
LIBRARY: Final[dict[str, str]] = {"name": "cdpflow-publisher", "version": "0.1.0"}
#: How many failed message ids a flush window keeps; the counts stay exact beyond it.
MAX_FAILURES_KEPT: Final = 100_000
#: librdkafka settings ``overrides`` may not change: they carry the library's promises
#: (acks=all + idempotence: no loss, no duplicates from retries; murmur2: a key lands on
#: the partition a Java, Go or Faust producer would pick; a delivery report per record).
PINNED_PRODUCER_SETTINGS: Final = frozenset(
    {
        "acks",
        "request.required.acks",
        "enable.idempotence",
        "partitioner",
        "partitioner_cb",
        "delivery.report.only.error",
        "on_delivery",
        "dr_cb",
        "dr_msg_cb",
    }
)
#: Avro ``long`` range: an epoch-millis value outside it cannot be encoded at all.
_LONG_MIN: Final = -(2**63)
_LONG_MAX: Final = 2**63 - 1

#: When an event happened: aware or naive (= UTC) datetime, ISO-8601 text or epoch millis.
Timestamp = datetime | str | int
#: A recommended product: ``(product_id, score)`` or ``{productId, score, reason?, category?}``.
ProductInput = tuple[str, float] | Mapping[str, Any]

_PRODUCT_KEYS: Final = frozenset({"productId", "score", "reason", "category"})


@dataclass(frozen=True, slots=True)
class FailedMessage:
    """A record the broker did not take, after librdkafka's own retries."""

    message_id: str
    error: str
    retriable: bool


@dataclass(frozen=True, slots=True)
class FlushResult:
    """Outcome of the records that completed since the previous flush.

    ``pending`` counts records still in flight when the flush timed out; their
    outcome is reported by a later flush.
    """

    delivered: int
    failed: int
    pending: int
    failures: list[FailedMessage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.pending == 0

    @property
    def failed_ids(self) -> list[str]:
        return [f.message_id for f in self.failures]


class DeliveryTracker:
    """Counts broker outcomes of many futures without keeping the futures.

    Holding every future until a flush would grow without bound on a busy
    producer; a counter and the (capped) failure list are all a flush needs.
    Thread-safe: outcomes arrive on librdkafka's poll thread.
    """

    def __init__(self, max_failures_kept: int = MAX_FAILURES_KEPT) -> None:
        self._cond = threading.Condition()
        self._max_failures = max_failures_kept
        self._outstanding = 0
        self._delivered = 0
        self._failed = 0
        self._failures: list[FailedMessage] = []

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def begin(self) -> None:
        """Count a record as in flight before it is handed to the producer."""
        with self._cond:
            self._outstanding += 1

    def abandon(self) -> None:
        """Undo :meth:`begin` for a record the producer refused synchronously."""
        with self._cond:
            self._outstanding -= 1
            if self._outstanding == 0:
                self._cond.notify_all()

    def delivered(self) -> None:
        with self._cond:
            self._outstanding -= 1
            self._delivered += 1
            if self._outstanding == 0:
                self._cond.notify_all()

    def failed(self, message_id: str, exc: BaseException) -> None:
        retriable = isinstance(exc, DeliveryFailed) and exc.retriable
        with self._cond:
            self._outstanding -= 1
            self._failed += 1
            if len(self._failures) < self._max_failures:
                self._failures.append(FailedMessage(message_id, str(exc), retriable))
            if self._outstanding == 0:
                self._cond.notify_all()

    def watch(self, fut: Future[str], message_id: str) -> None:
        """Track an already-submitted future (for callers that count their own share)."""
        self.begin()

        def done(f: Future[str]) -> None:
            exc = f.exception()
            if exc is None:
                self.delivered()
            else:
                self.failed(message_id, exc)

        fut.add_done_callback(done)

    def wait(self, timeout: float | None) -> bool:
        """Block until nothing is in flight; False if the timeout passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._outstanding <= 0, timeout)

    def take(self) -> FlushResult:
        """The outcomes since the last take, and start a new window."""
        with self._cond:
            result = FlushResult(
                delivered=self._delivered,
                failed=self._failed,
                pending=max(self._outstanding, 0),
                failures=self._failures,
            )
            self._delivered = 0
            self._failed = 0
            self._failures = []
        return result


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _timestamp_value(value: Timestamp) -> str | int:
    """What a Segment client would put on the wire for ``value``."""
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _generated_at_ms(value: datetime | int | None) -> int:
    if value is None:
        return _now_ms()
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return int(value.timestamp() * 1000)
    if isinstance(value, bool) or not isinstance(value, int):
        raise EventRejected(
            Reason.INVALID_RECOMMENDATION, "generatedAt must be a datetime or epoch millis"
        )
    if not _LONG_MIN <= value <= _LONG_MAX:
        raise EventRejected(Reason.INVALID_RECOMMENDATION, "generatedAt is out of range")
    return value


def _encode(encoder: Encoder, record: dict[str, Any], reason: Reason) -> bytes:
    """Avro-encode a validated record; text Avro cannot carry (a lone surrogate such as
    ``"\\ud800"`` is not UTF-8) is the caller's mistake, raised as EventRejected."""
    try:
        return encoder(record)
    except (UnicodeError, OverflowError) as exc:
        raise EventRejected(reason, f"unencodable value: {exc}") from exc


def _bad_rec(message: str) -> EventRejected:
    return EventRejected(Reason.INVALID_RECOMMENDATION, message)


def _opt_text(item: Mapping[str, Any], key: str, position: int) -> str | None:
    value = item.get(key)
    if value is None or isinstance(value, str):
        return value
    raise _bad_rec(f"products[{position}].{key} must be a string")


def _product(item: ProductInput, position: int) -> dict[str, Any]:
    if isinstance(item, Mapping):
        unknown = set(item) - _PRODUCT_KEYS
        if unknown:
            raise _bad_rec(
                f"products[{position}] has unknown key(s) {', '.join(sorted(map(str, unknown)))}"
            )
        product_id: Any = item.get("productId")
        score: Any = item.get("score")
        reason = _opt_text(item, "reason", position)
        category = _opt_text(item, "category", position)
    elif isinstance(item, tuple) and len(item) == 2:
        product_id, score = item
        reason = category = None
    else:
        raise _bad_rec(f"products[{position}] must be (productId, score) or a mapping")
    if not isinstance(product_id, str) or not product_id.strip():
        raise _bad_rec(f"products[{position}].productId must be a non-empty string")
    if isinstance(score, bool) or not isinstance(score, int | float):
        raise _bad_rec(f"products[{position}].score must be a finite number")
    try:
        as_float = float(score)  # an int beyond the float range overflows here
    except OverflowError:
        as_float = math.inf
    if not math.isfinite(as_float):
        raise _bad_rec(f"products[{position}].score must be a finite number")
    return {
        "productId": product_id,
        "score": as_float,
        "rank": position + 1,
        "reason": reason,
        "category": category,
    }


def recommendation_record(
    customer_id: str,
    products: Sequence[ProductInput],
    model_version: str,
    generated_at: datetime | int | None = None,
    update_id: str | None = None,
) -> dict[str, Any]:
    """A RecommendationUpdate record, or EventRejected(INVALID_RECOMMENDATION).

    Ranks follow the given order: the model already sorted them, and re-sorting
    by score here would silently override business re-ranking.
    """
    if not isinstance(customer_id, str) or not customer_id.strip():
        raise _bad_rec("customerId must be a non-empty string")
    if not isinstance(model_version, str):
        raise _bad_rec("modelVersion must be a string")
    if isinstance(products, str | bytes | Mapping) or not isinstance(products, Sequence):
        raise _bad_rec("products must be a list")
    ranked = [_product(item, i) for i, item in enumerate(products)]
    seen: set[str] = set()
    for p in ranked:
        if p["productId"] in seen:
            raise _bad_rec(f"productId {p['productId'][:80]!r} appears more than once")
        seen.add(p["productId"])
    if update_id is None:
        update_id = str(uuid.uuid4())
    elif not isinstance(update_id, str) or not update_id:
        raise _bad_rec("updateId must be a non-empty string")
    return {
        "updateId": update_id,
        "customerId": customer_id,
        "products": ranked,
        "modelVersion": model_version,
        "generatedAt": _generated_at_ms(generated_at),
    }


class EventPublisher:
    """Segment-SDK-shaped calls that land as validated Avro records in Kafka.

    One instance is meant to live as long as the process: it owns (unless given)
    a producer with its poll thread, and caches the topic encoders.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        producer: ReliableProducer | None = None,
        serde: AvroSerde | None = None,
        block_when_full: bool = True,
        source_id: str = DEFAULT_SOURCE_ID,
        queue_timeout: float = 30.0,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        """``overrides`` tunes the producer this publisher creates (librdkafka property
        names, e.g. ``{"linger.ms": 20, "batch.size": 262144}``); connection and
        security settings come from ``settings``. The settings behind the delivery
        guarantees (:data:`PINNED_PRODUCER_SETTINGS`) cannot be overridden.
        """
        if overrides:
            if producer is not None:
                raise ValueError("overrides tune the publisher's own producer; not with producer=")
            pinned = sorted(set(overrides) & PINNED_PRODUCER_SETTINGS)
            if pinned:
                raise ValueError(f"{', '.join(pinned)} cannot be overridden (delivery guarantees)")
        self._settings = settings if settings is not None else get_settings()
        self._serde = (
            serde if serde is not None else AvroSerde.from_url(self._settings.schema_registry_url)
        )
        self._owns_producer = producer is None
        self._producer = (
            producer
            if producer is not None
            else ReliableProducer(self._settings, **dict(overrides or {}))
        )
        self._block = block_when_full
        self._queue_timeout = queue_timeout
        self._source_id = source_id
        self._limits = Limits.from_settings(self._settings)
        self._size_check_from = self._limits.max_event_bytes // 2
        self._tracker = DeliveryTracker()
        self._event_encoder: Encoder | None = None
        self._rec_encoder: Encoder | None = None
        self._closed = False

    @property
    def source_id(self) -> str:
        return self._source_id

    @property
    def outstanding(self) -> int:
        """Records handed to the producer whose broker outcome is not known yet."""
        return self._tracker.outstanding

    # -- preparing records (validate + encode; raises before anything is sent) --

    def _encode_event(self, record: dict[str, Any]) -> bytes:
        encoder = self._event_encoder
        if encoder is None:
            encoder = self._event_encoder = self._serde.encoder(topics.EVENTS_RAW)
        return _encode(encoder, record, Reason.SCHEMA_INVALID)

    def _prepare_event(self, message: Mapping[str, Any]) -> tuple[str, bytes, str]:
        try:
            record = from_segment(
                message, received_at_ms=_now_ms(), source_id=self._source_id, limits=self._limits
            )
        except EventRejected:
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            # A value JSON cannot hold (a set, a Decimal, an object) or a timestamp no
            # clock can show: still the caller's mistake, still raised before sending.
            raise EventRejected(Reason.SCHEMA_INVALID, f"unencodable message: {exc}") from exc
        value = self._encode_event(record)
        if len(value) > self._size_check_from:
            self._check_size(message, len(value))
        return identity_key(record), value, record["messageId"]

    def _check_size(self, message: Mapping[str, Any], encoded: int) -> None:
        """The collector's size rule (compact JSON of the message), for large events only.

        Every free-form part of an event is JSON text inside the Avro value, so
        the Avro size is never far below the JSON size: below half the limit
        the JSON cannot be over it, and small events skip this dump entirely.
        """
        limit = self._limits.max_event_bytes
        try:
            size = len(dumps_json(message).encode())
        except (TypeError, ValueError):
            size = encoded
        if size > limit:
            raise EventRejected(Reason.EVENT_TOO_LARGE, f"message is larger than {limit} bytes")

    def _prepare_recommendation(
        self,
        customer_id: str,
        products: Sequence[ProductInput],
        model_version: str,
        generated_at: datetime | int | None,
        update_id: str | None,
    ) -> tuple[str, bytes, str]:
        record = recommendation_record(
            customer_id, products, model_version, generated_at, update_id
        )
        encoder = self._rec_encoder
        if encoder is None:
            encoder = self._rec_encoder = self._serde.encoder(topics.RECOMMENDATIONS_UPDATES)
        return (
            customer_id,
            _encode(encoder, record, Reason.INVALID_RECOMMENDATION),
            record["updateId"],
        )

    # -- handing records to the producer --

    def _submit(self, topic: str, key: str, value: bytes, ident: str, block: bool) -> Future[str]:
        if self._closed:
            raise RuntimeError("publisher is closed")
        tracker = self._tracker
        tracker.begin()
        try:
            inner = self._producer.produce(
                topic, value, key, block=block, timeout=self._queue_timeout
            )
        except BaseException:
            tracker.abandon()
            raise
        outer: Future[str] = Future()
        outer.set_running_or_notify_cancel()  # a caller's cancel() must not orphan the count

        def resolve(f: Future[Message]) -> None:
            exc = f.exception()
            if exc is None:
                outer.set_result(ident)
                tracker.delivered()
            else:
                outer.set_exception(exc)
                tracker.failed(ident, exc)

        inner.add_done_callback(resolve)
        return outer

    async def _asubmit(self, topic: str, key: str, value: bytes, ident: str) -> str:
        """Wait for queue space without blocking the event loop, then for the broker."""
        deadline = time.monotonic() + self._queue_timeout
        while True:
            try:
                fut = self._submit(topic, key, value, ident, block=False)
                break
            except QueueFull:
                if not self._block or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.005)
        return await asyncio.wrap_future(fut)

    # -- public API: any Segment message --

    def send(self, message: Mapping[str, Any]) -> Future[str]:
        """Publish a Segment-spec JSON message as any client sends it; resolves to its messageId."""
        key, value, ident = self._prepare_event(message)
        return self._submit(topics.EVENTS_RAW, key, value, ident, self._block)

    async def asend(self, message: Mapping[str, Any]) -> str:
        key, value, ident = self._prepare_event(message)
        return await self._asubmit(topics.EVENTS_RAW, key, value, ident)

    # -- public API: Segment SDK calls --

    def track(
        self,
        user_id: str | None = None,
        event: str | None = None,
        properties: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        timestamp: Timestamp | None = None,
        anonymous_id: str | None = None,
        integrations: Mapping[str, Any] | None = None,
        message_id: str | None = None,
    ) -> Future[str]:
        return self.send(
            _track(
                user_id,
                event,
                properties,
                context,
                timestamp,
                anonymous_id,
                integrations,
                message_id,
            )
        )

    async def atrack(
        self,
        user_id: str | None = None,
        event: str | None = None,
        properties: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        timestamp: Timestamp | None = None,
        anonymous_id: str | None = None,
        integrations: Mapping[str, Any] | None = None,
        message_id: str | None = None,
    ) -> str:
        return await self.asend(
            _track(
                user_id,
                event,
                properties,
                context,
                timestamp,
                anonymous_id,
                integrations,
                message_id,
            )
        )

    def identify(
        self,
        user_id: str | None = None,
        traits: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        timestamp: Timestamp | None = None,
        anonymous_id: str | None = None,
        integrations: Mapping[str, Any] | None = None,
        message_id: str | None = None,
    ) -> Future[str]:
        return self.send(
            _identify(user_id, traits, context, timestamp, anonymous_id, integrations, message_id)
        )

    async def aidentify(
        self,
        user_id: str | None = None,
        traits: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        timestamp: Timestamp | None = None,
        anonymous_id: str | None = None,
        integrations: Mapping[str, Any] | None = None,
        message_id: str | None = None,
    ) -> str:
        return await self.asend(
            _identify(user_id, traits, context, timestamp, anonymous_id, integrations, message_id)
        )

    def page(
        self,
        user_id: str | None = None,
        category: str | None = None,
        name: str | None = None,
        properties: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        timestamp: Timestamp | None = None,
        anonymous_id: str | None = None,
        integrations: Mapping[str, Any] | None = None,
        message_id: str | None = None,
    ) -> Future[str]:
        return self.send(
            _view(
                "page",
                user_id,
                category,
                name,
                properties,
                context,
                timestamp,
                anonymous_id,
                integrations,
                message_id,
            )
        )

    async def apage(
        self,
        user_id: str | None = None,
        category: str | None = None,
        name: str | None = None,
        properties: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        timestamp: Timestamp | None = None,
        anonymous_id: str | None = None,
        integrations: Mapping[str, Any] | None = None,
        message_id: str | None = None,
    ) -> str:
        return await self.asend(
            _view(
                "page",
                user_id,
                category,
                name,
                properties,
                context,
                timestamp,
                anonymous_id,
                integrations,
                message_id,
            )
        )

    def screen(
        self,
        user_id: str | None = None,
        category: str | None = None,
        name: str | None = None,
        properties: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        timestamp: Timestamp | None = None,
        anonymous_id: str | None = None,
        integrations: Mapping[str, Any] | None = None,
        message_id: str | None = None,
    ) -> Future[str]:
        return self.send(
            _view(
                "screen",
                user_id,
                category,
                name,
                properties,
                context,
                timestamp,
                anonymous_id,
                integrations,
                message_id,
            )
        )

    async def ascreen(
        self,
        user_id: str | None = None,
        category: str | None = None,
        name: str | None = None,
        properties: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        timestamp: Timestamp | None = None,
        anonymous_id: str | None = None,
        integrations: Mapping[str, Any] | None = None,
        message_id: str | None = None,
    ) -> str:
        return await self.asend(
            _view(
                "screen",
                user_id,
                category,
                name,
                properties,
                context,
                timestamp,
                anonymous_id,
                integrations,
                message_id,
            )
        )

    def group(
        self,
        user_id: str | None = None,
        group_id: str | None = None,
        traits: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        timestamp: Timestamp | None = None,
        anonymous_id: str | None = None,
        integrations: Mapping[str, Any] | None = None,
        message_id: str | None = None,
    ) -> Future[str]:
        return self.send(
            _group(
                user_id,
                group_id,
                traits,
                context,
                timestamp,
                anonymous_id,
                integrations,
                message_id,
            )
        )

    async def agroup(
        self,
        user_id: str | None = None,
        group_id: str | None = None,
        traits: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        timestamp: Timestamp | None = None,
        anonymous_id: str | None = None,
        integrations: Mapping[str, Any] | None = None,
        message_id: str | None = None,
    ) -> str:
        return await self.asend(
            _group(
                user_id,
                group_id,
                traits,
                context,
                timestamp,
                anonymous_id,
                integrations,
                message_id,
            )
        )

    def alias(
        self,
        previous_id: str | None = None,
        user_id: str | None = None,
        context: Mapping[str, Any] | None = None,
        timestamp: Timestamp | None = None,
        integrations: Mapping[str, Any] | None = None,
        message_id: str | None = None,
    ) -> Future[str]:
        return self.send(_alias(previous_id, user_id, context, timestamp, integrations, message_id))

    async def aalias(
        self,
        previous_id: str | None = None,
        user_id: str | None = None,
        context: Mapping[str, Any] | None = None,
        timestamp: Timestamp | None = None,
        integrations: Mapping[str, Any] | None = None,
        message_id: str | None = None,
    ) -> str:
        return await self.asend(
            _alias(previous_id, user_id, context, timestamp, integrations, message_id)
        )

    # -- public API: recommendations --

    def publish_recommendations(
        self,
        customer_id: str,
        products: Sequence[ProductInput],
        model_version: str,
        generated_at: datetime | int | None = None,
        update_id: str | None = None,
    ) -> Future[str]:
        """Replace a customer's ranked list; resolves to the updateId once acknowledged."""
        key, value, ident = self._prepare_recommendation(
            customer_id, products, model_version, generated_at, update_id
        )
        return self._submit(topics.RECOMMENDATIONS_UPDATES, key, value, ident, self._block)

    async def apublish_recommendations(
        self,
        customer_id: str,
        products: Sequence[ProductInput],
        model_version: str,
        generated_at: datetime | int | None = None,
        update_id: str | None = None,
    ) -> str:
        key, value, ident = self._prepare_recommendation(
            customer_id, products, model_version, generated_at, update_id
        )
        return await self._asubmit(topics.RECOMMENDATIONS_UPDATES, key, value, ident)

    # -- lifecycle --

    def flush(self, timeout: float = 30.0) -> FlushResult:
        """Wait for every record sent so far; report what completed since the last flush."""
        deadline = time.monotonic() + timeout
        self._producer.flush(timeout)
        # Delivery callbacks may still be running on the poll thread after flush returns.
        self._tracker.wait(max(0.0, deadline - time.monotonic()))
        return self._tracker.take()

    async def aflush(self, timeout: float = 30.0) -> FlushResult:  # noqa: ASYNC109
        # The wait happens in librdkafka on a worker thread, which asyncio.timeout() could
        # not interrupt; librdkafka's own timeout is the one that bounds it.
        return await asyncio.to_thread(self.flush, timeout)

    def close(self, timeout: float = 30.0) -> FlushResult:
        """Flush, then stop the producer if this publisher created it.

        Records still in flight after ``timeout`` are reported as ``pending`` and
        abandoned with an owned producer: their futures never resolve.
        """
        if self._closed:
            return self._tracker.take()
        result = self.flush(timeout)
        self._closed = True
        if self._owns_producer:
            self._producer.close(timeout=0)
        return result

    async def aclose(self, timeout: float = 30.0) -> FlushResult:  # noqa: ASYNC109
        return await asyncio.to_thread(self.close, timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


# -- Segment message builders (shared by the sync and async calls) --


def _as_dict(value: Any) -> Any:
    """The API takes any Mapping; the event rules (shared with the collector, which only
    ever sees JSON objects) take dicts. Anything else is left for them to reject."""
    if isinstance(value, Mapping) and not isinstance(value, dict):
        return dict(value)
    return value


def _base(
    event_type: str,
    user_id: str | None,
    anonymous_id: str | None,
    context: Mapping[str, Any] | None,
    timestamp: Timestamp | None,
    integrations: Mapping[str, Any] | None,
    message_id: str | None,
) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": event_type}
    if user_id is not None:
        msg["userId"] = user_id
    if anonymous_id is not None:
        msg["anonymousId"] = anonymous_id
    if context is None:
        msg["context"] = {"library": LIBRARY}
    elif isinstance(context, Mapping) and "library" not in context:
        msg["context"] = {**context, "library": LIBRARY}
    else:
        msg["context"] = _as_dict(context)
    if timestamp is not None:
        msg["timestamp"] = _timestamp_value(timestamp)
    if integrations is not None:
        msg["integrations"] = _as_dict(integrations)
    if message_id is not None:
        msg["messageId"] = message_id
    return msg


def _track(
    user_id: str | None,
    event: str | None,
    properties: Mapping[str, Any] | None,
    context: Mapping[str, Any] | None,
    timestamp: Timestamp | None,
    anonymous_id: str | None,
    integrations: Mapping[str, Any] | None,
    message_id: str | None,
) -> dict[str, Any]:
    msg = _base("track", user_id, anonymous_id, context, timestamp, integrations, message_id)
    if event is not None:
        msg["event"] = event
    if properties is not None:
        msg["properties"] = _as_dict(properties)
    return msg


def _identify(
    user_id: str | None,
    traits: Mapping[str, Any] | None,
    context: Mapping[str, Any] | None,
    timestamp: Timestamp | None,
    anonymous_id: str | None,
    integrations: Mapping[str, Any] | None,
    message_id: str | None,
) -> dict[str, Any]:
    msg = _base("identify", user_id, anonymous_id, context, timestamp, integrations, message_id)
    if traits is not None:
        msg["traits"] = _as_dict(traits)
    return msg


def _view(
    event_type: str,
    user_id: str | None,
    category: str | None,
    name: str | None,
    properties: Mapping[str, Any] | None,
    context: Mapping[str, Any] | None,
    timestamp: Timestamp | None,
    anonymous_id: str | None,
    integrations: Mapping[str, Any] | None,
    message_id: str | None,
) -> dict[str, Any]:
    msg = _base(event_type, user_id, anonymous_id, context, timestamp, integrations, message_id)
    if category is not None:
        msg["category"] = category
    if name is not None:
        msg["name"] = name
    if properties is not None:
        msg["properties"] = _as_dict(properties)
    return msg


def _group(
    user_id: str | None,
    group_id: str | None,
    traits: Mapping[str, Any] | None,
    context: Mapping[str, Any] | None,
    timestamp: Timestamp | None,
    anonymous_id: str | None,
    integrations: Mapping[str, Any] | None,
    message_id: str | None,
) -> dict[str, Any]:
    msg = _base("group", user_id, anonymous_id, context, timestamp, integrations, message_id)
    if group_id is not None:
        msg["groupId"] = group_id
    if traits is not None:
        msg["traits"] = _as_dict(traits)
    return msg


def _alias(
    previous_id: str | None,
    user_id: str | None,
    context: Mapping[str, Any] | None,
    timestamp: Timestamp | None,
    integrations: Mapping[str, Any] | None,
    message_id: str | None,
) -> dict[str, Any]:
    msg = _base("alias", user_id, None, context, timestamp, integrations, message_id)
    if previous_id is not None:
        msg["previousId"] = previous_id
    return msg
