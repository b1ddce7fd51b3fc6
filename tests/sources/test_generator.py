"""The synthetic shopper generator: determinism, validity and plausible journeys.

Most checks need no broker (the generator is pure); the run_generator tests
publish to the real stack and read the events back.
"""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from sources.generator import (
    BAD_MARKER,
    BAD_REASONS,
    CATALOGUE,
    CATEGORIES,
    _TokenBucket,
    bad_reason,
    generate_events,
    generate_recommendations,
    run_generator,
    user_ids,
)
from sources.publisher import EventPublisher, recommendation_record
from streams import topics
from streams.events import EventRejected, Limits, from_segment, now_ms, parse_timestamp
from streams.serde import AvroSerde
from streams.settings import Settings
from streams.topics import ensure_topics
from tests.conftest import StackEndpoints
from tests.sources import TopicTail

START = int(datetime(2026, 11, 1, tzinfo=UTC).timestamp() * 1000)
ECOMMERCE = {
    "Products Searched",
    "Product Viewed",
    "Product Added",
    "Product Removed",
    "Cart Viewed",
    "Checkout Started",
    "Coupon Applied",
    "Order Completed",
}
PRODUCT_KEYS = {"product_id", "sku", "category", "name", "brand", "price", "currency"}


def ts(event: dict[str, Any]) -> int:
    value = parse_timestamp(event["timestamp"], "timestamp")
    assert value is not None
    return value


@pytest.fixture(scope="module")
def events() -> list[dict[str, Any]]:
    return list(generate_events(6000, 150, seed=11))


@pytest.fixture(scope="module")
def good(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if bad_reason(e) is None]


def test_same_seed_same_events_and_different_seed_different_events() -> None:
    a = list(generate_events(800, 40, seed=3, start_ms=START, bad_ratio=0.1))
    b = list(generate_events(800, 40, seed=3, start_ms=START, bad_ratio=0.1))
    c = list(generate_events(800, 40, seed=4, start_ms=START, bad_ratio=0.1))
    assert a == b
    assert len(a) == 800
    assert {e["messageId"] for e in a}.isdisjoint({e["messageId"] for e in c})
    # Without start_ms only the absolute time moves (traits.createdAt is a time too).
    d = list(generate_events(800, 40, seed=3, bad_ratio=0.1))

    def timeless(e: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in e.items() if k not in ("timestamp", "traits")}

    assert [timeless(e) for e in d] == [timeless(e) for e in a]
    shift = {ts(x) - ts(y) for x, y in zip(d, a, strict=True) if bad_reason(x) is None}
    assert len(shift) == 1


def test_recommendations_are_deterministic() -> None:
    a = list(generate_recommendations(30, seed=9, generated_at_ms=START))
    b = list(generate_recommendations(30, seed=9, generated_at_ms=START))
    assert a == b
    assert a != list(generate_recommendations(30, seed=10, generated_at_ms=START))


def test_every_good_event_passes_validation(good: list[dict[str, Any]]) -> None:
    assert len(good) == 6000
    limits = Limits.from_settings(Settings())
    received = now_ms()
    for event in good:
        record = from_segment(event, received_at_ms=received, limits=limits)
        assert record["timestamp"] == ts(event)  # no sentAt: the generated time is kept
        assert record["messageId"] == event["messageId"]
    assert len({e["messageId"] for e in good}) == len(good)


def test_mix_of_calls_and_ecommerce_events(good: list[dict[str, Any]]) -> None:
    types = Counter(e["type"] for e in good)
    assert set(types) == {"track", "identify", "page", "screen", "group", "alias"}
    assert types["track"] > types["identify"] > types["group"] > 0
    tracks = Counter(e["event"] for e in good if e["type"] == "track")
    assert set(tracks) == ECOMMERCE
    # A funnel narrows: more views than adds than orders.
    assert tracks["Product Viewed"] > tracks["Product Added"] > tracks["Order Completed"] > 0


def test_ecommerce_property_shapes(good: list[dict[str, Any]]) -> None:
    catalogue = {p.product_id: p for p in CATALOGUE}
    for e in good:
        if e["type"] != "track":
            continue
        props = e["properties"]
        name = e["event"]
        if name in ("Product Viewed", "Product Added", "Product Removed"):
            assert set(props) >= PRODUCT_KEYS, props
            product = catalogue[props["product_id"]]
            assert (props["sku"], props["name"], props["category"]) == (
                product.sku,
                product.name,
                product.category,
            )
            assert isinstance(props["price"], float | int) and props["price"] > 0
        if name in ("Product Added", "Product Removed"):
            assert props["cart_id"].startswith("cart_") and props["quantity"] >= 1
        if name == "Products Searched":
            assert isinstance(props["query"], str) and props["query"]
        if name == "Cart Viewed":
            assert props["products"] and props["cart_id"]
        if name == "Order Completed":
            assert {"order_id", "total", "revenue", "currency", "products"} <= set(props)
            assert props["products"], props
            for item in props["products"]:
                assert {"product_id", "sku", "name", "price", "quantity"} <= set(item)
            subtotal = sum(i["price"] * i["quantity"] for i in props["products"])
            assert props["subtotal"] == pytest.approx(subtotal, abs=0.011)
            assert props["revenue"] == pytest.approx(subtotal - props["discount"], abs=0.011)
            assert props["total"] == pytest.approx(
                props["revenue"] + props["shipping"] + props["tax"], abs=0.011
            )
        if name == "Coupon Applied":
            assert props["coupon_id"] and "discount" in props


def test_context_looks_like_real_clients(good: list[dict[str, Any]]) -> None:
    agents: Counter[str] = Counter()
    utm_urls = campaigns = screens = 0
    for e in good:
        c = e["context"]
        assert c["ip"] and c["locale"] and c["userAgent"] and c["library"]["name"]
        ua = c["userAgent"]
        agents["bot" if "bot" in ua.lower() else "mobile" if "Mobile" in ua else "other"] += 1
        if "consent" in c:
            prefs = c["consent"]["categoryPreferences"]
            assert set(prefs) == {"Advertising", "Analytics"}
            assert all(isinstance(v, bool) for v in prefs.values())
        if "page" in c:
            page = c["page"]
            assert page["url"].startswith("https://") and page["path"].startswith("/")
            assert "title" in page and "referrer" in page
            query = parse_qs(urlsplit(page["url"]).query)
            if query:
                utm_urls += 1
                assert "utm_source" in query and "utm_medium" in query
                if "campaign" in c:
                    campaigns += 1
                    assert c["campaign"]["source"] == query["utm_source"][0]
                    assert c["campaign"]["name"] == query["utm_campaign"][0]
        if e["type"] == "screen":
            screens += 1
            assert c["device"]["type"] in ("ios", "android") and "app" in c
    assert agents["bot"] and agents["mobile"] and agents["other"]
    assert utm_urls > campaigns > 0
    assert screens > 0
    assert sum("consent" in e["context"] for e in good) > len(good) * 0.8


def test_journeys_are_time_ordered_per_user(good: list[dict[str, Any]]) -> None:
    per_user: dict[str, list[int]] = defaultdict(list)
    for e in good:
        per_user[e["anonymousId"]].append(ts(e))
    assert len(per_user) > 100
    for times in per_user.values():
        assert all(a < b for a, b in pairwise(times))
    # The stream as a whole is in time order too (users interleave like live traffic).
    stamps = [ts(e) for e in good]
    assert stamps == sorted(stamps)


def test_identify_links_anonymous_browsing_to_the_user(good: list[dict[str, Any]]) -> None:
    by_anon: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in good:
        by_anon[e["anonymousId"]].append(e)
    identified = 0
    for journey in by_anon.values():
        idents = [i for i, e in enumerate(journey) if e["type"] == "identify"]
        if not idents:
            assert all("userId" not in e for e in journey)  # never identified: stays anonymous
            continue
        identified += 1
        first = idents[0]
        user_id = journey[first]["userId"]
        assert journey[first]["traits"]["email"].endswith(
            ("example.com", "example.org", "example.net")
        )
        assert {
            "email",
            "firstName",
            "lastName",
            "phone",
            "city",
            "country",
            "plan",
            "createdAt",
        } <= set(journey[first]["traits"])
        # Anonymous page views come first, then every later call carries the userId.
        assert journey[0]["type"] in ("page", "screen") and "userId" not in journey[0]
        assert all("userId" not in e for e in journey[:first])
        assert all(e["userId"] == user_id for e in journey[first:])
        for e in journey:
            if e["type"] == "alias":
                assert e["previousId"] == e["anonymousId"] and e["userId"] == user_id
            if e["type"] == "track" and e["event"] in ("Checkout Started", "Order Completed"):
                assert "userId" in e  # checkout needs an account
    assert identified > len(by_anon) * 0.5


def test_bad_events_are_marked_and_rejected_for_the_intended_reason() -> None:
    events = list(generate_events(4000, 80, seed=5, bad_ratio=0.1))
    assert len(events) == 4000
    bad = [e for e in events if bad_reason(e) is not None]
    assert 300 < len(bad) < 500
    limits = Limits.from_settings(Settings())
    got: Counter[str] = Counter()
    for e in bad:
        with pytest.raises(EventRejected) as info:
            from_segment(e, received_at_ms=now_ms(), limits=limits)
        assert info.value.reason == bad_reason(e) == e["properties"][BAD_MARKER]
        got[info.value.reason] += 1
    assert set(got) == set(BAD_REASONS)
    for e in events:
        if bad_reason(e) is None:
            from_segment(e, received_at_ms=now_ms(), limits=limits)


def test_catalogue_is_fixed_and_varied() -> None:
    assert len(CATALOGUE) == 200
    assert len({p.product_id for p in CATALOGUE}) == 200
    assert len({p.sku for p in CATALOGUE}) == 200
    assert {p.category for p in CATALOGUE} == set(CATEGORIES)
    assert len(CATEGORIES) == 10
    assert all(p.price > 0 for p in CATALOGUE)


def test_recommendations_target_generated_users_and_are_valid() -> None:
    recs = list(generate_recommendations(60, seed=21, per_user=8))
    ids = user_ids(60, seed=21)
    assert [r["customer_id"] for r in recs] == ids
    seen_users = {e["userId"] for e in generate_events(3000, 60, seed=21) if "userId" in e}
    assert seen_users <= set(ids)
    assert len(seen_users) > len(ids) * 0.5
    catalogue = {p.product_id: p for p in CATALOGUE}
    for r in recs:
        record = recommendation_record(**r)
        scores = [p["score"] for p in record["products"]]
        assert scores == sorted(scores, reverse=True)
        assert len(record["products"]) == 8
        for p in record["products"]:
            assert catalogue[p["productId"]].category == p["category"]
            assert p["reason"]


def test_token_bucket_paces_without_sleeping_per_event(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps = 0
    real_sleep = time.sleep

    def counting_sleep(seconds: float) -> None:
        nonlocal sleeps
        sleeps += 1
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", counting_sleep)
    bucket = _TokenBucket(5000)
    started = time.monotonic()
    for _ in range(2500):
        bucket.take()
    elapsed = time.monotonic() - started
    assert 0.4 < elapsed < 3
    assert sleeps < 100  # batches, not 2500 sleeps


@pytest.fixture(scope="module")
def pipeline_topics(stack: StackEndpoints) -> None:
    ensure_topics(
        Settings(
            kafka_bootstrap_servers=stack.bootstrap_servers,
            schema_registry_url=stack.registry_url,
        )
    )


@pytest.fixture
def raw(stack: StackEndpoints, pipeline_topics: None) -> Iterator[TopicTail]:
    tail = TopicTail(stack.bootstrap_servers, stack.registry_url, topics.EVENTS_RAW)
    yield tail
    tail.close()


def test_run_generator_publishes_good_events_and_counts_rejections(
    settings: Settings, serde: AvroSerde, raw: TopicTail
) -> None:
    seed = random.randrange(1 << 30)
    expected = list(generate_events(500, 25, seed=seed, bad_ratio=0.05))
    good_ids = {e["messageId"] for e in expected if bad_reason(e) is None}
    bad_ids = {e["messageId"] for e in expected} - good_ids
    with EventPublisher(settings, serde=serde, source_id="generator-test") as pub:
        stats = run_generator(pub, 500, 25, rate=None, seed=seed, bad_ratio=0.05, progress=False)
    assert stats.sent == len(good_ids)
    assert stats.rejected == len(bad_ids) > 0
    assert (stats.acked, stats.failed, stats.dropped, stats.pending) == (len(good_ids), 0, 0, 0)
    assert stats.events_per_s > 0
    landed = raw.by_message_id(good_ids | bad_ids)
    assert set(landed) == good_ids
    assert all(r.value["sourceId"] == "generator-test" for r in landed.values())


def test_run_generator_holds_the_requested_rate(settings: Settings, serde: AvroSerde) -> None:
    seed = random.randrange(1 << 30)
    with EventPublisher(settings, serde=serde) as pub:
        stats = run_generator(pub, 300, 10, rate=500, seed=seed, progress=False)
    assert stats.acked == 300
    # 300 events at 500/s, minus the initial ~25-event burst: about 0.55 s.
    assert 0.45 < stats.elapsed_s < 5
    assert stats.events_per_s < 650
