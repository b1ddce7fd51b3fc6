"""EventPublisher against the real broker and registry.

What lands is read back with confluent-kafka's own AvroDeserializer (via
TopicTail) and compared field by field with what ``from_segment`` makes of the
same Segment message: a publisher-written event must be indistinguishable from
a collector-written one.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from sources.kafka_producer import DeliveryFailed, QueueFull, ReliableProducer
from sources.publisher import LIBRARY, EventPublisher, FlushResult, ProductInput
from streams import schemas, topics
from streams.events import EventRejected, Limits, Reason, from_segment, identity_key, to_ms
from streams.serde import AvroSerde
from streams.settings import Settings
from streams.topics import ensure_topics
from tests.conftest import StackEndpoints
from tests.sources import Record, TopicTail

EVENT_FIELDS = [f["name"] for f in schemas.schema_dict(schemas.CUSTOMER_EVENT)["fields"]]
TIMESTAMP_FIELDS = ("timestamp", "originalTimestamp", "sentAt", "receivedAt")


@pytest.fixture(scope="module")
def pipeline_topics(stack: StackEndpoints) -> None:
    ensure_topics(
        Settings(
            kafka_bootstrap_servers=stack.bootstrap_servers,
            schema_registry_url=stack.registry_url,
        )
    )


@pytest.fixture
def publisher(
    settings: Settings, serde: AvroSerde, pipeline_topics: None
) -> Iterator[EventPublisher]:
    pub = EventPublisher(settings, serde=serde)
    yield pub
    pub.close()


@pytest.fixture
def raw(stack: StackEndpoints, pipeline_topics: None) -> Iterator[TopicTail]:
    tail = TopicTail(stack.bootstrap_servers, stack.registry_url, topics.EVENTS_RAW)
    yield tail
    tail.close()


@pytest.fixture
def recs(stack: StackEndpoints, pipeline_topics: None) -> Iterator[TopicTail]:
    tail = TopicTail(stack.bootstrap_servers, stack.registry_url, topics.RECOMMENDATIONS_UPDATES)
    yield tail
    tail.close()


def normalise(value: dict[str, Any]) -> dict[str, Any]:
    """AvroDeserializer returns timestamp-millis as datetimes; records carry epoch millis."""
    out = dict(value)
    for key in TIMESTAMP_FIELDS:
        if out.get(key) is not None:
            out[key] = to_ms(out[key])
    if "generatedAt" in out:
        out["generatedAt"] = to_ms(out["generatedAt"])
    return out


def assert_lands_as(
    record: Record, message: dict[str, Any], settings: Settings, source: str
) -> None:
    got = normalise(record.value)
    assert list(got) == EVENT_FIELDS
    expected = from_segment(
        message,
        received_at_ms=got["receivedAt"],
        source_id=source,
        limits=Limits.from_settings(settings),
    )
    assert got == expected
    assert record.key == identity_key(expected).encode()


def ctx(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "ip": "203.0.113.7",
        "userAgent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/125.0",
        "locale": "de-DE",
        "page": {"url": "https://shop.example.com/?utm_source=news", "path": "/"},
        "consent": {"categoryPreferences": {"Advertising": False, "Analytics": True}},
        **(extra or {}),
    }


def test_every_call_type_lands_and_decodes_with_confluent_deserializer(
    publisher: EventPublisher, raw: TopicTail, settings: Settings, unique: str
) -> None:
    user, anon = f"user-{unique}", f"anon-{unique}"
    when = datetime.now(UTC) - timedelta(minutes=3)
    iso = when.isoformat()
    lib_ctx = {**ctx(), "library": LIBRARY}
    ids = {
        kind: f"{kind}-{unique}"
        for kind in ("track", "identify", "page", "screen", "group", "alias", "send")
    }
    props = {
        "order_id": "o-1",
        "total": 12.5,
        "products": [{"sku": "a", "quantity": 2}],
        "gift": True,
        "note": None,
        "big": 2**70,
    }
    futures: dict[str, Future[str]] = {
        "track": publisher.track(
            user,
            "Order Completed",
            props,
            ctx(),
            when,
            anon,
            {"All": True, "Mixpanel": False},
            ids["track"],
        ),
        "identify": publisher.identify(
            user,
            {"email": f"{unique}@example.com", "plan": "pro"},
            ctx(),
            when,
            anon,
            message_id=ids["identify"],
        ),
        "page": publisher.page(
            None, "Docs", "Install", {"path": "/install"}, ctx(), when, anon, message_id=ids["page"]
        ),
        "screen": publisher.screen(
            user,
            None,
            "Settings",
            None,
            ctx({"os": {"name": "iOS"}}),
            iso,
            message_id=ids["screen"],
        ),
        "group": publisher.group(
            user,
            f"grp-{unique}",
            {"name": "Acme", "seats": 40},
            ctx(),
            int(when.timestamp() * 1000),
            message_id=ids["group"],
        ),
        "alias": publisher.alias(anon, user, ctx(), when, message_id=ids["alias"]),
    }
    sent_raw = {
        "type": "track",
        "event": "Raw Send",
        "anonymousId": anon,
        "properties": {"nested": {"a": [1, 2.5, "x"]}},
        "context": ctx(),
        "timestamp": iso,
        "sentAt": iso,
        "messageId": ids["send"],
    }
    futures["send"] = publisher.send(sent_raw)
    assert {k: f.result(timeout=30) for k, f in futures.items()} == ids

    expected_messages: dict[str, dict[str, Any]] = {
        "track": {
            "type": "track",
            "userId": user,
            "anonymousId": anon,
            "event": "Order Completed",
            "properties": props,
            "context": lib_ctx,
            "timestamp": iso,
            "integrations": {"All": True, "Mixpanel": False},
            "messageId": ids["track"],
        },
        "identify": {
            "type": "identify",
            "userId": user,
            "anonymousId": anon,
            "traits": {"email": f"{unique}@example.com", "plan": "pro"},
            "context": lib_ctx,
            "timestamp": iso,
            "messageId": ids["identify"],
        },
        "page": {
            "type": "page",
            "anonymousId": anon,
            "category": "Docs",
            "name": "Install",
            "properties": {"path": "/install"},
            "context": lib_ctx,
            "timestamp": iso,
            "messageId": ids["page"],
        },
        "screen": {
            "type": "screen",
            "userId": user,
            "name": "Settings",
            "context": {**ctx({"os": {"name": "iOS"}}), "library": LIBRARY},
            "timestamp": iso,
            "messageId": ids["screen"],
        },
        "group": {
            "type": "group",
            "userId": user,
            "groupId": f"grp-{unique}",
            "traits": {"name": "Acme", "seats": 40},
            "context": lib_ctx,
            "timestamp": int(when.timestamp() * 1000),
            "messageId": ids["group"],
        },
        "alias": {
            "type": "alias",
            "previousId": anon,
            "userId": user,
            "context": lib_ctx,
            "timestamp": iso,
            "messageId": ids["alias"],
        },
        "send": sent_raw,
    }
    landed = raw.by_message_id(set(ids.values()))
    assert set(landed) == set(ids.values())
    for kind, mid in ids.items():
        assert_lands_as(landed[mid], expected_messages[kind], settings, "publisher")
    # The raw send() carried no library: the publisher must not add one to client messages.
    assert landed[ids["send"]].value["context"]["library"] is None
    result = publisher.flush(10)
    assert (result.delivered, result.failed, result.pending) == (len(ids), 0, 0)


def test_message_id_is_generated_when_absent_and_source_id_is_configurable(
    settings: Settings, serde: AvroSerde, raw: TopicTail, unique: str, pipeline_topics: None
) -> None:
    with EventPublisher(settings, serde=serde, source_id=f"team-{unique}") as pub:
        mid = pub.track(f"u-{unique}", "Signed Up").result(timeout=30)
    assert len(mid) == 36  # a uuid4
    landed = raw.by_message_id({mid})
    assert landed[mid].value["sourceId"] == f"team-{unique}"
    assert landed[mid].value["userId"] == f"u-{unique}"


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"x": value}
    return value


INVALID_CALLS: list[tuple[str, Reason, Any]] = [
    ("no-identity", Reason.MISSING_IDENTITY, lambda p, m: p.track(None, "X", message_id=m)),
    ("no-event", Reason.MISSING_EVENT, lambda p, m: p.track("u", None, message_id=m)),
    ("empty-event", Reason.MISSING_EVENT, lambda p, m: p.track("u", "", message_id=m)),
    (
        "future",
        Reason.TIMESTAMP_IN_FUTURE,
        lambda p, m: p.track(
            "u", "X", timestamp=datetime.now(UTC) + timedelta(days=30), message_id=m
        ),
    ),
    (
        "too-old",
        Reason.TIMESTAMP_TOO_OLD,
        lambda p, m: p.identify("u", timestamp="1999-01-01T00:00:00Z", message_id=m),
    ),
    (
        "bad-ts",
        Reason.INVALID_TIMESTAMP,
        lambda p, m: p.page("u", name="P", timestamp="soon", message_id=m),
    ),
    ("no-name", Reason.MISSING_NAME, lambda p, m: p.screen("u", message_id=m)),
    ("no-group", Reason.MISSING_GROUP_ID, lambda p, m: p.group("u", None, message_id=m)),
    ("no-previous", Reason.MISSING_ALIAS_IDS, lambda p, m: p.alias(None, "u", message_id=m)),
    (
        "bad-type",
        Reason.UNKNOWN_TYPE,
        lambda p, m: p.send({"type": "purchase", "userId": "u", "messageId": m}),
    ),
    (
        "not-object",
        Reason.SCHEMA_INVALID,
        lambda p, m: p.track("u", "X", properties=[1, 2], message_id=m),
    ),
    (
        "deep",
        Reason.NESTING_TOO_DEEP,
        lambda p, m: p.track("u", "X", properties=nested(40), message_id=m),
    ),
    (
        "huge",
        Reason.EVENT_TOO_LARGE,
        lambda p, m: p.track("u", "X", properties={"blob": "x" * 40_000}, message_id=m),
    ),
    ("bad-id", Reason.INVALID_MESSAGE_ID, lambda p, m: p.track("u", "X", message_id="m" * 300)),
]


def test_invalid_calls_raise_at_the_call_site_and_send_nothing(
    publisher: EventPublisher, raw: TopicTail, unique: str
) -> None:
    bad_ids = set()
    for name, reason, call in INVALID_CALLS:
        mid = f"bad-{name}-{unique}"
        bad_ids.add(mid)
        with pytest.raises(EventRejected) as info:
            call(publisher, mid)
        assert info.value.reason is reason, name
        assert publisher.outstanding == 0
    sentinel = publisher.track(f"u-{unique}", "Sentinel", message_id=f"ok-{unique}")
    sentinel.result(timeout=30)
    assert publisher.flush(10) == FlushResult(delivered=1, failed=0, pending=0)
    ids = {str(r.value["messageId"]) for r in raw.read_new()}
    assert f"ok-{unique}" in ids
    assert not ids & bad_ids
    assert not any(i.startswith("m" * 300) for i in ids)


@pytest.mark.parametrize(
    ("customer", "products", "fragment"),
    [
        ("", [("p1", 0.5)], "customerId"),
        ("   ", [("p1", 0.5)], "customerId"),
        ("c", [("p1", math.nan)], "finite"),
        ("c", [("p1", math.inf)], "finite"),
        ("c", [("p1", -math.inf)], "finite"),
        ("c", [("p1", "0.5")], "finite"),
        ("c", [("p1", True)], "finite"),
        ("c", [("p1", 0.9), ("p2", 0.5), ("p1", 0.1)], "more than once"),
        ("c", [{"productId": "p1", "score": 0.5}, ("p1", 0.4)], "more than once"),
        ("c", [("", 0.5)], "productId"),
        ("c", [("p1",)], "productId, score"),
        ("c", [{"productId": "p1", "score": 0.5, "rank": 3}], "unknown key"),
        ("c", [{"product_id": "p1", "score": 0.5}], "unknown key"),
        ("c", [{"productId": "p1", "score": 0.5, "reason": 7}], "reason"),
    ],
)
def test_invalid_recommendations_raise_before_sending(
    publisher: EventPublisher, customer: str, products: Any, fragment: str
) -> None:
    with pytest.raises(EventRejected) as info:
        publisher.publish_recommendations(customer, products, "m1")
    assert info.value.reason is Reason.INVALID_RECOMMENDATION
    assert fragment in info.value.detail
    assert publisher.outstanding == 0


def test_publish_recommendations_lands_ranked_in_given_order(
    publisher: EventPublisher, recs: TopicTail, unique: str
) -> None:
    customer = f"cust-{unique}"
    generated = datetime.now(UTC).replace(microsecond=0)
    products: list[ProductInput] = [
        ("prod-b", 0.42),  # ranks follow the given order, not the score
        {"productId": "prod-a", "score": 0.97, "reason": "bought_together", "category": "Shoes"},
        {"productId": "prod-c", "score": 1},
    ]
    update_id = publisher.publish_recommendations(
        customer, products, "als-7", generated_at=generated, update_id=f"upd-{unique}"
    ).result(timeout=30)
    assert update_id == f"upd-{unique}"
    auto_id = publisher.publish_recommendations(customer, [], "als-7").result(timeout=30)
    landed = {r.value["updateId"]: r for r in recs.read_new()}
    first = landed[update_id]
    assert first.key == customer.encode()
    assert normalise(first.value) == {
        "updateId": update_id,
        "customerId": customer,
        "products": [
            {"productId": "prod-b", "score": 0.42, "rank": 1, "reason": None, "category": None},
            {
                "productId": "prod-a",
                "score": 0.97,
                "rank": 2,
                "reason": "bought_together",
                "category": "Shoes",
            },
            {"productId": "prod-c", "score": 1.0, "rank": 3, "reason": None, "category": None},
        ],
        "modelVersion": "als-7",
        "generatedAt": int(generated.timestamp() * 1000),
    }
    assert landed[auto_id].value["products"] == []
    assert abs(to_ms(landed[auto_id].value["generatedAt"]) - to_ms(datetime.now(UTC))) < 60_000


def test_flush_reports_every_message_failed_when_broker_unreachable(
    stack: StackEndpoints,
    serde: AvroSerde,
    monkeypatch: pytest.MonkeyPatch,
    unique: str,
    pipeline_topics: None,
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    monkeypatch.setenv("SCHEMA_REGISTRY_URL", stack.registry_url)
    dead = Settings()
    producer = ReliableProducer(dead, **{"message.timeout.ms": 1500, "linger.ms": 1})
    try:
        pub = EventPublisher(dead, producer=producer, serde=serde)
        futures = [
            pub.track(f"u-{unique}", "Doomed", {"i": i}, message_id=f"doomed-{i}-{unique}")
            for i in range(5)
        ]
        futures.append(
            pub.publish_recommendations(
                f"c-{unique}", [("p", 1.0)], "m", update_id=f"doomed-rec-{unique}"
            )
        )
        result = pub.flush(timeout=20)
        assert result.delivered == 0
        assert result.failed == 6
        assert result.pending == 0
        assert not result.ok
        assert sorted(result.failed_ids) == sorted(
            [f"doomed-{i}-{unique}" for i in range(5)] + [f"doomed-rec-{unique}"]
        )
        assert all(f.error for f in result.failures)
        for fut in futures:
            with pytest.raises(DeliveryFailed):
                fut.result(timeout=1)
        # The window starts again after a flush.
        assert pub.flush(timeout=1) == FlushResult(0, 0, 0)
        assert pub.close(timeout=1) == FlushResult(0, 0, 0)
    finally:
        producer.close(timeout=0)


def test_full_local_queue_raises_queue_full_or_blocks_per_setting(
    stack: StackEndpoints,
    serde: AvroSerde,
    monkeypatch: pytest.MonkeyPatch,
    unique: str,
    pipeline_topics: None,
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    monkeypatch.setenv("SCHEMA_REGISTRY_URL", stack.registry_url)
    dead = Settings()
    producer = ReliableProducer(
        dead, **{"message.timeout.ms": 1500, "queue.buffering.max.messages": 2}
    )
    try:
        nonblocking = EventPublisher(dead, producer=producer, serde=serde, block_when_full=False)
        nonblocking.track(f"u-{unique}", "A")
        nonblocking.track(f"u-{unique}", "B")
        with pytest.raises(QueueFull):
            nonblocking.track(f"u-{unique}", "C")
        assert nonblocking.outstanding == 2

        blocking = EventPublisher(dead, producer=producer, serde=serde, queue_timeout=0.3)
        with pytest.raises(QueueFull):
            blocking.track(f"u-{unique}", "D")  # waited, then gave up
        # Once the doomed records time out, room frees up and a blocking call gets through.
        blocking_long = EventPublisher(dead, producer=producer, serde=serde, queue_timeout=10)
        late = blocking_long.track(f"u-{unique}", "E")
        assert nonblocking.flush(10).failed == 2
        assert blocking_long.flush(10).failed == 1
        with pytest.raises(DeliveryFailed):
            late.result(timeout=1)
    finally:
        producer.close(timeout=0)


async def test_async_variants_await_broker_acknowledgement(
    settings: Settings,
    serde: AvroSerde,
    raw: TopicTail,
    recs: TopicTail,
    unique: str,
    pipeline_topics: None,
) -> None:
    user, anon = f"user-{unique}", f"anon-{unique}"
    async with EventPublisher(settings, serde=serde) as pub:
        got = await asyncio.gather(
            pub.atrack(user, "Async Tracked", {"n": 1}, message_id=f"a-track-{unique}"),
            pub.aidentify(
                user, {"plan": "pro"}, anonymous_id=anon, message_id=f"a-identify-{unique}"
            ),
            pub.apage(None, None, "Home", anonymous_id=anon, message_id=f"a-page-{unique}"),
            pub.ascreen(user, None, "Cart", message_id=f"a-screen-{unique}"),
            pub.agroup(user, f"g-{unique}", {"name": "Acme"}, message_id=f"a-group-{unique}"),
            pub.aalias(anon, user, message_id=f"a-alias-{unique}"),
            pub.asend(
                {"type": "track", "userId": user, "event": "Raw", "messageId": f"a-send-{unique}"}
            ),
            pub.apublish_recommendations(
                f"c-{unique}", [("p1", 0.5)], "m", update_id=f"a-rec-{unique}"
            ),
        )
        with pytest.raises(EventRejected):
            await pub.atrack(None, "No identity")
        result = await pub.aflush(10)
    kinds = ("track", "identify", "page", "screen", "group", "alias", "send")
    assert got == [f"a-{k}-{unique}" for k in kinds] + [f"a-rec-{unique}"]
    assert result == FlushResult(delivered=8, failed=0, pending=0)
    landed = raw.by_message_id({f"a-{k}-{unique}" for k in kinds})
    assert {r.value["type"] for r in landed.values()} == {
        "track",
        "identify",
        "page",
        "screen",
        "group",
        "alias",
    }
    assert f"a-rec-{unique}" in {r.value["updateId"] for r in recs.read_new()}


def test_context_manager_flushes_outstanding_records(
    settings: Settings, serde: AvroSerde, raw: TopicTail, unique: str, pipeline_topics: None
) -> None:
    with EventPublisher(settings, serde=serde) as pub:
        futures = [pub.track(f"u-{unique}", "Burst", {"i": i}) for i in range(200)]
    assert all(f.done() and f.exception() is None for f in futures)
    ids = {f.result() for f in futures}
    assert len(raw.by_message_id(ids)) == 200
    with pytest.raises(RuntimeError):
        pub.track(f"u-{unique}", "After close")


def test_registry_is_asked_once_per_schema(
    settings: Settings, serde: AvroSerde, unique: str, pipeline_topics: None
) -> None:
    calls: list[str] = []
    original = serde.schema_id

    def counting(topic: str) -> int:
        calls.append(topic)
        return original(topic)

    serde.schema_id = counting  # type: ignore[method-assign]
    with EventPublisher(settings, serde=serde) as pub:
        for i in range(50):
            pub.track(f"u-{unique}", "Repeat", {"i": i})
            pub.publish_recommendations(f"c-{unique}", [(f"p{i}", 0.1)], "m")
    assert sorted(calls) == [topics.EVENTS_RAW, topics.RECOMMENDATIONS_UPDATES]


def test_size_limit_is_the_collectors_json_size(
    publisher: EventPublisher, settings: Settings, unique: str
) -> None:
    limit = settings.cdp_max_event_bytes
    base: dict[str, Any] = {
        "type": "track",
        "userId": f"u-{unique}",
        "event": "Big",
        "messageId": f"big-{unique}",
        "properties": {"blob": ""},
    }
    overhead = len(orjson.dumps(base))
    over = {**base, "properties": {"blob": "x" * (limit - overhead + 1)}}
    assert len(orjson.dumps(over)) == limit + 1
    with pytest.raises(EventRejected) as info:
        publisher.send(over)
    assert info.value.reason is Reason.EVENT_TOO_LARGE
    exact = {**base, "properties": {"blob": "x" * (limit - overhead)}}
    assert publisher.send(exact).result(timeout=30) == f"big-{unique}"
