"""The Segment-spec event: normalising client JSON into a CustomerEvent record, and the
rules every event must pass before it enters the pipeline.

The same functions run in the collector, in ``cdpflow produce``, in the producer
library and in the worker, so an event is judged the same way whichever way it
came in. Every rejection carries a stable reason code for the DLQ.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson

from streams.settings import Settings

EVENT_TYPES = frozenset({"track", "identify", "page", "screen", "group", "alias"})
MAX_MESSAGE_ID_LENGTH = 256


class Reason(StrEnum):
    """DLQ reason codes. Stable: dashboards and replay tools key on them."""

    NOT_WIRE_FORMAT = "NOT_WIRE_FORMAT"
    UNKNOWN_SCHEMA_ID = "UNKNOWN_SCHEMA_ID"
    SCHEMA_MISMATCH = "SCHEMA_MISMATCH"
    MALFORMED_AVRO = "MALFORMED_AVRO"
    INVALID_JSON = "INVALID_JSON"
    SCHEMA_INVALID = "SCHEMA_INVALID"
    UNKNOWN_TYPE = "UNKNOWN_TYPE"
    MISSING_IDENTITY = "MISSING_IDENTITY"
    MISSING_EVENT = "MISSING_EVENT"
    MISSING_NAME = "MISSING_NAME"
    MISSING_GROUP_ID = "MISSING_GROUP_ID"
    MISSING_ALIAS_IDS = "MISSING_ALIAS_IDS"
    INVALID_MESSAGE_ID = "INVALID_MESSAGE_ID"
    INVALID_TIMESTAMP = "INVALID_TIMESTAMP"
    TIMESTAMP_IN_FUTURE = "TIMESTAMP_IN_FUTURE"
    TIMESTAMP_TOO_OLD = "TIMESTAMP_TOO_OLD"
    EVENT_TOO_LARGE = "EVENT_TOO_LARGE"
    NESTING_TOO_DEEP = "NESTING_TOO_DEEP"
    INVALID_RECOMMENDATION = "INVALID_RECOMMENDATION"


class EventRejected(ValueError):
    """An event the pipeline must not accept, with the reason code it is dead-lettered under."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message


@dataclass(frozen=True, slots=True)
class Limits:
    max_event_bytes: int = 32 * 1024
    max_nesting_depth: int = 16
    max_future_skew_ms: int = 24 * 3600 * 1000
    max_age_ms: int = 5 * 365 * 24 * 3600 * 1000

    @classmethod
    def from_settings(cls, s: Settings) -> Limits:
        return cls(
            max_event_bytes=s.cdp_max_event_bytes,
            max_nesting_depth=s.cdp_max_nesting_depth,
            max_future_skew_ms=s.cdp_max_future_skew_s * 1000,
            max_age_ms=s.cdp_max_event_age_days * 24 * 3600 * 1000,
        )


def now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


def to_ms(value: int | datetime) -> int:
    """Avro timestamp-millis values arrive as datetimes from fastavro and ints from us."""
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    return int(value)


def parse_timestamp(value: Any, field: str) -> int | None:
    """ISO-8601 string (or epoch millis) to epoch millis; None when absent."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise EventRejected(Reason.INVALID_TIMESTAMP, f"{field} must be an ISO-8601 string")
    if isinstance(value, int | float):
        return int(value)
    if not isinstance(value, str):
        raise EventRejected(Reason.INVALID_TIMESTAMP, f"{field} must be an ISO-8601 string")
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise EventRejected(
            Reason.INVALID_TIMESTAMP, f"{field} {value[:40]!r} is not ISO-8601"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def dumps_json(value: Any) -> str:
    """JSON text that round-trips exactly (orjson; stdlib for ints beyond 64 bits)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def loads_object(text: str, field: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise EventRejected(Reason.INVALID_JSON, f"{field} is not valid JSON") from None
    if not isinstance(value, dict):
        raise EventRejected(Reason.SCHEMA_INVALID, f"{field} must be a JSON object")
    return value


def nesting_depth(value: Any, limit: int) -> int:
    """Depth of nested containers, stopping early past ``limit`` (cheap on deep attacks)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    deepest = 0
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return deepest


def _object_field(msg: Mapping[str, Any], key: str, limits: Limits) -> str:
    value = msg.get(key)
    if value is None:
        return "{}"
    if not isinstance(value, dict):
        raise EventRejected(Reason.SCHEMA_INVALID, f"{key} must be a JSON object")
    if nesting_depth(value, limits.max_nesting_depth) > limits.max_nesting_depth:
        raise EventRejected(
            Reason.NESTING_TOO_DEEP, f"{key} nests deeper than {limits.max_nesting_depth} levels"
        )
    return dumps_json(value)


def _opt_str(msg: Mapping[str, Any], key: str) -> str | None:
    value = msg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise EventRejected(Reason.SCHEMA_INVALID, f"{key} must be a string")
    text = str(value)
    return text if text else None


_CONTEXT_RECORDS: dict[str, tuple[str, ...]] = {
    "page": ("path", "referrer", "search", "title", "url"),
    "campaign": ("name", "source", "medium", "term", "content"),
    "device": ("id", "advertisingId", "manufacturer", "model", "name", "type"),
    "library": ("name", "version"),
}
_CONTEXT_STRINGS = ("ip", "userAgent", "locale", "timezone", "groupId")


def _sub_record(value: dict[str, Any], fields: tuple[str, ...]) -> tuple[dict[str, Any], Any]:
    """Typed (string) part of a context sub-object, plus whatever did not fit (kept verbatim)."""
    typed: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for k, v in value.items():
        if k in fields and isinstance(v, str):
            typed[k] = v
        else:
            rest[k] = v
    return {f: typed.get(f) for f in fields}, rest or None


def context_record(raw: Any, limits: Limits) -> dict[str, Any]:
    """Split Segment's context into typed fields and a verbatim JSON remainder."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise EventRejected(Reason.SCHEMA_INVALID, "context must be a JSON object")
    if nesting_depth(raw, limits.max_nesting_depth) > limits.max_nesting_depth:
        raise EventRejected(
            Reason.NESTING_TOO_DEEP, f"context nests deeper than {limits.max_nesting_depth} levels"
        )
    record: dict[str, Any] = {k: None for k in _CONTEXT_STRINGS}
    extra: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _CONTEXT_STRINGS and isinstance(value, str):
            record[key] = value
        elif key in _CONTEXT_RECORDS and isinstance(value, dict):
            typed, rest = _sub_record(value, _CONTEXT_RECORDS[key])
            record[key] = typed
            if rest is not None:
                extra[key] = rest  # untyped keys of a typed sub-object, merged back on read
        elif key == "consent" and isinstance(value, dict):
            prefs = value.get("categoryPreferences")
            if isinstance(prefs, dict) and all(isinstance(v, bool) for v in prefs.values()):
                record["consent"] = {"categoryPreferences": {str(k): v for k, v in prefs.items()}}
                rest_c = {k: v for k, v in value.items() if k != "categoryPreferences"}
                if rest_c:
                    extra["consent"] = rest_c
            else:
                extra[key] = value
        else:
            extra[key] = value
    for key in _CONTEXT_RECORDS:
        record.setdefault(key, None)
    record.setdefault("consent", None)
    record["extraJson"] = dumps_json(extra) if extra else "{}"
    return record


def context_to_json(ctx: Mapping[str, Any] | None) -> dict[str, Any]:
    """Rebuild Segment's context object from the Avro record (inverse of context_record)."""
    if not ctx:
        return {}
    out: dict[str, Any] = {}
    extra = orjson.loads(ctx.get("extraJson") or "{}")
    for key in _CONTEXT_STRINGS:
        if ctx.get(key) is not None:
            out[key] = ctx[key]
    for key in _CONTEXT_RECORDS:
        sub = ctx.get(key)
        if sub is not None:
            out[key] = {k: v for k, v in sub.items() if v is not None}
    if ctx.get("consent") is not None:
        out["consent"] = dict(ctx["consent"])
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def from_segment(
    msg: Mapping[str, Any],
    *,
    received_at_ms: int,
    source_id: str | None = None,
    default_type: str | None = None,
    limits: Limits = Limits(),
) -> dict[str, Any]:
    """Turn one Segment-spec JSON message into a CustomerEvent record, or raise EventRejected.

    Fills what Segment's server fills (messageId, receivedAt) and corrects the
    client's clock skew the way Segment does.
    """
    if not isinstance(msg, Mapping):
        raise EventRejected(Reason.SCHEMA_INVALID, "each message must be a JSON object")
    event_type = msg.get("type", default_type)
    if event_type not in EVENT_TYPES:
        raise EventRejected(
            Reason.UNKNOWN_TYPE,
            f"type must be one of {', '.join(sorted(EVENT_TYPES))}, got {str(event_type)[:40]!r}",
        )
    message_id = msg.get("messageId")
    if message_id is None or message_id == "":
        message_id = str(uuid.uuid4())
    elif not isinstance(message_id, str) or len(message_id) > MAX_MESSAGE_ID_LENGTH:
        raise EventRejected(
            Reason.INVALID_MESSAGE_ID,
            f"messageId must be a string of at most {MAX_MESSAGE_ID_LENGTH} characters",
        )
    original = parse_timestamp(msg.get("timestamp"), "timestamp")
    sent_at = parse_timestamp(msg.get("sentAt"), "sentAt")
    if original is None:
        timestamp = received_at_ms
    elif sent_at is not None:
        timestamp = received_at_ms - (sent_at - original)
    else:
        timestamp = original
    record: dict[str, Any] = {
        "type": event_type,
        "messageId": message_id,
        "anonymousId": _opt_str(msg, "anonymousId"),
        "userId": _opt_str(msg, "userId"),
        "previousId": _opt_str(msg, "previousId"),
        "groupId": _opt_str(msg, "groupId"),
        "event": _opt_str(msg, "event"),
        "name": _opt_str(msg, "name"),
        "category": _opt_str(msg, "category"),
        "timestamp": timestamp,
        "originalTimestamp": original,
        "sentAt": sent_at,
        "receivedAt": received_at_ms,
        "properties": _object_field(msg, "properties", limits),
        "traits": _object_field(msg, "traits", limits),
        "context": context_record(msg.get("context"), limits),
        "integrations": _object_field(msg, "integrations", limits),
        "sourceId": source_id,
    }
    check_rules(record, now=received_at_ms, limits=limits, parse_json=False)
    return record


def check_rules(
    record: Mapping[str, Any], *, now: int, limits: Limits, parse_json: bool = True
) -> None:
    """The rules a CDP enforces on a decoded CustomerEvent. Raises EventRejected.

    ``parse_json`` checks the JSON text fields too (needed for records that came
    straight from Kafka producers, not for ones we just built ourselves).
    """
    event_type = record["type"]
    if event_type not in EVENT_TYPES:
        raise EventRejected(Reason.UNKNOWN_TYPE, f"unknown type {str(event_type)[:40]!r}")
    if not record.get("messageId"):
        raise EventRejected(Reason.INVALID_MESSAGE_ID, "messageId is empty")
    if event_type == "alias":
        if not record.get("previousId") or not record.get("userId"):
            raise EventRejected(Reason.MISSING_ALIAS_IDS, "alias needs previousId and userId")
    elif not record.get("userId") and not record.get("anonymousId"):
        raise EventRejected(Reason.MISSING_IDENTITY, "userId or anonymousId is required")
    if event_type == "track" and not record.get("event"):
        raise EventRejected(Reason.MISSING_EVENT, "track needs a non-empty event name")
    if event_type == "group" and not record.get("groupId"):
        raise EventRejected(Reason.MISSING_GROUP_ID, "group needs groupId")
    if parse_json:
        for field in ("properties", "traits", "integrations"):
            value = loads_object(record.get(field) or "{}", field)
            if nesting_depth(value, limits.max_nesting_depth) > limits.max_nesting_depth:
                raise EventRejected(
                    Reason.NESTING_TOO_DEEP,
                    f"{field} nests deeper than {limits.max_nesting_depth} levels",
                )
    if event_type in ("page", "screen") and not record.get("name"):
        props = record.get("properties") or "{}"
        if props in ("{}", "") or not loads_object(props, "properties"):
            raise EventRejected(Reason.MISSING_NAME, f"{event_type} needs a name or properties")
    ts = to_ms(record["timestamp"])
    if ts > now + limits.max_future_skew_ms:
        raise EventRejected(
            Reason.TIMESTAMP_IN_FUTURE,
            f"timestamp is {(ts - now) // 1000} s in the future (limit "
            f"{limits.max_future_skew_ms // 1000} s)",
        )
    if ts < now - limits.max_age_ms:
        raise EventRejected(
            Reason.TIMESTAMP_TOO_OLD,
            f"timestamp is older than {limits.max_age_ms // 86_400_000} days",
        )


def check_recommendation(record: Mapping[str, Any]) -> None:
    """The rules a RecommendationUpdate must pass (worker, publisher-independent, bench)."""
    if not record.get("customerId"):
        raise EventRejected(Reason.INVALID_RECOMMENDATION, "customerId is empty")
    seen: set[str] = set()
    for product in record.get("products") or []:
        pid = product.get("productId")
        if not pid:
            raise EventRejected(Reason.INVALID_RECOMMENDATION, "a product has an empty productId")
        if pid in seen:
            raise EventRejected(Reason.INVALID_RECOMMENDATION, f"product {pid!r} listed twice")
        seen.add(pid)
        if not math.isfinite(product.get("score", math.nan)):
            raise EventRejected(
                Reason.INVALID_RECOMMENDATION, f"product {pid!r} has no finite score"
            )


def identity_key(record: Mapping[str, Any]) -> str:
    """The key raw events are partitioned by: anonymousId when present, else userId.

    anonymousId first keeps a device's anonymous events and the identify that
    links them to a userId in one partition, in order, so the stitching stage
    sees the link before the events that follow it. A userId-only event (server
    side) has no anonymous history to order against.
    """
    return str(record.get("anonymousId") or record.get("userId") or record.get("previousId") or "")


def dead_letter(
    original: bytes,
    *,
    stage: str,
    reason: Reason | str,
    message: str,
    topic: str | None = None,
    partition: int | None = None,
    offset: int | None = None,
    message_id: str | None = None,
    failed_at_ms: int | None = None,
) -> dict[str, Any]:
    return {
        "originalBytes": original,
        "sourceTopic": topic,
        "sourcePartition": partition,
        "sourceOffset": offset,
        "stage": stage,
        "reasonCode": str(reason),
        "message": message[:2000],
        "messageId": message_id,
        "failedAt": now_ms() if failed_at_ms is None else failed_at_ms,
    }
