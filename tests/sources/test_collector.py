"""The Segment-compatible collector against the real broker and registry.

Every test sends with its own messageIds and reads back through confluent-kafka's
AvroDeserializer, so it checks what a third-party consumer would see.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sources.collector import MAX_BATCH_BYTES, create_app
from streams import topics
from streams.settings import Settings, write_key_id
from streams.topics import ensure_topics
from tests.conftest import StackEndpoints
from tests.sources import TopicTail

KEY = "test-write-key"
SOURCE_ID = write_key_id(KEY)

Client = TestClient[web.Request, web.Application]


def basic(key: str, colon: bool = True) -> dict[str, str]:
    token = base64.b64encode(f"{key}{':' if colon else ''}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def mid(label: str = "m") -> str:
    return f"{label}-{uuid.uuid4().hex}"


def iso(dt: datetime) -> str:
    return dt.isoformat(timespec="milliseconds")


def ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


@pytest.fixture(scope="module")
def pipeline_topics(stack: StackEndpoints) -> None:
    ensure_topics(
        Settings(
            kafka_bootstrap_servers=stack.bootstrap_servers,
            schema_registry_url=stack.registry_url,
        )
    )


@pytest.fixture
async def client(settings: Settings, pipeline_topics: None) -> AsyncIterator[Client]:
    async with TestClient(TestServer(create_app(settings))) as c:
        yield c


@pytest.fixture
def raw(stack: StackEndpoints, pipeline_topics: None) -> Iterator[TopicTail]:
    tail = TopicTail(stack.bootstrap_servers, stack.registry_url, topics.EVENTS_RAW)
    yield tail
    tail.close()


@pytest.fixture
def dlq(stack: StackEndpoints, pipeline_topics: None) -> Iterator[TopicTail]:
    tail = TopicTail(stack.bootstrap_servers, stack.registry_url, topics.EVENTS_DLQ)
    yield tail
    tail.close()


async def read(tail: TopicTail, ids: set[str]) -> dict[str, Any]:
    found = await asyncio.to_thread(tail.by_message_id, ids)
    return {k: r for k, r in found.items()}


def canonical(value: Any) -> str:
    """JSON text that tells 1 from 1.0 and keeps key order (Python's == would not)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


SINGLE_CALLS = [
    ("/v1/track", "track", {"userId": "u-1", "event": "Order Completed"}),
    ("/v1/identify", "identify", {"userId": "u-1", "traits": {"email": "a@example.com"}}),
    ("/v1/page", "page", {"anonymousId": "a-1", "name": "Home"}),
    ("/v1/screen", "screen", {"userId": "u-1", "name": "Settings"}),
    ("/v1/group", "group", {"userId": "u-1", "groupId": "g-1", "traits": {"plan": "pro"}}),
    ("/v1/alias", "alias", {"userId": "u-1", "previousId": "a-1"}),
]


@pytest.mark.parametrize(("path", "event_type", "fields"), SINGLE_CALLS)
async def test_single_call_paths(
    client: Client, raw: TopicTail, path: str, event_type: str, fields: dict[str, Any]
) -> None:
    message_id = mid(event_type)
    resp = await client.post(path, json={"messageId": message_id, **fields}, headers=basic(KEY))
    assert resp.status == 200
    assert await resp.json() == {"success": True, "accepted": 1, "rejected": 0, "errors": []}
    record = (await read(raw, {message_id}))[message_id]
    assert record.value["type"] == event_type
    assert record.value["sourceId"] == SOURCE_ID
    assert record.key == b"u-1" or (event_type == "page" and record.key == b"a-1")


async def test_path_decides_the_type(client: Client, raw: TopicTail) -> None:
    message_id = mid()
    body = {"type": "identify", "userId": "u-1", "event": "Clicked", "messageId": message_id}
    resp = await client.post("/v1/track", json=body, headers=basic(KEY))
    assert resp.status == 200
    assert (await read(raw, {message_id}))[message_id].value["type"] == "track"


SHORT_PATHS = [
    ("/v1/t", "track", {"anonymousId": "anon-7", "event": "Viewed"}),
    ("/v1/i", "identify", {"anonymousId": "anon-7", "userId": "u-7"}),
    ("/v1/p", "page", {"anonymousId": "anon-7", "properties": {"path": "/"}}),
    ("/v1/s", "screen", {"anonymousId": "anon-7", "name": "Home"}),
    ("/v1/g", "group", {"anonymousId": "anon-7", "groupId": "g-7"}),
    ("/v1/a", "alias", {"userId": "u-7", "previousId": "anon-7"}),
]


async def test_short_paths_text_plain_with_body_write_key(client: Client, raw: TopicTail) -> None:
    """analytics.js: text/plain (no preflight), writeKey and type in the body, an Origin."""
    ids: dict[str, str] = {}
    for path, event_type, fields in SHORT_PATHS:
        message_id = mid(event_type)
        ids[message_id] = event_type
        body = {
            "type": event_type,
            "messageId": message_id,
            "writeKey": KEY,
            "sentAt": iso(datetime.now(UTC)),
            "context": {"library": {"name": "analytics.js", "version": "next-1.70.0"}},
            "_metadata": {"bundled": ["Segment.io"], "unbundled": []},
            **fields,
        }
        resp = await client.post(
            path,
            data=json.dumps(body),
            headers={"Content-Type": "text/plain", "Origin": "https://shop.example"},
        )
        assert resp.status == 200, await resp.text()
        assert resp.headers["Access-Control-Allow-Origin"] == "https://shop.example"
        assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    found = await read(raw, set(ids))
    assert set(found) == set(ids)
    for message_id, record in found.items():
        assert record.value["type"] == ids[message_id]
        assert record.value["sourceId"] == SOURCE_ID
        assert record.value["context"]["library"]["name"] == "analytics.js"
        assert KEY not in repr(record.value)


@pytest.mark.parametrize("path", ["/v1/batch", "/v1/import", "/v1/b"])
async def test_batch_merges_batch_level_fields(client: Client, raw: TopicTail, path: str) -> None:
    now = datetime.now(UTC)
    ids = [mid("b") for _ in range(3)]
    body = {
        "writeKey": KEY,
        "sentAt": iso(now + timedelta(seconds=10)),  # client clock 10 s ahead
        "context": {"ip": "203.0.113.9", "locale": "de-DE", "app": {"name": "shop"}},
        "integrations": {"All": True, "Mixpanel": False},
        "batch": [
            {"type": "track", "userId": "u-b", "event": "A", "messageId": ids[0],
             "timestamp": iso(now + timedelta(seconds=5))},
            {"type": "identify", "userId": "u-b", "messageId": ids[1],
             "context": {"locale": "fr-FR"}, "integrations": {"Mixpanel": True}},
            {"type": "page", "anonymousId": "a-b", "name": "Cart", "messageId": ids[2],
             "writeKey": KEY},
        ],
    }  # fmt: skip
    resp = await client.post(path, json=body)
    assert resp.status == 200
    assert await resp.json() == {"success": True, "accepted": 3, "rejected": 0, "errors": []}
    found = await read(raw, set(ids))
    first, second, third = (found[i].value for i in ids)
    assert first["context"]["ip"] == "203.0.113.9"
    assert first["context"]["locale"] == "de-DE"
    assert second["context"]["locale"] == "fr-FR"  # the item's own key wins
    assert second["context"]["ip"] == "203.0.113.9"
    assert json.loads(first["integrations"]) == {"All": True, "Mixpanel": False}
    assert json.loads(second["integrations"]) == {"All": True, "Mixpanel": True}
    # Skew correction with the batch-level sentAt: timestamp = receivedAt - (sentAt - ts).
    received = first["receivedAt"]
    assert first["timestamp"] == received - timedelta(seconds=5)
    assert first["sentAt"] == now.replace(microsecond=now.microsecond // 1000 * 1000) + timedelta(
        seconds=10
    )
    assert third["type"] == "page" and KEY not in repr(third)


async def test_basic_auth_with_and_without_colon(client: Client, raw: TopicTail) -> None:
    ids = [mid("auth"), mid("auth")]
    for message_id, colon in zip(ids, (True, False), strict=True):
        body = {"userId": "u-a", "event": "E", "messageId": message_id}
        resp = await client.post("/v1/track", json=body, headers=basic("second-key", colon))
        assert resp.status == 200
    found = await read(raw, set(ids))
    assert {r.value["sourceId"] for r in found.values()} == {write_key_id("second-key")}


async def test_bearer_header_with_body_key(client: Client) -> None:
    body = {"userId": "u", "event": "E", "writeKey": KEY}
    resp = await client.post("/v1/track", json=body, headers={"Authorization": "Bearer tok"})
    assert resp.status == 200


@pytest.mark.parametrize(
    ("headers", "body_key"),
    [
        ({}, None),
        ({}, "wrong-key"),
        (basic("wrong-key"), None),
        ({"Authorization": "Basic !!!not-base64"}, None),
    ],
)
async def test_unknown_or_missing_key_is_401(
    client: Client, raw: TopicTail, headers: dict[str, str], body_key: str | None
) -> None:
    message_id = mid("unauth")
    body: dict[str, Any] = {"batch": [{"type": "track", "userId": "u", "event": "E",
                                       "messageId": message_id}]}  # fmt: skip
    if body_key is not None:
        body["writeKey"] = body_key
    resp = await client.post("/v1/batch", json=body, headers=headers)
    assert resp.status == 401
    payload = await resp.json()
    assert payload["code"] == "unauthorized" and payload["message"]
    assert await read(raw, {message_id}) == {}


async def test_gzip_body(client: Client, raw: TopicTail) -> None:
    ids = [mid("gz") for _ in range(50)]
    body = {"batch": [{"type": "track", "userId": "u-gz", "event": "E", "messageId": i,
                       "properties": {"blob": "x" * 2000}} for i in ids]}  # fmt: skip
    data = gzip.compress(orjson.dumps(body))
    assert len(data) < 32 * 1024 < len(orjson.dumps(body))
    resp = await client.post(
        "/v1/batch",
        data=data,
        headers={**basic(KEY), "Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["accepted"] == 50
    assert set(await read(raw, set(ids))) == set(ids)


async def test_gzip_bomb_is_refused(client: Client) -> None:
    bomb = gzip.compress(b"[" + b" " * (50 * 1024 * 1024) + b"]", compresslevel=9)
    assert len(bomb) < 100 * 1024
    resp = await client.post(
        "/v1/batch", data=bomb, headers={**basic(KEY), "Content-Encoding": "gzip"}
    )
    assert resp.status == 400
    assert (await resp.json())["code"] == "payload_too_large"


async def test_corrupt_gzip_is_400(client: Client) -> None:
    data = gzip.compress(b'{"batch": []}')[:-6]
    resp = await client.post(
        "/v1/batch", data=data, headers={**basic(KEY), "Content-Encoding": "gzip"}
    )
    assert resp.status == 400
    assert (await resp.json())["code"] == "invalid_encoding"


async def test_cors_preflight(client: Client) -> None:
    resp = await client.options(
        "/v1/t",
        headers={
            "Origin": "https://shop.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    allowed = {h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"content-type", "authorization", "content-encoding"} <= allowed


async def test_oversize_message_in_batch_goes_to_dlq(
    client: Client, raw: TopicTail, dlq: TopicTail
) -> None:
    ok_ids = [mid("ok"), mid("ok")]
    big_id = mid("big")
    big = {"type": "track", "userId": "u-big", "event": "Huge", "messageId": big_id,
           "properties": {"blob": "y" * (33 * 1024)}, "writeKey": KEY}  # fmt: skip
    body = {"writeKey": KEY, "batch": [
        {"type": "track", "userId": "u-big", "event": "E", "messageId": ok_ids[0]},
        big,
        {"type": "identify", "userId": "u-big", "messageId": ok_ids[1]},
    ]}  # fmt: skip
    resp = await client.post("/v1/batch", json=body)
    assert resp.status == 200
    payload = await resp.json()
    assert (payload["accepted"], payload["rejected"]) == (2, 1)
    assert payload["errors"][0]["index"] == 1
    assert payload["errors"][0]["messageId"] == big_id
    assert payload["errors"][0]["code"] == "EVENT_TOO_LARGE"
    assert set(await read(raw, {*ok_ids, big_id})) == set(ok_ids)
    letter = (await read(dlq, {big_id}))[big_id].value
    assert letter["reasonCode"] == "EVENT_TOO_LARGE"
    assert letter["stage"] == "collector"
    original = json.loads(letter["originalBytes"])
    assert original == {k: v for k, v in big.items() if k != "writeKey"}


async def test_batch_over_500kb_is_400(client: Client, raw: TopicTail) -> None:
    ids = [mid("500") for _ in range(40)]
    batch = [{"type": "track", "userId": "u", "event": "E", "messageId": i,
              "properties": {"blob": "z" * 13_000}} for i in ids]  # fmt: skip
    data = orjson.dumps({"batch": batch})
    assert len(data) > MAX_BATCH_BYTES
    resp = await client.post("/v1/batch", data=data, headers=basic(KEY))
    assert resp.status == 400
    assert (await resp.json())["code"] == "payload_too_large"
    assert await read(raw, set(ids)) == {}


async def test_single_call_over_32kb_is_400(client: Client) -> None:
    body = {"userId": "u", "event": "E", "properties": {"blob": "q" * (33 * 1024)}}
    resp = await client.post("/v1/track", json=body, headers=basic(KEY))
    assert resp.status == 400
    assert (await resp.json())["code"] == "payload_too_large"


async def test_more_than_2500_messages_is_400(client: Client) -> None:
    batch = [{"type": "track", "userId": "u", "event": "E"}] * 2501
    resp = await client.post("/v1/batch", json={"batch": batch}, headers=basic(KEY))
    assert resp.status == 400
    assert (await resp.json())["code"] == "batch_too_large"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b'{"batch": [', "invalid_json"),
        (b"not json at all", "invalid_json"),
        (b'{"a": NaN}', "invalid_json"),
        (b"[1, 2]", "invalid_request"),
        (b'{"batch": {"type": "track"}}', "invalid_request"),
        (b'{"batch": [], "context": "x"}', "invalid_request"),
    ],
)
async def test_malformed_bodies_are_400(client: Client, data: bytes, code: str) -> None:
    resp = await client.post(
        "/v1/batch", data=data, headers={**basic(KEY), "Content-Type": "application/json"}
    )
    assert resp.status == 400
    payload = await resp.json()
    assert payload["code"] == code and payload["message"]


RICH_PROPERTIES: dict[str, Any] = {
    "int": 3,
    "float": 3.0,
    "neg_zero": -0.0,
    "small": 1e-300,
    "big_int": 123456789012345678901234567890,
    "u64": 18446744073709551615,
    "bools": [True, False],
    "null": None,
    "nested": {"list": [1, 2.5, {"deep": ["x", None, {"z": []}]}], "empty": {}},
    "unicode": "Grüße 👋 \u2028",
    "order": {"b": 1, "a": 2},
}


async def test_mixed_batch(client: Client, raw: TopicTail, dlq: TopicTail) -> None:
    names = ("ok_track", "no_identity", "ok_identify", "no_event", "bad_ts", "not_object")
    ids = {name: mid(name) for name in names}
    batch: list[Any] = [
        {"type": "track", "userId": "u-mix", "event": "Bought", "messageId": ids["ok_track"],
         "properties": RICH_PROPERTIES},
        {"type": "track", "event": "Bought", "messageId": ids["no_identity"]},
        {"type": "identify", "anonymousId": "a-mix", "messageId": ids["ok_identify"],
         "traits": {"age": 41, "score": 0.5, "vip": False}},
        {"type": "track", "userId": "u-mix", "messageId": ids["no_event"]},
        {"type": "track", "userId": "u-mix", "event": "E", "messageId": ids["bad_ts"],
         "timestamp": "yesterday-ish"},
        "not an object",
    ]  # fmt: skip
    data = json.dumps({"batch": batch, "writeKey": KEY}).encode()  # stdlib: big ints
    resp = await client.post("/v1/batch", data=data, headers={"Content-Type": "application/json"})
    assert resp.status == 200
    payload = await resp.json()
    assert payload["success"] is True
    assert (payload["accepted"], payload["rejected"]) == (2, 4)
    errors = {e["index"]: (e["messageId"], e["code"]) for e in payload["errors"]}
    assert errors == {
        1: (ids["no_identity"], "MISSING_IDENTITY"),
        3: (ids["no_event"], "MISSING_EVENT"),
        4: (ids["bad_ts"], "INVALID_TIMESTAMP"),
        5: (None, "SCHEMA_INVALID"),
    }
    accepted = await read(raw, set(ids.values()))
    assert set(accepted) == {ids["ok_track"], ids["ok_identify"]}
    track = accepted[ids["ok_track"]]
    assert track.key == b"u-mix"
    assert canonical(json.loads(track.value["properties"])) == canonical(RICH_PROPERTIES)
    identify = accepted[ids["ok_identify"]].value
    assert canonical(json.loads(identify["traits"])) == canonical(
        {"age": 41, "score": 0.5, "vip": False}
    )
    assert accepted[ids["ok_identify"]].key == b"a-mix"

    letters = await read(dlq, set(ids.values()))
    assert {m: r.value["reasonCode"] for m, r in letters.items()} == {
        ids["no_identity"]: "MISSING_IDENTITY",
        ids["no_event"]: "MISSING_EVENT",
        ids["bad_ts"]: "INVALID_TIMESTAMP",
    }
    for message_id, record in letters.items():
        assert record.key == message_id.encode()
        assert record.value["stage"] == "collector"
        assert json.loads(record.value["originalBytes"])["messageId"] == message_id


async def test_single_call_rejected_is_400_and_dead_lettered(
    client: Client, raw: TopicTail, dlq: TopicTail
) -> None:
    message_id = mid("single-bad")
    body = {"userId": "u", "messageId": message_id, "writeKey": KEY}  # track without event
    resp = await client.post("/v1/t", data=json.dumps(body), headers={"Content-Type": "text/plain"})
    assert resp.status == 400
    payload = await resp.json()
    assert payload["code"] == "invalid_event" and payload["message"]
    assert (payload["accepted"], payload["rejected"]) == (0, 1)
    assert payload["errors"][0]["code"] == "MISSING_EVENT"
    assert await read(raw, {message_id}) == {}
    letter = (await read(dlq, {message_id}))[message_id].value
    assert letter["reasonCode"] == "MISSING_EVENT"
    original = json.loads(letter["originalBytes"])
    assert "writeKey" not in original and original["messageId"] == message_id


async def test_all_rejected_batch_is_still_200(client: Client, dlq: TopicTail) -> None:
    ids = [mid("rej"), mid("rej")]
    batch = [{"type": "track", "messageId": i, "event": "E"} for i in ids]
    resp = await client.post("/v1/batch", json={"batch": batch}, headers=basic(KEY))
    assert resp.status == 200
    payload = await resp.json()
    assert (payload["accepted"], payload["rejected"]) == (0, 2)
    assert set(await read(dlq, set(ids))) == set(ids)


async def test_kafka_unreachable_is_503(settings: Settings, pipeline_topics: None) -> None:
    down = settings.model_copy(update={"kafka_bootstrap_servers": "127.0.0.1:1"})
    app = create_app(
        down,
        producer_overrides={"message.timeout.ms": 1500, "linger.ms": 0},
        delivery_timeout_s=8.0,
    )
    async with TestClient(TestServer(app)) as c:
        body = {"batch": [{"type": "track", "userId": "u", "event": "E"}]}
        resp = await c.post("/v1/batch", json=body, headers=basic(KEY))
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "5"
        assert (await resp.json())["code"] == "unavailable"
        single = await c.post("/v1/track", json=body["batch"][0], headers=basic(KEY))
        assert single.status == 503
        assert (await c.get("/health/live")).status == 200
        ready = await c.get("/health/ready")
        assert ready.status == 503
        assert (await ready.json())["broker"] is False


async def test_delivery_timeout_is_503(settings: Settings, pipeline_topics: None) -> None:
    """When the broker does not answer before the request's deadline, 503 (not a hang)."""
    down = settings.model_copy(update={"kafka_bootstrap_servers": "127.0.0.1:1"})
    app = create_app(down, producer_overrides={"message.timeout.ms": 3000}, delivery_timeout_s=0.5)
    async with TestClient(TestServer(app)) as c:
        resp = await c.post("/v1/track", json={"userId": "u", "event": "E"}, headers=basic(KEY))
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "5"


async def test_health_metrics_and_error_shapes(client: Client) -> None:
    assert (await client.get("/health/live")).status == 200
    for _ in range(60):
        ready = await client.get("/health/ready")
        if ready.status == 200:
            break
        await asyncio.sleep(0.25)
    assert ready.status == 200
    body = {"batch": [{"type": "track", "userId": "u-m", "event": "E"},
                      {"type": "track", "userId": "u-m"}]}  # fmt: skip
    assert (await client.post("/v1/batch", json=body, headers=basic(KEY))).status == 200
    text = await (await client.get("/metrics")).text()
    assert 'cdp_collector_requests_total{path="/v1/batch",status="200"} 1.0' in text
    assert 'cdp_collector_events_total{outcome="accepted",reason=""} 1.0' in text
    assert 'cdp_collector_events_total{outcome="rejected",reason="MISSING_EVENT"} 1.0' in text
    assert "cdp_collector_request_seconds_bucket" in text
    assert KEY not in text

    missing = await client.get("/v1/nowhere")
    assert missing.status == 404
    assert set(await missing.json()) == {"code", "message"}
    wrong_method = await client.get("/v1/track")
    assert wrong_method.status == 405
    assert set(await wrong_method.json()) == {"code", "message"}
    unsupported = await client.post(
        "/v1/track", data=b"a=b", headers={**basic(KEY), "Content-Type": "multipart/form-data"}
    )
    assert unsupported.status == 415
