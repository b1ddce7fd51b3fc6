"""Mixpanel destination: identity, $insert_id, event mapping, per-item outcomes, auth."""

from __future__ import annotations

import base64
import re
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
from sinks.mixpanel import MixpanelDestination, MixpanelSettings, insert_id_for
from streams.serde import AvroSerde
from streams.settings import Settings
from tests.conftest import StackEndpoints
from tests.sinks.contract import enriched_record, harness, segment_event, wait_until

TOKEN = "mp-test-project-token"


def dest(**kw: Any) -> MixpanelDestination:
    values: dict[str, Any] = {"endpoint": "https://api-eu.mixpanel.com", "project_token": TOKEN}
    values.update(kw)
    return MixpanelDestination(MixpanelSettings(**values))


def mapped(msg: dict[str, Any], d: MixpanelDestination | None = None, **kw: Any) -> Any:
    return (d or dest()).map(enriched_record(msg, received_at_ms=1_767_225_600_000, **kw))


TRACK = {
    "type": "track",
    "messageId": "2f1c2a9e-7b7d-4a41-9a41-0c3f6c2b1d11",
    "userId": "u-1",
    "anonymousId": "a-1",
    "event": "Order Completed",
    "properties": {"total": 49.9, "time": 5, "distinct_id": "spoofed", "products": [{"id": 1}]},
    "context": {
        "ip": "203.0.113.7",
        "page": {"url": "https://shop.example/c?utm_source=news&utm_campaign=bf", "referrer": "r"},
        "userAgent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
    },
    "timestamp": "2026-01-01T00:00:00.000Z",
}


def test_track_mapping_simplified_identity() -> None:
    m = mapped(TRACK)
    props = m.item["properties"]
    assert m.item["event"] == "Order Completed"
    assert props["distinct_id"] == "u-1" and props["$user_id"] == "u-1"
    assert props["$device_id"] == "a-1"
    assert props["time"] == 1_767_225_600_000  # ms, the event's time, not the client's "time"
    assert props["$insert_id"] == TRACK["messageId"]
    assert props["total"] == 49.9 and props["products"] == [{"id": 1}]
    assert props["ip"] == "203.0.113.7"
    assert props["$current_url"].startswith("https://shop.example/c")
    assert props["utm_source"] == "news" and props["utm_campaign"] == "bf"
    assert props["$os"] == "iOS" and props["$browser"].startswith("Mobile Safari")
    assert "token" not in props
    assert m.order_key == "u-1" and m.size == len(orjson.dumps(m.item))


def test_anonymous_and_stitched_identity() -> None:
    anon = {**TRACK, "userId": None}
    props = mapped(anon, profile_id="anon:a-1").item["properties"]
    assert props["distinct_id"] == "$device:a-1" and "$user_id" not in props
    # The pipeline stitched this anonymous event to u-9: Mixpanel learns the link too.
    enriched = enriched_record(anon, received_at_ms=1_767_225_600_000, profile_id="u-9")
    enriched["stitched"] = True
    props = dest().map(enriched).item["properties"]  # type: ignore[union-attr]
    assert props["distinct_id"] == "u-9" and props["$user_id"] == "u-9"
    assert props["$device_id"] == "a-1"


def test_profile_identity_mode() -> None:
    d = dest(identity="profile")
    props = mapped({**TRACK, "userId": None}, d, profile_id="anon:a-1").item["properties"]
    assert props["distinct_id"] == "anon:a-1"
    assert "$device_id" not in props and "$user_id" not in props


def test_forbidden_ids_fall_back_or_refuse() -> None:
    props = mapped({**TRACK, "userId": "null"}).item["properties"]
    assert props["distinct_id"] == "$device:a-1"  # "null" is refused by Mixpanel
    with pytest.raises(Permanent) as refused:
        mapped({**TRACK, "userId": "undefined", "anonymousId": "0"})
    assert refused.value.reason == "INVALID_DISTINCT_ID"


@pytest.mark.parametrize(
    ("message_id", "kept"),
    [
        ("2f1c2a9e-7b7d-4a41-9a41-0c3f6c2b1d11", True),
        ("m-1", True),
        ("a" * 36, True),
        ("a" * 37, False),
        ("order:42/line:1", False),
        ("null", False),
    ],
)
def test_insert_id(message_id: str, kept: bool) -> None:
    insert_id = insert_id_for(message_id)
    assert (insert_id == message_id) is kept
    assert re.fullmatch(r"[A-Za-z0-9-]{1,36}", insert_id)
    assert insert_id_for(message_id) == insert_id  # deterministic: re-delivery dedupes


@pytest.mark.parametrize(
    ("msg", "name"),
    [
        ({"type": "page", "anonymousId": "a", "name": "Home", "category": "Docs"}, "Loaded a Page"),
        ({"type": "screen", "userId": "u", "name": "Settings"}, "Loaded a Screen"),
        ({"type": "identify", "userId": "u", "anonymousId": "a", "traits": {"email": "x@y.io"}},
         "$identify"),
    ],
)  # fmt: skip
def test_other_types(msg: dict[str, Any], name: str) -> None:
    m = mapped({**msg, "messageId": "m-1"})
    assert m.item["event"] == name
    props = m.item["properties"]
    if msg["type"] == "page":
        assert props["name"] == "Home" and props["category"] == "Docs"
    if msg["type"] == "identify":
        assert props["$identified_id"] == "u" and props["$anon_distinct_id"] == "a"
        assert "email" not in orjson.dumps(props).decode()  # traits are not copied


@pytest.mark.parametrize(
    "msg",
    [
        {"type": "alias", "userId": "u", "previousId": "p"},
        {"type": "group", "userId": "u", "groupId": "g"},
    ],
)
def test_alias_and_group_are_skipped(msg: dict[str, Any]) -> None:
    assert mapped({**msg, "messageId": "m"}) is None


def test_request_auth_variants() -> None:
    d = dest()
    (req,) = d.build_requests([mapped(TRACK, d)])
    assert req.url == "https://api-eu.mixpanel.com/import?strict=1"
    assert (
        req.headers["Authorization"] == "Basic " + base64.b64encode(f"{TOKEN}:".encode()).decode()
    )
    assert orjson.loads(req.body)[0]["event"] == "Order Completed"
    sa = dest(
        project_token=None,
        service_account_username="sa.user",
        service_account_secret="sa-secret",
        project_id="123",
    )
    (req,) = sa.build_requests([mapped(TRACK, sa)])
    assert req.url.endswith("/import?strict=1&project_id=123")
    assert base64.b64decode(req.headers["Authorization"][6:]) == b"sa.user:sa-secret"
    gz = dest(gzip=True)
    (req,) = gz.build_requests([mapped(TRACK, gz)])
    assert req.headers["Content-Encoding"] == "gzip" and req.body[:2] == b"\x1f\x8b"


def test_settings_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDP_SINK_MIXPANEL_ENDPOINT", "http://127.0.0.1:1")
    config = load_destination(MixpanelDestination)
    assert config.destination is None and not config.invalid
    assert "PROJECT_TOKEN" in (config.problem or "")
    monkeypatch.setenv("CDP_SINK_MIXPANEL_SERVICE_ACCOUNT_USERNAME", "sa")
    monkeypatch.setenv("CDP_SINK_MIXPANEL_SERVICE_ACCOUNT_SECRET", "s")
    config = load_destination(MixpanelDestination)
    assert config.invalid and "PROJECT_ID" in (config.problem or "")
    monkeypatch.setenv("CDP_SINK_MIXPANEL_PROJECT_ID", "42")
    monkeypatch.setenv("CDP_SINK_MIXPANEL_CONSENT_CATEGORIES", '["Analytics"]')
    config = load_destination(MixpanelDestination)
    assert config.destination is not None
    assert config.destination.settings.consent_categories == ["Analytics"]


def _req(n: int) -> HttpRequest:
    d = dest()
    items = [mapped({**TRACK, "messageId": f"m-{i}"}, d) for i in range(n)]
    return d.build_requests(items)[0]


def _resp(status: int, body: Any = None) -> HttpResponse:
    return HttpResponse(status, {}, orjson.dumps(body) if body is not None else b"")


def test_classify_partial_failure_by_index_and_insert_id() -> None:
    d = dest()
    req = _req(4)
    body = {
        "code": 400,
        "error": "some data points in the request failed validation",
        "num_records_imported": 2,
        "failed_records": [
            {"index": 1, "$insert_id": "m-1", "field": "properties.time", "message": "too new"},
            # A wrong index but a known insert_id: matched by the id.
            {"index": 0, "insert_id": "m-3", "field": "properties.$insert_id", "message": "bad"},
        ],
    }
    outcomes = d.classify(req, _resp(400, body))
    assert [o.ok for o in outcomes] == [True, False, True, False]
    assert outcomes[1].error is not None and outcomes[1].error.reason == "REJECTED_TIME"
    assert outcomes[3].error is not None and outcomes[3].error.reason == "REJECTED_INSERT_ID"


def test_classify_statuses() -> None:
    d = dest()
    assert all(o.ok for o in d.classify(_req(2), _resp(200, {"code": 200, "status": "OK"})))
    with pytest.raises(Throttled) as throttled:
        d.classify(_req(2), _resp(429, {"code": 429, "error": "Project exceeded rate limits"}))
    assert throttled.value.retry_after_s is None  # none documented: the engine backs off
    for status in (500, 502, 503):
        with pytest.raises(Retryable):
            d.classify(_req(2), _resp(status))
    with pytest.raises(ConfigError):
        d.classify(_req(2), _resp(401, {"code": 401, "error": "Invalid credentials"}))
    with pytest.raises(RequestTooLarge):
        d.classify(_req(2), _resp(413, {"code": 413, "error": "too large"}))
    with pytest.raises(Permanent) as whole:  # 400 without failed_records: bisected
        d.classify(_req(2), _resp(400, {"code": 400, "error": "batch contains 2001 events"}))
    assert "2001" in whole.value.detail


async def test_against_the_emulator_with_service_account_and_gzip(
    settings: Settings, serde: AvroSerde, stack: StackEndpoints
) -> None:
    async with harness("mixpanel", settings, serde, stack) as h:
        d = h.destination(project_token=None, gzip=True)
        msgs = [segment_event(h.tag, i) for i in range(20)]
        msgs.append({"type": "alias", "userId": f"u-{h.tag}", "previousId": "p", "messageId": "x"})
        for msg in msgs:
            h.producer.send(msg)
        h.producer.flush()
        async with h.run(d) as service:
            runner = service.runners["mixpanel"]
            await wait_until(lambda: runner.stats.delivered + runner.stats.skipped >= 21, 30, "all")
        assert runner.stats.skipped == 1 and runner.stats.delivered == 20
        stored = {
            a["item"]["properties"]["$insert_id"]: a["item"] for a in h.emulator.state.accepted
        }
        assert set(stored) == {m["messageId"] for m in msgs[:20]}
        one = stored[msgs[3]["messageId"]]
        assert one["event"] == "Order Completed"
        assert one["properties"]["distinct_id"] == msgs[3]["userId"]
        assert one["properties"]["order_id"] == msgs[3]["properties"]["order_id"]


async def test_wrong_credentials_stop_the_destination(
    settings: Settings, serde: AvroSerde, stack: StackEndpoints
) -> None:
    """401: a ConfigError stops the runner (no retries burned, nothing committed)."""
    async with harness("mixpanel", settings, serde, stack, partitions=1) as h:
        d = h.destination(
            project_token="wrong", service_account_username=None, service_account_secret=None
        )
        h.producer.send(segment_event(h.tag, 0))
        h.producer.flush()
        async with h.run(d) as service:
            runner = service.runners["mixpanel"]
            await wait_until(lambda: runner.state == "failed", 30, "the runner to fail")
        assert runner.failure is not None and runner.failure.error.reason == "UNAUTHORIZED"
        assert h.emulator.state.requests == 1
        assert runner.stats.delivered == runner.stats.dead_lettered == 0
