"""Segment destination: mapping back to the Segment spec, the request, the responses."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from sinks.base import (
    ConfigError,
    HttpRequest,
    HttpResponse,
    Permanent,
    RequestTooLarge,
    Retryable,
    Throttled,
)
from sinks.engine import load_destination
from sinks.segment import MAX_EVENT_BYTES, SegmentDestination, SegmentSettings
from streams.events import from_segment, now_ms
from streams.profiles.enrich import build_enriched
from streams.serde import AvroSerde
from streams.settings import Settings
from tests.conftest import StackEndpoints
from tests.sinks.contract import enriched_record, harness, segment_event, wait_until

KEY = "sk-test-segment-write-key"


def dest(**kw: Any) -> SegmentDestination:
    return SegmentDestination(
        SegmentSettings(endpoint="https://api.segment.io/", write_key=KEY, **kw)
    )


def enriched(msg: dict[str, Any], received_at_ms: int = 1_767_225_600_000) -> dict[str, Any]:
    return enriched_record(msg, received_at_ms=received_at_ms)


SENT = {
    "type": "track",
    "messageId": "m-1",
    "userId": "u-1",
    "anonymousId": "a-1",
    "event": "Order Completed",
    "properties": {"total": 49.9, "count": 1, "tags": ["x", None, True], "nested": {"a": 1.0}},
    "context": {
        "ip": "203.0.113.7",
        "page": {"url": "https://shop.example/?utm_source=n", "title": "Shop"},
        "library": {"name": "analytics.js", "version": "5.0"},
        "traits": {"plan": "gold"},
        "app": {"name": "shop", "build": 7},
        "consent": {"categoryPreferences": {"Advertising": False}},
    },
    "integrations": {"All": True, "Mixpanel": False},
    "timestamp": "2026-01-01T00:00:00.000Z",
}


def test_map_rebuilds_the_segment_message() -> None:
    mapped = dest().map(enriched(SENT))
    item = mapped.item
    assert mapped.message_id == "m-1" and mapped.order_key == "u-1"
    assert {k: item[k] for k in ("type", "messageId", "userId", "anonymousId", "event")} == {
        k: SENT[k] for k in ("type", "messageId", "userId", "anonymousId", "event")
    }
    # JSON text round-trips exactly: 49.9 stays a float, 1 an int, 1.0 a float, null kept.
    assert orjson.dumps(item["properties"]) == orjson.dumps(SENT["properties"])
    assert item["context"] == SENT["context"]
    assert item["integrations"] == SENT["integrations"]
    assert item["timestamp"] == "2026-01-01T00:00:00.000Z"
    assert item["originalTimestamp"] == "2026-01-01T00:00:00.000Z"
    assert "sentAt" not in item and "writeKey" not in item
    assert mapped.size == len(orjson.dumps(item)) and mapped.encoded == orjson.dumps(item)


def test_map_keeps_the_skew_corrected_timestamp() -> None:
    # The client clock is 10 s fast: Segment's rule gives receivedAt - (sentAt - timestamp).
    msg = {
        **SENT,
        "timestamp": "2026-01-01T00:00:10.000Z",
        "sentAt": "2026-01-01T00:00:12.000Z",
    }
    received = 1_767_225_604_000  # 2026-01-01T00:00:04Z
    item = dest().map(enriched(msg, received)).item
    assert item["timestamp"] == "2026-01-01T00:00:02.000Z"
    assert item["originalTimestamp"] == "2026-01-01T00:00:10.000Z"


@pytest.mark.parametrize(
    ("msg", "fields"),
    [
        ({"type": "identify", "userId": "u", "traits": {"email": "e@x.io"}}, {"traits"}),
        ({"type": "page", "anonymousId": "a", "name": "Home", "category": "Docs"}, {"name"}),
        ({"type": "screen", "userId": "u", "name": "Settings"}, {"name"}),
        ({"type": "group", "userId": "u", "groupId": "g", "traits": {"n": 1}}, {"groupId"}),
        ({"type": "alias", "userId": "u", "previousId": "p"}, {"previousId"}),
    ],
)
def test_map_every_call_type(msg: dict[str, Any], fields: set[str]) -> None:
    item = dest().map(enriched({**msg, "messageId": "m"})).item
    for key, value in msg.items():
        assert item[key] == value, key
    assert fields <= set(item)
    if msg["type"] != "track":
        assert "event" not in item


def test_request_auth_body_and_size() -> None:
    d = dest()
    batch = [d.map(enriched({**SENT, "messageId": f"m-{i}"})) for i in range(3)]
    (req,) = d.build_requests(batch)
    assert req.url == "https://api.segment.io/v1/batch"
    assert req.headers["Authorization"] == "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()
    body = orjson.loads(req.body)
    assert body["writeKey"] == KEY and body["sentAt"].endswith("Z")
    assert [m["messageId"] for m in body["batch"]] == ["m-0", "m-1", "m-2"]
    assert req.items == batch
    assert "authorization" in req.secret_headers
    limits = d.limits
    assert limits.max_event_bytes == MAX_EVENT_BYTES == 32 * 1024
    assert limits.max_batch_bytes <= 500 * 1024 - 1024 and limits.max_batch_events <= 2500


def _resp(status: int, body: Any = None, headers: dict[str, str] | None = None) -> HttpResponse:
    return HttpResponse(status, headers or {}, orjson.dumps(body) if body is not None else b"")


def _req(n: int = 2) -> HttpRequest:
    d = dest()
    return d.build_requests([d.map(enriched({**SENT, "messageId": f"m{i}"})) for i in range(n)])[0]


def test_classify() -> None:
    d = dest()
    assert all(o.ok for o in d.classify(_req(), _resp(200, {"success": True})))
    with pytest.raises(Throttled) as throttled:
        d.classify(_req(), _resp(429, {"code": "rate_limited"}, {"Retry-After": "7"}))
    assert throttled.value.retry_after_s == 7
    with pytest.raises(Throttled) as reset:
        d.classify(_req(), _resp(429, None, {"X-RateLimit-Reset": "3"}))
    assert reset.value.retry_after_s == 3
    for status in (500, 502, 503, 504, 408):
        with pytest.raises(Retryable):
            d.classify(_req(), _resp(status))
    for status in (401, 403):
        with pytest.raises(ConfigError):
            d.classify(_req(), _resp(status))
    with pytest.raises(RequestTooLarge):
        d.classify(_req(), _resp(413))
    with pytest.raises(Permanent) as refused:
        d.classify(_req(), _resp(400, {"code": "invalid_request", "message": "bad JSON"}))
    assert "bad JSON" in refused.value.detail
    with pytest.raises(Permanent):
        d.classify(_req(), _resp(501))


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDP_SINK_SEGMENT_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("CDP_SINK_SEGMENT_CONSENT_CATEGORIES", "Analytics, Advertising")
    config = load_destination(SegmentDestination)
    assert config.destination is None and "CDP_SINK_SEGMENT_WRITE_KEY" in (config.problem or "")
    monkeypatch.setenv("CDP_SINK_SEGMENT_WRITE_KEY", KEY)
    config = load_destination(SegmentDestination)
    assert config.destination is not None
    assert config.destination.settings.consent_categories == ["Analytics", "Advertising"]
    assert KEY not in repr(config.destination.settings)
    monkeypatch.setenv("CDP_SINK_SEGMENT_MAX_BATCH_EVENTS", "9999")
    config = load_destination(SegmentDestination)
    assert config.invalid and "MAX_BATCH_EVENTS" in (config.problem or "")


async def test_against_the_emulator_every_type_arrives_as_sent(
    settings: Settings, serde: AvroSerde, stack: StackEndpoints
) -> None:
    """Every call type through the engine: the emulator sees the Segment messages we got."""
    async with harness("segment", settings, serde, stack, partitions=2) as h:
        sent: dict[str, dict[str, Any]] = {}
        calls = [
            segment_event(h.tag, 0),
            {"type": "identify", "userId": f"u-{h.tag}", "traits": {"plan": "pro", "n": 1.5}},
            {"type": "page", "anonymousId": f"a-{h.tag}", "name": "Home", "properties": {"x": 1}},
            {"type": "screen", "userId": f"u-{h.tag}", "name": "Settings"},
            {"type": "group", "userId": f"u-{h.tag}", "groupId": "g-1", "traits": {"seats": 5}},
            {"type": "alias", "userId": f"u-{h.tag}", "previousId": f"a-{h.tag}"},
        ]
        for i, msg in enumerate(calls):
            msg = {**msg, "messageId": f"{h.tag}-{i}"}
            sent[msg["messageId"]] = msg
            h.producer.send(msg)
        h.producer.flush()
        async with h.run() as service:
            runner = service.runners["segment"]
            await wait_until(lambda: runner.stats.delivered >= len(calls), 30, "all delivered")
        got = {a["item"]["messageId"]: a["item"] for a in h.emulator.state.accepted}
        assert set(got) == set(sent)
        assert h.emulator.state.dropped == []  # nothing silently dropped by Segment's rules
        for mid, msg in sent.items():
            for key, value in msg.items():
                if key in ("properties", "traits"):  # client JSON: byte-identical
                    assert orjson.dumps(got[mid][key]) == orjson.dumps(value), (mid, key)
                else:  # context is rebuilt from typed fields: same content, own key order
                    assert got[mid][key] == value, (mid, key)


def test_from_segment_map_round_trip_property() -> None:
    """Whatever JSON the client sent in properties comes out byte-identical."""
    from hypothesis import given
    from hypothesis import settings as hsettings
    from hypothesis import strategies as st

    json_values = st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**53), 2**53)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=20,
    )
    d = dest()

    @hsettings(max_examples=60, deadline=None)
    @given(st.dictionaries(st.text(max_size=10), json_values, max_size=6))
    def check(props: dict[str, Any]) -> None:
        msg = {"type": "track", "userId": "u", "event": "E", "properties": props}
        record = from_segment(msg, received_at_ms=now_ms())
        e = build_enriched(
            record,
            profile_id="u",
            stitched=False,
            traits=None,
            recommendations=None,
            worker_id="w",
            pipeline_version="t",
            processed_at_ms=now_ms(),
            source_partition=None,
            source_offset=None,
        )
        assert orjson.dumps(d.map(e).item["properties"]) == orjson.dumps(props)

    check()
