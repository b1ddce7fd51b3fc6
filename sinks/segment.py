"""Segment destination: forward the original Segment-spec events to ``/v1/batch``.

The item is the event as the client sent it (rebuilt from the CustomerEvent
inside the EnrichedEvent: type, ids, event/name/category, properties, traits,
context, integrations), not the enriched profile: Segment does its own
enrichment downstream. ``timestamp`` is the skew-corrected event time; the
client's ``sentAt`` is not forwarded per item, only a batch-level ``sentAt`` of
our own clock, so Segment's correction ``receivedAt - (sentAt - timestamp)`` keeps
the event time even when the event is delivered hours later (after an outage or
a DLQ replay). ``messageId`` is the original one: Segment dedupes on it, so a
re-delivery after a crash is harmless.

Why the engine posts itself instead of using ``segment-analytics-python``: the SDK
queues messages and sends them from a background thread, fire-and-forget — its
``track()`` returns before anything is sent and failures only reach an
``on_error`` callback without saying which messages were in the batch. The engine
must know, per event, that Segment acknowledged it before it commits the Kafka
offset (at-least-once), and must dead-letter exactly the events Segment refused;
the SDK also drops oversized messages client-side and gives up after its own
retries. Posting ``/v1/batch`` ourselves keeps delivery, retries and commits in
one place, the same as for every other destination.

Auth: HTTP Basic with the write key as username (empty password) *and* the
``writeKey`` in the body (§1.2: either is accepted; sending both works with every
Segment API revision and with proxies that strip one of them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar

import orjson
from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from sinks.base import (
    Destination,
    DestinationSettings,
    HttpRequest,
    HttpResponse,
    ItemOutcome,
    MappedEvent,
    SinkLimits,
    basic_auth,
    status_error,
)
from sinks.registry import register
from streams.events import context_to_json, to_ms

#: Segment: 500 KB per batch body. Items are cut to 475,000 bytes (analytics-python's
#: own cap), leaving room for the envelope (writeKey, sentAt) below the hard limit.
MAX_BATCH_BYTES = 475_000
#: 32 KB per event, measured on the serialized message (as the SDK and the API do).
MAX_EVENT_BYTES = 32 * 1024
MAX_BATCH_EVENTS = 2500


class SegmentSettings(DestinationSettings):
    model_config = SettingsConfigDict(
        env_prefix="CDP_SINK_SEGMENT_", extra="forbid", case_sensitive=False
    )

    endpoint: str = Field(
        description="https://api.segment.io (US), https://events.eu1.segmentapis.com (EU), "
        "or an emulator."
    )
    write_key: SecretStr = Field(description="The Segment source's write key.")
    max_batch_events: int = Field(500, ge=1, le=MAX_BATCH_EVENTS)
    max_requests_per_second: float | None = Field(
        200.0, gt=0, description="Segment recommends at most 1,000 requests/s per workspace."
    )
    max_concurrency: int = Field(8, ge=1, le=64)
    max_batch_wait_s: float = Field(0.1, gt=0, le=60)


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    ms = to_ms(value)
    return (
        datetime.fromtimestamp(ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


_TYPE_FIELDS: dict[str, tuple[str, ...]] = {
    "track": ("event", "properties"),
    "identify": ("traits",),
    "page": ("name", "category", "properties"),
    "screen": ("name", "category", "properties"),
    "group": ("groupId", "traits"),
    "alias": ("previousId",),
}


def segment_message(event: Mapping[str, Any]) -> dict[str, Any]:
    """The Segment-spec message for one CustomerEvent record (the inverse of ``from_segment``)."""
    msg: dict[str, Any] = {"type": event["type"], "messageId": event["messageId"]}
    if event.get("userId") is not None:
        msg["userId"] = event["userId"]
    if event.get("anonymousId") is not None:
        msg["anonymousId"] = event["anonymousId"]
    for key in _TYPE_FIELDS.get(event["type"], ()):
        value = event.get(key)
        if key in ("properties", "traits"):
            parsed = orjson.loads(value or "{}")
            if parsed or key == "properties":
                msg[key] = parsed
        elif value is not None:
            msg[key] = value
    context = context_to_json(event.get("context"))
    if context:
        msg["context"] = context
    integrations = orjson.loads(event.get("integrations") or "{}")
    if integrations:
        msg["integrations"] = integrations
    msg["timestamp"] = _iso(event["timestamp"])
    if event.get("originalTimestamp") is not None:
        msg["originalTimestamp"] = _iso(event["originalTimestamp"])
    return msg


@register
class SegmentDestination(Destination[SegmentSettings]):
    name: ClassVar[str] = "segment"
    integration_names: ClassVar[tuple[str, ...]] = ("Segment", "Segment.io")
    settings_cls: ClassVar[type[DestinationSettings]] = SegmentSettings

    def __init__(self, settings: SegmentSettings) -> None:
        super().__init__(settings)
        key = settings.write_key.get_secret_value()
        self._url = settings.endpoint.rstrip("/") + "/v1/batch"
        self._headers = {"Content-Type": "application/json", "Authorization": basic_auth(key)}
        self._key_json = orjson.dumps(key)
        self._limits = SinkLimits(
            max_batch_events=settings.max_batch_events,
            max_batch_bytes=MAX_BATCH_BYTES,
            max_event_bytes=MAX_EVENT_BYTES,
            max_requests_per_second=settings.max_requests_per_second,
            max_concurrency=settings.max_concurrency,
            max_batch_wait_s=settings.max_batch_wait_s,
        )

    @property
    def limits(self) -> SinkLimits:
        return self._limits

    def map(self, enriched: Mapping[str, Any]) -> MappedEvent:
        event = enriched["event"]
        item = segment_message(event)
        encoded = orjson.dumps(item)
        return MappedEvent(
            message_id=event["messageId"],
            order_key=enriched["profileId"],
            item=item,
            size=len(encoded),
            encoded=encoded,
        )

    def build_requests(self, batch: Sequence[MappedEvent]) -> list[HttpRequest]:
        parts = b",".join(
            m.encoded if m.encoded is not None else orjson.dumps(m.item) for m in batch
        )
        sent_at = orjson.dumps(_iso(datetime.now(UTC)))
        body = (
            b'{"batch":['
            + parts
            + b'],"sentAt":'
            + sent_at
            + b',"writeKey":'
            + self._key_json
            + b"}"
        )
        return [
            HttpRequest(
                method="POST",
                url=self._url,
                headers=dict(self._headers),
                body=body,
                items=list(batch),
            )
        ]

    def classify(self, request: HttpRequest, response: HttpResponse) -> list[ItemOutcome]:
        """200 = every item taken (Segment reports nothing per item: bad events are dropped
        silently on its side, which is why we validate before sending)."""
        error = status_error(response, _error_text(response))
        if error is not None:
            raise error
        return [ItemOutcome() for _ in request.items]


def _error_text(response: HttpResponse) -> str:
    """Segment's error body is ``{"code": ..., "message": ...}``; keep it short."""
    if 200 <= response.status < 300:
        return ""
    try:
        body = orjson.loads(response.body or b"{}")
    except orjson.JSONDecodeError:
        return f"HTTP {response.status}"
    if isinstance(body, dict) and (body.get("code") or body.get("message")):
        return (
            f"HTTP {response.status} {body.get('code', '')}: {str(body.get('message', ''))[:300]}"
        )
    return f"HTTP {response.status}"
